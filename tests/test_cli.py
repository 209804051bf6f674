"""The ``flowmaps`` command through its installed entry point: a tiny train → distill → sample → evaluate
chain, config errors as one line with exit status 2, run directories that are never clobbered, and
checkpoints that round-trip exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_model, load_model, save_model
from flowmaps.runs.config import load_config

torch.set_num_threads(1)

TINY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.log_every=10",
        "data.n_train=2000", "data.n_eval=500", "eval.n_samples=500", "eval.w2_samples=300",
        "eval.energy_samples=300"]


def flowmaps(*args, cwd=None):
    exe = Path(sys.executable).parent / "flowmaps"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _ok(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Teacher velocity and an LMD map on the gmm preset, through the real command."""
    root = tmp_path_factory.mktemp("runs")
    _ok(flowmaps("train", "--preset", "gmm", "--out", root / "teacher", "--quiet",
                 "train.steps=60", *TINY))
    _ok(flowmaps("distill", "--preset", "gmm", "--teacher", root / "teacher", "--out", root / "lmd",
                 "--quiet", "train.steps=40", "train.checkpoint_every=20", *TINY))
    return root


def test_train_writes_a_complete_run_directory(chain):
    run = chain / "teacher"
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/final.json",
                 "checkpoints/final.safetensors", "plots/loss.png", "plots/samples.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r for r in records)
    meta = json.loads((run / "checkpoints/final.json").read_text())
    assert meta["step"] == 60 and meta["objective"] == "velocity"
    assert meta["library_version"] and meta["interpolant"]["name"] == "linear"
    # the intermediate (resumable) checkpoint of the distillation run, and the best one
    ckpts = chain / "lmd" / "checkpoints"
    assert (ckpts / "step-00000020.json").is_file() and (ckpts / "best.json").is_file()
    events = [json.loads(line) for line in (chain / "lmd" / "metrics.jsonl").read_text().splitlines()]
    saved = [r for r in events if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saved] == [20] and np.isfinite(saved[0]["validation_loss"])
    assert all(np.isfinite(r["jvp_norm"]) for r in events if "event" not in r)


