"""Export and load: ``flowmaps export RUN DIR`` writes the map alone (model.safetensors + config.json),
``flowmaps.load`` / ``FlowMap.from_pretrained`` give back a ready FlowMap that samples bit for bit like
the run's EMA; bad folders and corrupted or malicious files are refused in one line, nothing is ever
unpickled, and nothing on disk is replaced without --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flowmaps as fm
from flowmaps.checkpoint import CheckpointError
from flowmaps.cli import main
from flowmaps.runs.models import load_model
from test_faults_input import _setitem

torch.set_num_threads(1)

TINY = ["model.width=16", "model.depth=2", "train.batch_size=32", "data.n_train=500", "data.n_eval=100",
        "train.steps=30", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An LMD map on the gmm preset, and a velocity on standardised 3-D data (data units matter)."""
    root = tmp_path_factory.mktemp("export_runs")
    rng = np.random.default_rng(0)
    np.save(root / "data3.npy", (rng.normal(size=(600, 3)) * [1.0, 5.0, 0.1] + [100, -40, 3])
            .astype(np.float32))
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(root / "lmd"),
                 *TINY]) == 0
    assert main(["train", "--preset", "file", f"data.path={root / 'data3.npy'}", "--out",
                 str(root / "vel3"), *TINY]) == 0
    for name in ("lmd", "vel3"):
        assert main(["export", str(root / name), str(root / f"{name}-export")]) == 0
    return SimpleNamespace(root=root, lmd=root / "lmd", vel3=root / "vel3",
                           lmd_export=root / "lmd-export", vel3_export=root / "vel3-export")


def base(model, n=200, seed=0):
    return model.interpolant.sample_base(torch.empty(n, *model.sample_shape),
                                         torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["lmd", "vel3"])
