"""``flowmaps tune-grid`` and ``--grid tuned`` / ``--gamma`` of ``sample`` and ``evaluate``, in process, on
a tiny LMD run of the gmm_hard preset (exact teacher): the stored grids and tuning errors are checked
against an independent computation, sampling with them against ``FlowMap.sample``, and every bad input is
one line with exit status 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowmaps.cli.main import main
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import load_model

torch.set_num_threads(1)

TINY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.log_every=20",
        "data.n_train=2000", "data.n_eval=500", "train.steps=60"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    assert main(["distill", "--preset", "gmm_hard", "--out", str(root / "lmd"), "--quiet", *TINY]) == 0
    return root / "lmd"


def test_tune_grid_stores_grids_that_match_an_independent_computation(run, capsys):
    assert main(["tune-grid", str(run), "--steps", "2,4", "--n", "256", "--iters", "20"]) == 0
    stored = json.loads((run / "tuned_grids.json").read_text())
    assert stored["reference"] == "exact flow map" and stored["seed"] == 7 and stored["n"] == 256
    loaded = load_model(run)
    x0 = loaded.interpolant.sample_base(torch.empty(256, 2), torch.Generator().manual_seed(7))
    cfg = loaded.config
    bundle = ex.build_data(cfg)
    ex.attach_reference(cfg, bundle, loaded.interpolant)
    exact = bundle.reference.flow(x0.double(), 0.0, 1.0)
    for k in (2, 4):
        grid = torch.tensor(stored["grids"][str(k)], dtype=torch.float64)
        assert grid.numel() == k + 1 and grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
        with torch.no_grad():
            x = loaded.model.sample(x0, grid=grid)
        err = float((x.double() - exact).norm(dim=1).mean())
        errors = stored["tuning_error"][str(k)]
        assert err == pytest.approx(errors["tuned"], rel=1e-4)
        assert errors["tuned"] <= errors["uniform"]
    # Tuning another step count keeps the grids already there.
    assert main(["tune-grid", str(run), "--steps", "3", "--n", "64", "--iters", "5", "--quiet"]) == 0
    again = json.loads((run / "tuned_grids.json").read_text())
    assert set(again["grids"]) == {"2", "3", "4"} and again["grids"]["4"] == stored["grids"]["4"]


def test_sample_and_evaluate_use_the_tuned_grids(run, tmp_path):
    if not (run / "tuned_grids.json").exists():
        main(["tune-grid", str(run), "--steps", "2,4", "--n", "128", "--iters", "5", "--quiet"])
    grids = json.loads((run / "tuned_grids.json").read_text())["grids"]
    out = tmp_path / "s"
    assert main(["sample", str(run), "--grid", "tuned", "--steps", "2,4", "--n", "200", "--out",
                 str(out)]) == 0
    loaded = load_model(run)
    x0 = loaded.interpolant.sample_base(torch.empty(200, 2), torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = loaded.model.sample(x0, grid=torch.tensor(grids["4"], dtype=torch.float64))
    np.testing.assert_array_equal(np.load(out / "samples_tuned4.npy"), want.numpy())
    assert main(["evaluate", str(run), "--grid", "tuned", "--gamma", "0.5", "--steps", "1,2,4",
                 "--n", "300", "--no-dopri5", "--out", str(tmp_path / "e"),
                 "eval.w2_samples=200", "eval.energy_samples=200"]) == 0
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["rows"]
    samplers = {(r["sampler"], r["steps"]) for r in rows if r["method"] == "LMD"}
    assert {("tuned grid", 2), ("tuned grid", 4), ("gamma=0.5", 2), ("gamma=0.5", 4)} <= samplers
    assert ("tuned grid", 1) not in samplers and ("gamma=0.5", 1) not in samplers
    tuned4 = next(r for r in rows if r["sampler"] == "tuned grid" and r["steps"] == 4)
    # the map error of the tuned row is that of the tuned samples from the evaluation's base points
    x0 = loaded.interpolant.sample_base(torch.empty(300, 2), torch.Generator().manual_seed(99))
    bundle = ex.build_data(loaded.config)
    ex.attach_reference(loaded.config, bundle, loaded.interpolant)
    with torch.no_grad():
        x = loaded.model.sample(x0, grid=torch.tensor(grids["4"], dtype=torch.float64))
    want_err = float((x.double() - bundle.reference.flow(x0.double(), 0.0, 1.0)).norm(dim=1).mean())
    assert tuned4["map_error"] == pytest.approx(want_err, rel=1e-4)


def test_gamma_sampling_from_the_cli_is_seeded(run, tmp_path):
    args = ["sample", str(run), "--steps", "4", "--gamma", "0.4", "--n", "100"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert main(args + ["--seed", "3", "--out", str(tmp_path / "c")]) == 0
    a, b = np.load(tmp_path / "a/samples_steps4_gamma0.4.npy"), np.load(tmp_path / "b/samples_steps4_gamma0.4.npy")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.load(tmp_path / "c/samples_steps4_gamma0.4.npy"))


@pytest.mark.parametrize("args,message", [
    (["sample", "{run}", "--grid", "tuned", "--steps", "8"], "no grid for 8 steps"),
    (["sample", "{run}", "--gamma", "1.5"], "expected gamma in [0, 1]"),
    (["tune-grid", "{run}/nowhere"], "nowhere"),
    (["tune-grid", "{run}", "--n", "0"], "positive integer"),
    (["evaluate", "{run}", "--grid", "best"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys, args, message):
    if not (run / "tuned_grids.json").exists():
        main(["tune-grid", str(run), "--steps", "2", "--n", "64", "--iters", "3", "--quiet"])
    before = (run / "tuned_grids.json").read_bytes()
    capsys.readouterr()
    args = [a.format(run=run) for a in args] + ["--out", str(tmp_path / "o")] * (args[0] != "tune-grid")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowmaps: error:") and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()
    assert (run / "tuned_grids.json").read_bytes() == before


def test_a_corrupt_grid_file_is_refused_and_kept(tmp_path, run, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "tuned_grids.json").write_text('{"grids": {"2": [0.0, 0.7, 0.3]}}')
    before = (copy / "tuned_grids.json").read_bytes()
    assert main(["tune-grid", str(copy), "--steps", "2", "--n", "32", "--iters", "2"]) == 2
    assert "not an increasing grid" in capsys.readouterr().err
    assert (copy / "tuned_grids.json").read_bytes() == before