def test_saved_config_reproduces_the_run(chain, tmp_path):
    """Rerunning from a run's config.yaml gives bit-identical weights (same seed, same data)."""
    _ok(flowmaps("train", "--config", chain / "teacher" / "config.yaml", "--out", tmp_path / "again",
                 "--quiet"))
    a = load_model(chain / "teacher", use_ema=False).model.state_dict()
    b = load_model(tmp_path / "again", use_ema=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_writes_npy_and_png_for_each_step_count(chain, tmp_path):
    out = tmp_path / "s"
    r = _ok(flowmaps("sample", chain / "lmd", "--steps", "1,2,4", "--n", "300", "--out", out))
    for k in (1, 2, 4):
        x = np.load(out / f"samples_steps{k}.npy")
        assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (out / "samples.png").stat().st_size > 1000
    assert "samples_steps4.npy" in r.stdout
    # the file exists now, so a rerun must be refused without --overwrite, and leave it as it was
    first = np.load(out / "samples_steps1.npy")
    again = flowmaps("sample", chain / "lmd", "--steps", "1", "--n", "300", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert np.array_equal(np.load(out / "samples_steps1.npy"), first)
    # same seed -> bit-identical samples; another seed -> other samples
    (out / "samples_steps1.npy").unlink()
    _ok(flowmaps("sample", chain / "lmd", "--steps", "1", "--n", "300", "--out", out, "--seed", "0"))
    assert np.array_equal(np.load(out / "samples_steps1.npy"), first)
    _ok(flowmaps("sample", chain / "lmd", "--steps", "1", "--n", "300", "--out", out, "--overwrite",
                 "--seed", "1"))
    other = np.load(out / "samples_steps1.npy")
    assert other.shape == first.shape and np.abs(other - first).mean() > 0.1
    grid = _ok(flowmaps("sample", chain / "lmd", "--grid", "0,0.5,1", "--n", "50", "--out", out))
    assert "samples_grid.npy" in grid.stdout


def test_evaluate_writes_table_json_and_plots(chain, tmp_path):
    out = tmp_path / "eval"
    r = _ok(flowmaps("evaluate", chain / "lmd" / "checkpoints" / "final", "--steps", "1,2,4",
                     "--n", "400", "--out", out))
    rows = json.loads((out / "results.json").read_text())["rows"]
    maps = [row for row in rows if row["sampler"] == "flow map"]
    assert [row["steps"] for row in maps] == [1, 2, 4] and [row["nfe"] for row in maps] == [1, 2, 4]
    solvers = {(row["sampler"], row["nfe"]) for row in rows if row["method"] == "teacher"}
    assert {("euler", 1), ("euler", 4), ("heun", 2), ("heun", 4), ("rk4", 4)} <= solvers
    assert any(row["sampler"] == "dopri5" and row["nfe"] > 4 for row in rows)
    # gmm data has an exact map: the map error column is filled; W2/energy/KL are finite
    assert all(row["map_error"] is not None and row["map_error"] >= 0 for row in rows)
    assert all(np.isfinite([row["w2"], row["energy"], row["kl"]]).all() for row in rows)
    for png in ("samples_grid.png", "trajectories.png", "w2_vs_nfe.png", "map_error_vs_nfe.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert "| LMD | flow map | 1 | 1 |" in r.stdout
    # map_error against an independent computation: the base points of eval.seed, the exact map by
    # torchdiffeq's dopri5 at tight tolerance (evaluate uses the mixture's own fixed-step RK4), the
    # flow map and the teacher's Euler written out here, and the norm by NumPy.
    from torchdiffeq import odeint

    lmd, teacher = load_model(chain / "lmd"), load_model(chain / "teacher")
    cfg = lmd.config
    x0 = lmd.interpolant.sample_base(torch.empty(400, 2), torch.Generator().manual_seed(cfg.eval.seed))
    gmm = ex._gmm_reference(cfg, lmd.interpolant)
    exact = odeint(lambda t, x: gmm.velocity(x, t.expand(x.shape[0])), x0.double(),
                   torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", rtol=1e-9,
                   atol=1e-9)[-1].numpy()

    def error(x):
        return float(np.linalg.norm(x.double().numpy() - exact, axis=1).mean())

    with torch.no_grad():
        expected = {("flow map", k): error(lmd.model(x0, 0.0, 1.0) if k == 1 else
                                           lmd.model.sample(x0, steps=k)) for k in (1, 2, 4)}
        x = x0
        for i in range(4):  # Euler, 4 steps of h = 1/4, on the teacher velocity
            x = x + 0.25 * teacher.model.velocity(x, torch.full((400,), i / 4))
        expected[("euler", 4)] = error(x)
    got = {(row["sampler"], row["steps"]): row["map_error"] for row in rows}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert len({round(v, 3) for v in expected.values()}) == len(expected)  # distinct: a real check


@pytest.mark.parametrize("args, message", [
    (["train.stepz=3"], "unknown key stepz in train"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
    (["model.activation=relu6"], "model.activation: 'relu6' is not one of"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["data.name=file", "data.path=/nonexistent.npy"], "data file not found"),
    (["objective.name=lmd"], "use `flowmaps distill`"),
    (["train.steps"], "expected key=value"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, message):
    r = flowmaps("train", "--out", tmp_path / "run", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowmaps: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_list_keys_take_the_comma_form():
    """``eval.steps=1,2,4`` is the list [1, 2, 4], as ``--steps 1,2,4`` is; every list key reads it."""
    cfg = load_config("digits", overrides=["eval.steps=1,2,4", "eval.solvers=euler,rk4",
                                           "model.channel_mults=1,2,2", "model.attention_resolutions=4,",
                                           "train.steps=7"])
    assert cfg.eval.steps == [1, 2, 4] and cfg.eval.solvers == ["euler", "rk4"]
    assert cfg.model.channel_mults == [1, 2, 2] and cfg.model.attention_resolutions == [4]
    assert load_config("gmm", overrides=["eval.steps=[1, 2]"]).eval.steps == [1, 2]  # YAML form too


def test_existing_run_directory_is_never_clobbered(chain):
    before = (chain / "teacher" / "checkpoints" / "final.safetensors").read_bytes()
    r = flowmaps("train", "--preset", "gmm", "--out", chain / "teacher", "train.steps=5", *TINY)
    assert r.returncode == 2 and "already holds files" in r.stderr
    assert (chain / "teacher" / "checkpoints" / "final.safetensors").read_bytes() == before


def test_bad_checkpoints_are_refused_with_one_line(chain, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(chain / "lmd" / "checkpoints", bad)
    weights = bad / "final.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    r = flowmaps("sample", bad / "final", "--n", "10", "--out", tmp_path / "s")
    assert r.returncode == 2 and "not a valid safetensors file" in r.stderr
    weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header
    r = flowmaps("sample", bad / "final", "--n", "10", "--out", tmp_path / "s")
    assert r.returncode == 2 and "pickle" in r.stderr
    r = flowmaps("sample", tmp_path / "missing", "--n", "10")
    assert r.returncode == 2 and "not found" in r.stderr


def test_checkpoint_round_trip_samples_identically(tmp_path):
    cfg = load_config("checkerboard", overrides=["model.width=32", "model.depth=2",
                                                 "data.n_train=1000", "data.n_eval=100"])
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    torch.manual_seed(3)
    model = build_model(cfg, scales)
    with torch.no_grad():  # a non-trivial map: perturb the zero-initialised output layer
        model.net.out.weight.normal_(0, 0.3)
    save_model(tmp_path / "ck", model, None, cfg, scales, bundle.standardizer, step=7)
    loaded = load_model(tmp_path / "ck")
    x0 = loaded.interpolant.sample_base(torch.empty(256, 2), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.sample(x0, steps=3), loaded.model.sample(x0, steps=3))
    assert loaded.metadata["step"] == 7
    assert torch.allclose(loaded.interpolant.sigma0, torch.tensor(scales["sigma0"], dtype=torch.float64))


def test_user_data_file_is_standardised_and_samples_return_in_data_units(tmp_path):
    """A 3-D CSV far from the origin: the model trains on standardised data, the checkpoint keeps the
    statistics, and samples come back in data units (mean near the data's, not near 0)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 3, generator=g) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([100.0, -40.0, 3.0])
    csv = tmp_path / "points.csv"
    csv.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in data.tolist()))
    _ok(flowmaps("train", "--preset", "file", f"data.path={csv}", "--out", tmp_path / "run", "--quiet",
                 "train.steps=300", "model.width=64", "model.depth=2", "train.batch_size=256"))
    meta = json.loads((tmp_path / "run" / "checkpoints" / "final.json").read_text())
    assert meta["scales"]["dim"] == 3
    assert np.allclose(meta["standardizer"]["mean"], data.mean(0).tolist(), atol=0.5)
    _ok(flowmaps("sample", tmp_path / "run", "--steps", "8", "--n", "2000", "--out", tmp_path / "s"))
    x = np.load(tmp_path / "s" / "samples_rk48.npy")
    assert x.shape == (2000, 3)
    # In data units: means within a few data stds of the truth (an unstandardised model would sit near 0).
    assert np.allclose(x.mean(0), [100.0, -40.0, 3.0], atol=np.array([0.5, 2.5, 0.05]))


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"x,y\n1,2\n3,oops\n", "non-numeric value"),
    (b"1,2\n3\n", "different numbers of columns"),
    (b"1,2\nnan,4\n", "NaN or infinite"),
])
def test_bad_data_files_are_refused_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    r = flowmaps("train", "--preset", "file", f"data.path={path}", "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# A plain `pip install flowmaps` has no matplotlib and no POT (the eval extra): the entry point run
# with both made unimportable, as they are in a fresh venv without extras.
PLAIN = ("import sys; sys.modules.update(dict.fromkeys(['matplotlib', 'ot'], None)); "
         "from flowmaps.cli import main; sys.exit(main(sys.argv[1:]))")


def plain(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", PLAIN, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_the_main_job_runs_without_the_eval_extra(tmp_path):
    """train, distill, sample and export work (figures skipped with one warning naming the extra);
    evaluate and demo stop at once with one line naming it, writing nothing."""
    r = plain("train", "--preset", "gmm", "--out", tmp_path / "teacher", "--quiet", "train.steps=20",
              *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("flowmaps: warning")]
    assert len(warnings) == 1 and "matplotlib" in warnings[0] and "flowmaps[eval]" in warnings[0]
    assert (tmp_path / "teacher" / "checkpoints" / "final.json").is_file()
    assert not (tmp_path / "teacher" / "plots" / "loss.png").exists()
    _ok(plain("distill", "--preset", "gmm", "--teacher", tmp_path / "teacher", "--out",
              tmp_path / "lmd", "--quiet", "train.steps=20", *TINY))
    r = _ok(plain("sample", tmp_path / "lmd", "--n", "50", "--steps", "1,2", "--out", tmp_path / "s"))
    assert np.load(tmp_path / "s" / "samples_steps2.npy").shape == (50, 2)
    assert "matplotlib" in r.stderr and not (tmp_path / "s" / "samples.png").exists()
    _ok(plain("export", tmp_path / "lmd", tmp_path / "exported"))
    for argv in (["evaluate", tmp_path / "lmd", "--out", tmp_path / "eval"],
                 ["demo", "--out", tmp_path / "demo"]):
        r = plain(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "flowmaps[eval]" in lines[0] and "matplotlib" in lines[0] and "POT" in lines[0]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "demo").exists()