def test_exported_map_samples_exactly_like_the_run(runs, name):
    run, folder = getattr(runs, name), getattr(runs, f"{name}_export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    reference = load_model(run)  # the run's EMA weights
    loaded = {"load(DIR)": fm.load(folder), "from_pretrained(DIR)": fm.FlowMap.from_pretrained(folder),
              "load(DIR/config.json)": fm.load(folder / "config.json"), "load(RUN)": fm.load(run),
              "load(checkpoint)": fm.load(run / "checkpoints" / "final.json")}
    x0 = base(reference.model)
    with torch.no_grad():
        expected = {k: reference.to_data_units(reference.model.sample(x0, steps=k)) for k in (1, 3)}
        for how, model in loaded.items():
            assert isinstance(model, fm.FlowMap) and not model.training, how
            assert torch.equal(base(model), x0), how  # the same base distribution
            assert model.domain == reference.model.domain and model.sample_shape == (reference.scales["dim"],)
            for k, x in expected.items():
                assert torch.equal(model.to_data_units(model.sample(x0, steps=k)), x), (how, k)
    if name == "vel3":  # standardised data: samples come back in data units
        assert loaded["load(DIR)"].standardizer is not None
        assert abs(float(expected[1][:, 0].mean()) - 100.0) < 5.0
    # the weights file holds one set of weights and nothing of the training state
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == reference.model.state_dict().keys()
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "flowmaps-model" and config["format_version"] == 1
    assert config["weights"] == "ema" and config["library_version"] == fm.__version__
    assert config["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert config["domain"] == reference.model.domain and config["network"]["class"] == "MLP"
    assert config["trained"]["step"] == 30


def test_raw_weights_export(runs, tmp_path, capsys):
    assert main(["export", str(runs.lmd), str(tmp_path / "raw"), "--raw-weights"]) == 0
    assert "raw weights" in capsys.readouterr().out
    raw, ema = fm.load(tmp_path / "raw"), fm.load(runs.lmd_export)
    reference = load_model(runs.lmd, use_ema=False).model
    x0 = base(raw)
    with torch.no_grad():
        assert torch.equal(raw.sample(x0), reference.sample(x0))
        assert not torch.equal(raw.sample(x0), ema.sample(x0))  # the EMA is another set of weights
    assert fm.load(runs.lmd, use_ema=False).state_dict().keys() == raw.state_dict().keys()


def test_a_class_conditional_unet_round_trips(tmp_path):
    torch.manual_seed(0)
    net = fm.UNet((1, 8, 8), channels=8, channel_mults=(1, 2), blocks_per_level=1,
                  attention_resolutions=(4,), num_classes=3, sigma_data=0.6)
    model = fm.FlowMap(net)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.interpolant, model.domain = fm.Trigonometric(0.8), "square"
    model.sample_shape = (1, 8, 8)
    model.save_pretrained(tmp_path / "u")
    again = fm.FlowMap.from_pretrained(tmp_path / "u")
    assert isinstance(again.net, fm.UNet) and again.num_classes == 3 and again.domain == "square"
    assert again.interpolant.name == "trigonometric" and float(again.interpolant.sigma0) == pytest.approx(0.8)
    x0, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        assert torch.equal(model.sample(x0, steps=2, cond=labels), again.sample(x0, steps=2, cond=labels))
        assert torch.equal(model.inverse(x0, steps=2), again.inverse(x0, steps=2))


def test_what_cannot_be_saved_is_refused(tmp_path):
    class Plain(torch.nn.Module):  # not registered: its constructor arguments are unknown
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x, s, t):
            return self.lin(torch.cat([x, s[:, None], t[:, None]], 1))

    with pytest.raises(ValueError, match="register"):
        fm.FlowMap(Plain()).save_pretrained(tmp_path / "a", interpolant=fm.Linear())
    model = fm.FlowMap(fm.MLP(2, width=8, depth=1))
    with pytest.raises(ValueError, match="interpolant"):
        model.save_pretrained(tmp_path / "b")  # no interpolant known
    custom = fm.Custom(lambda t: 1 - t, lambda t: t)
    with pytest.raises(ValueError, match="interpolant"):
        model.save_pretrained(tmp_path / "c", interpolant=custom)
    assert not any((tmp_path / d).exists() for d in "abc")


# --- the output folder -----------------------------------------------------------------------------

def test_export_never_replaces_files_without_overwrite(runs, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(runs.lmd_export, folder)
    (folder / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["export", str(runs.vel3), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(runs.lmd), str(tmp_path / "afile")]) == 2
    assert main(["export", str(runs.lmd), str(tmp_path / "afile" / "sub")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # --overwrite replaces the two files of the export and keeps the rest
    assert main(["export", str(runs.vel3), str(folder), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine\n"
    assert fm.load(folder).sample_shape == (3,)


def test_a_bad_source_writes_nothing(runs, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    for source in (evil, tmp_path / "nowhere", runs.lmd_export):
        assert main(["export", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowmaps: error:"), err
    assert not (tmp_path / "out").exists() and not marker.exists()


# --- corrupted and malicious exports -----------------------------------------------------------------

class Evil:
    """Unpickling this creates ``marker``: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _edit(key_path, value):
    """Set (or, with ``KeyError``, delete) one key of config.json."""
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        _setitem(key_path, value)(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _weights(edit_tensors):
    """Change the weights and record their new checksum (a consistent but wrong export)."""
    def edit(folder):
        tensors = load_file(str(folder / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        _edit(["weights_sha256"], digest)(folder)
    return edit


def _nan(tensors):
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone().fill_(float("nan"))


def _flip(folder, name="model.safetensors"):
    raw = bytearray((folder / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(raw))


CORRUPTIONS = {
    "weights-truncated": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:100]), ["model.safetensors", "corrupted"]),
    "weights-flipped": (_flip, ["model.safetensors", "checksum"]),
    "weights-of-another-export": (None, ["model.safetensors", "checksum"]),  # vel3's weights
    "weights-nan": (_weights(_nan), ["model.safetensors", "NaN"]),
    "weights-missing-tensor": (_weights(lambda t: t.pop(sorted(t)[0])), ["model.safetensors",
                                                                          "do not match"]),
    "weights-pickle": (lambda f: (f / "model.safetensors").write_bytes(
        pickle.dumps(Evil(f.parent / "pwned"))), ["model.safetensors", "pickle"]),
    "weights-torch-save": (lambda f: torch.save(Evil(f.parent / "pwned"), f / "model.safetensors"),
                           ["model.safetensors", "zip"]),
    "weights-gone": (lambda f: (f / "model.safetensors").unlink(), ["model.safetensors", "not found"]),
    "config-gone": (lambda f: (f / "config.json").unlink(), ["config.json", "not found"]),
    "config-truncated": (lambda f: (f / "config.json").write_text((f / "config.json").read_text()[:40]),
                         ["config.json", "not valid JSON"]),
    "config-pickle": (lambda f: (f / "config.json").write_bytes(pickle.dumps(Evil(f.parent / "pwned"))),
                      ["config.json", "pickle"]),
    "config-a-checkpoint": (_edit(["format"], "flowmaps-checkpoint"), ["config.json", "not a flowmaps "
                                                                                        "exported model"]),
    "format-newer": (_edit(["format_version"], 2), ["config.json", "format 2", "upgrade"]),
    "sha-missing": (_edit(["weights_sha256"], KeyError), ["config.json", "weights_sha256"]),
    "network-unknown": (_edit(["network", "class"], "Transformer"), ["config.json", "Transformer"]),
    "network-bad-option": (_edit(["network", "options", "width"], -4), ["config.json", "rebuild"]),
    "network-unknown-option": (_edit(["network", "options", "wdth"], 4), ["config.json", "rebuild"]),
    "network-wider": (_edit(["network", "options", "width"], 32), ["model.safetensors", "do not match"]),
    "interpolant-unknown": (_edit(["interpolant", "name"], "cosine"), ["config.json", "cosine"]),
    "interpolant-negative": (_edit(["interpolant", "sigma0"], -1.0), ["config.json", "sigma0"]),
    "domain-bad": (_edit(["domain"], "circle"), ["config.json", "domain"]),
    "scales-bad": (_edit(["scales", "dim"], 0), ["config.json", "scales.dim"]),
    "standardizer-bad": (_edit(["standardizer"], {"mean": [0.0]}), ["config.json", "standardizer"]),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_export_is_refused_in_one_line(runs, tmp_path, corruption):
    folder = tmp_path / "bad"
    shutil.copytree(runs.lmd_export, folder)
    corrupt, words = CORRUPTIONS[corruption]
    if corruption == "weights-of-another-export":
        shutil.copy(runs.vel3_export / "model.safetensors", folder / "model.safetensors")
    else:
        corrupt(folder)
    for load in (fm.load, fm.FlowMap.from_pretrained):
        with pytest.raises(CheckpointError) as err:
            load(folder)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


def test_from_pretrained_wants_an_exported_folder(runs):
    with pytest.raises(CheckpointError, match="config.json not found") as err:
        fm.FlowMap.from_pretrained(runs.lmd)  # a run directory: use flowmaps.load
    assert "flowmaps export" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        fm.FlowMap.from_pretrained(runs.root / "nowhere")


# --- every command takes the three kinds of model path (issue 17 part 4) ---------------------------

KINDS = {"run": lambda r: r.lmd, "checkpoint": lambda r: r.lmd / "checkpoints" / "final.json",
         "export": lambda r: r.lmd_export}


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sample_takes_a_run_a_checkpoint_or_an_export(runs, tmp_path, kind):
    """The same samples (the EMA weights, in data units) from each kind of path; without --out an
    export's samples go in its folder."""
    out = tmp_path / kind
    assert main(["sample", str(KINDS[kind](runs)), "--n", "300", "--steps", "1,2", "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    if not ref.exists():
        assert main(["sample", str(runs.lmd), "--n", "300", "--steps", "1,2", "--out", str(ref)]) == 0
    for k in (1, 2):
        assert np.array_equal(np.load(out / f"samples_steps{k}.npy"), np.load(ref / f"samples_steps{k}.npy"))


def test_sample_export_dir_writes_into_the_export_and_never_replaces(runs, tmp_path, capsys):
    folder = tmp_path / "exp"
    shutil.copytree(runs.vel3_export, folder)
    assert main(["sample", str(folder), "--n", "50", "--steps", "2"]) == 0  # a velocity export: RK4
    x = np.load(folder / "samples" / "samples_rk42.npy")
    reference = load_model(runs.vel3)
    x0 = reference.interpolant.sample_base(torch.empty(50, 3), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.to_data_units(fm.solve_ode(reference.model.velocity, x0, "rk4", steps=2).x)
    assert np.array_equal(x, expected.numpy())
    before = _files(folder)
    capsys.readouterr()
    assert main(["sample", str(folder), "--n", "50", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert _files(folder) == before


@pytest.mark.parametrize("kind", list(KINDS))
def test_evaluate_takes_a_run_a_checkpoint_or_an_export(runs, tmp_path, kind):
    """The same table rows (the map's, and the exact teacher's the export records) from each kind."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(KINDS[kind](runs)), "--out", str(out), "--steps", "1,2", "--n", "400",
                 "--no-dopri5"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    ref = load_model(runs.lmd)
    x0 = ref.interpolant.sample_base(torch.empty(400, 2), torch.Generator().manual_seed(ref.config.eval.seed))
    from flowmaps.exact import GaussianMixture

    spec = ref.config.data.gmm
    gmm = GaussianMixture(spec.means, covs=spec.covs, weights=spec.weights, interpolant=ref.interpolant)
    with torch.no_grad():
        expected = float((ref.model.sample(x0, steps=1).double() - gmm.flow(x0.double(), 0.0, 1.0))
                         .norm(dim=1).mean())
    one = [r for r in rows if r["sampler"] == "flow map" and r["steps"] == 1]
    assert len(one) == 1 and one[0]["map_error"] == pytest.approx(expected, rel=1e-5)
    assert any(r["method"] == "exact velocity" for r in rows)


@pytest.mark.parametrize("kind", list(KINDS))
def test_tune_grid_takes_a_run_a_checkpoint_or_an_export(runs, tmp_path, kind):
    """The same tuned grid from each kind, stored in the run (run, checkpoint) or the export's folder;
    `sample --grid tuned` reads it back from there."""
    root = tmp_path / "copy"
    shutil.copytree(runs.root / "lmd", root / "lmd")
    shutil.copytree(runs.lmd_export, root / "lmd-export")
    copy = SimpleNamespace(lmd=root / "lmd", lmd_export=root / "lmd-export")
    path = KINDS[kind](copy)
    assert main(["tune-grid", str(path), "--steps", "2", "--n", "128", "--iters", "10", "--quiet"]) == 0
    home = copy.lmd_export if kind == "export" else copy.lmd
    grids = json.loads((home / "tuned_grids.json").read_text())
    assert grids["reference"] == "exact flow map"
    other = tmp_path / "other"
    shutil.copytree(runs.lmd_export if kind != "export" else runs.root / "lmd", other)
    assert main(["tune-grid", str(other), "--steps", "2", "--n", "128", "--iters", "10", "--quiet"]) == 0
    assert json.loads((other / "tuned_grids.json").read_text())["grids"] == grids["grids"]
    assert main(["sample", str(path), "--grid", "tuned", "--steps", "2", "--n", "20", "--out",
                 str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("command", [["sample"], ["evaluate"], ["tune-grid"]])
@pytest.mark.parametrize("bad, message", [("nowhere", "checkpoint not found"),
                                          ("notes.txt", "not a flowmaps checkpoint"),
                                          ("empty", "neither a run directory"),
                                          ("half", "config.json not found")])
def test_each_bad_model_path_is_one_line(runs, tmp_path, capsys, command, bad, message):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    shutil.copy(runs.lmd_export / "model.safetensors", tmp_path / "half")
    before = _files(tmp_path)
    out = ["--out", str(tmp_path / "out")] if command[0] != "tune-grid" else []
    assert main([*command, str(tmp_path / bad), *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowmaps: error:") and message in err[0], err
    assert _files(tmp_path) == before


def test_exports_without_a_recorded_run_config(runs, tmp_path, capsys):
    """An export written before the run config was recorded is read through its preset; one made by
    FlowMap.save_pretrained records nothing: sample works, evaluate names what is missing in one line
    and works once the data is given as overrides."""
    old = tmp_path / "old"
    shutil.copytree(runs.lmd_export, old)
    config = json.loads((old / "config.json").read_text())
    config.pop("run_config")
    (old / "config.json").write_text(json.dumps(config))
    assert load_model(old).config_source == "preset"
    assert main(["evaluate", str(old), "--out", str(tmp_path / "e1"), "--steps", "1", "--n", "200",
                 "--no-dopri5"]) == 0
    bare = tmp_path / "bare"
    fm.load(runs.lmd_export).save_pretrained(bare)
    assert load_model(bare).config_source is None
    assert main(["sample", str(bare), "--n", "20", "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(bare), "--out", str(tmp_path / "e2"), "--steps", "1", "--n", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no training config" in err[0] and "data.name" in err[0]
    assert not (tmp_path / "e2").exists()
    assert main(["evaluate", str(bare), "--out", str(tmp_path / "e2"), "--steps", "1", "--n", "200",
                 "--no-dopri5", "--teacher", "exact", "data.name=gmm"]) == 0
    rows = json.loads((tmp_path / "e2" / "results.json").read_text())["rows"]
    assert any(r["method"] == "exact velocity" for r in rows)
    capsys.readouterr()
    assert main(["evaluate", str(runs.lmd), "--out", str(tmp_path / "e3"), "data.name=gmm"]) == 2
    assert "apply to exported models" in capsys.readouterr().err
