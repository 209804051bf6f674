"""Fault injection, bad input: every bad config, data file, checkpoint or output directory given to the
real entry point (``flowmaps.cli.main``, in-process) must give

* a non-zero exit (2, the CLI's status for input errors),
* exactly one line on stderr, ``flowmaps: error: ...``, naming the problem (the key, the file, 'NaN', ...),
  and no traceback,
* nothing on disk changed: every path under the test's folder (the working directory, where a default
  ``runs/`` would land) and under the shared trained runs, with its bytes and mtime, is identical before
  and after the command.

No pickle anywhere: malicious pickles (whose unpickling would create a marker directory) are offered as
checkpoints, data and config, and must be refused without being executed; a static guard scans the
package for unsafe loaders.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowmaps.checkpoint import CheckpointError, load_checkpoint
from flowmaps.cli import main
from flowmaps.runs.models import load_model, save_model
from flowmaps.runs.config import ConfigError, load_config

torch.set_num_threads(1)

TINY = ["model.width=16", "model.depth=2", "train.steps=20", "train.batch_size=64", "train.log_every=10",
        "data.n_train=2000", "data.n_eval=500", "eval.n_samples=200", "eval.w2_samples=100",
        "eval.energy_samples=100", "--quiet"]
SRC = Path(__file__).resolve().parents[1] / "src" / "flowmaps"


# --- helpers --------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` (and the roots): file type, size, mtime_ns and a SHA-256 of its bytes."""
    state = {}
    for root in roots:
        for p in [Path(root), *sorted(Path(root).rglob("*"))]:
            st = p.lstat()
            digest = (hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None)
            state[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return state


def _diff(before: dict, after: dict) -> list[str]:
    added = [f"+ {p}" for p in after if p not in before]
    removed = [f"- {p}" for p in before if p not in after]
    changed = [f"~ {p}" for p in before if p in after and before[p] != after[p]]
    return added + removed + changed


def run(argv, capsys) -> tuple[int, str, str]:
    """``flowmaps ARGV`` in-process; argparse's SystemExit is turned into its status."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run every command from the test's folder: a default ``runs/...`` would land (and be seen) here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def refused(capsys, tmp_path, runs):
    """``refused(argv, *words)``: exit 2, one ``flowmaps: error:`` line holding every word, no traceback,
    nothing printed on stdout, and no change under the test folder or the shared runs."""

    def check(argv, *words, extra_roots=()):
        roots = (tmp_path, runs.root, *extra_roots)
        before = snapshot(*roots)
        rc, out, err = run(argv, capsys)
        after = snapshot(*roots)
        assert "Traceback" not in out + err, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("flowmaps: error: "), f"stderr was: {err!r}"
        assert rc == 2, (rc, err)
        for word in words:
            assert str(word) in lines[0], f"{word!r} not named in: {lines[0]}"
        assert out == "", f"stdout was: {out!r}"
        assert _diff(before, after) == [], f"disk changed: {_diff(before, after)[:10]}"
        return lines[0]

    return check


class Evil:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_pickle(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    return pickle.dumps(Evil(marker), protocol=protocol)


def test_the_malicious_payload_is_live(tmp_path):
    """Control for every refusal below: unpickling the payload really does run code (all protocols)."""
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        marker = tmp_path / f"pwned{protocol}"
        pickle.loads(evil_pickle(marker, protocol))
        assert marker.is_dir()


# --- trained runs shared by the module --------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-D velocity teacher (gmm), a 3-D velocity teacher (file data) and a 2-D LMD map distilled from
    the 2-D teacher, all tiny, made through the real command."""
    root = tmp_path_factory.mktemp("faults_runs")
    rng = np.random.default_rng(0)
    np.save(root / "data3.npy", rng.normal(size=(600, 3)).astype(np.float32))
    np.save(root / "data2.npy", rng.normal(size=(600, 2)).astype(np.float32))
    np.save(root / "data1.npy", rng.normal(size=600).astype(np.float32))  # 1-D: one feature

    def train(*argv):
        assert main([str(a) for a in argv] + TINY) == 0

    train("train", "--preset", "gmm", "--out", root / "teacher2")
    train("train", "--preset", "file", f"data.path={root / 'data3.npy'}", "--out", root / "teacher3")
    train("distill", "--preset", "gmm", "--teacher", root / "teacher2", "--out", root / "lmd2")
    return SimpleNamespace(root=root, teacher2=root / "teacher2", teacher3=root / "teacher3",
                           lmd2=root / "lmd2", data1=root / "data1.npy", data2=root / "data2.npy",
                           data3=root / "data3.npy")


def test_the_shared_runs_are_good(runs, capsys, tmp_path):
    """Positive control: the untouched checkpoints load and sample (each refusal below is the fault's)."""
    assert load_model(runs.lmd2).scales["dim"] == 2
    assert load_model(runs.teacher3).scales["dim"] == 3
    rc, out, err = run(["sample", runs.lmd2, "--n", "20", "--steps", "1", "--out", tmp_path / "s"], capsys)
    assert rc == 0 and (tmp_path / "s" / "samples_steps1.npy").is_file(), err


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["train.stepz=3"], ["unknown key", "stepz", "train"]),
    (["trian.steps=3"], ["unknown key", "trian"]),
    (["model.widht=8"], ["unknown key", "widht", "model"]),
    (["train.steps=abc"], ["train.steps", "expected an integer"]),
    (["train.steps=2.5"], ["train.steps", "expected an integer"]),
    (["train.lr=fast"], ["train.lr", "expected a number"]),
    (["data.standardize=maybe"], ["data.standardize", "true or false"]),
    (["eval.steps=4"], ["eval.steps", "expected a list"]),
    (["eval.steps=1,0,4"], ["eval.steps", "positive integers"]),
    (["eval.steps=1,two"], ["eval.steps", "positive integers"]),
    (["eval.solvers=euler,rk45"], ["eval.solvers", "rk45"]),
    (["train=5"], ["train", "expected a mapping"]),
    (["train.steps=-5"], ["train.steps", "must be > 0", "-5"]),
    (["train.steps=0"], ["train.steps", "must be > 0"]),
    (["train.lr=0"], ["train.lr", "must be > 0"]),
    (["train.lr=-1e-3"], ["train.lr", "must be > 0"]),
    (["train.lr=.inf"], ["train.lr", "finite"]),
    (["train.lr=.nan"], ["train.lr", "finite"]),
    (["train.ema_decay=1"], ["train.ema_decay", "[0, 1)"]),
    (["train.ema_decay=1.5"], ["train.ema_decay", "[0, 1)"]),
    (["train.ema_decay=-0.1"], ["train.ema_decay", "[0, 1)"]),
    (["train.batch_size=0"], ["train.batch_size", "must be > 0"]),
    (["train.weight_decay=-1"], ["train.weight_decay", ">= 0"]),
    (["train.grad_clip=0"], ["train.grad_clip", "must be > 0"]),
    (["train.threads=-2"], ["train.threads", "must be > 0"]),
    (["train.device=tpu"], ["train.device", "tpu"]),
    (["train.optimizer=sgd"], ["train.optimizer", "sgd"]),
    (["model.width=0"], ["model.width", "must be > 0"]),
    (["model.depth=-1"], ["model.depth", "must be > 0"]),
    (["model.activation=relu6"], ["model.activation", "relu6"]),
    (["data.n_train=0"], ["data.n_train", "must be > 0"]),
    (["data.name=imagenet"], ["data.name", "imagenet"]),
    (["data.name=file"], ["data.path", "required"]),
    (["interpolant.sigma0=-1"], ["interpolant.sigma0", "positive"]),
    (["interpolant.sigma0=wide"], ["interpolant.sigma0", "wide"]),
    (["eval.steps=[0, 2]"], ["eval.steps", "positive integers"]),
    (["eval.solvers=[rk45]"], ["eval.solvers", "rk45"]),
    (["objective.initial_range=2"], ["objective.initial_range", "(0, 1]"]),
    (["objective.invertibility_weight=-1"], ["objective.invertibility_weight", ">= 0"]),
    (["preset=../../escape"], ["preset", "../../escape"]),
    (["data.name=gmm", "data.gmm.means=[[a, b]]"], ["data.gmm"]),
    (["data.name=gmm", "data.gmm.weights=[1.0]"], ["data.gmm"]),
])
def test_bad_config_override(refused, overrides, words):
    refused(["train", *overrides, "--quiet"], *words)


@pytest.mark.parametrize("text, words", [
    ("train:\n  stepz: 3\n", ["cfg.yaml", "unknown key", "stepz"]),
    ("bogus_section: {a: 1}\n", ["cfg.yaml", "unknown key", "bogus_section"]),
    ("train:\n  steps: many\n", ["cfg.yaml", "train.steps", "expected an integer"]),
    ("model: 7\n", ["cfg.yaml", "model", "expected a mapping"]),
    ("train:\n  lr: -1\n", ["train.lr", "must be > 0"]),
    ("train:\n  ema_decay: 1.0\n", ["train.ema_decay", "[0, 1)"]),
    ("train: {steps: 3\n", ["cfg.yaml", "not valid YAML", "line"]),
    ("train:\n  steps: 3\n    lr: 2\n", ["cfg.yaml", "not valid YAML"]),
    ("- train\n- model\n", ["cfg.yaml", "expected a mapping"]),
])
def test_bad_config_file(refused, tmp_path, text, words):
    (tmp_path / "cfg.yaml").write_text(text)
    refused(["train", "--config", tmp_path / "cfg.yaml", "--quiet"], *words)


def test_config_file_missing_directory_or_binary(refused, tmp_path):
    refused(["train", "--config", tmp_path / "nope.yaml"], "config file not found", "nope.yaml")
    (tmp_path / "adir").mkdir()
    refused(["train", "--config", tmp_path / "adir"], "config file not found", "adir")
    (tmp_path / "bin.yaml").write_bytes(b"\x93NUMPY\xff\xfe\x00\x01")
    refused(["train", "--config", tmp_path / "bin.yaml"], "bin.yaml", "UTF-8")


def test_config_yaml_python_tag_is_refused_not_executed(refused, tmp_path):
    marker = tmp_path / "pwned_by_yaml"
    (tmp_path / "evil.yaml").write_text(f"train: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    refused(["train", "--config", tmp_path / "evil.yaml"], "evil.yaml", "not valid YAML")
    assert not marker.exists()


def test_missing_preset(refused):
    refused(["presets", "--show", "nope"], "unknown preset", "nope")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


@pytest.mark.parametrize("argv, words", [
    (["train", "--preset", "nope"], ["--preset", "nope"]),
    (["sample", "somewhere", "--steps", "0"], ["--steps"]),
    (["train", "--bogus-flag"], ["--bogus-flag"]),
])
def test_argument_errors_are_one_line(refused, argv, words):
    refused(argv, *words)


@pytest.mark.parametrize("command, n", [("sample", "-3"), ("sample", "0"), ("sample", "many"),
                                        ("evaluate", "-1")])
def test_a_bad_sample_count_is_one_line(refused, runs, command, n):
    """``flowmaps sample RUN --n -3`` (a real run): one line naming --n, nothing written."""
    refused([command, runs.lmd2, "--n", n], "--n", n)


# --- data -----------------------------------------------------------------------------------------

def _write(path: Path, content) -> Path:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    return path


def _npy_bytes(arr) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


NAN = np.ones((50, 2))
NAN[3, 1] = np.nan
INF = np.ones((50, 2))
INF[7, 0] = -np.inf


@pytest.mark.parametrize("name, content, words", [
    ("empty.npy", b"", ["empty file"]),
    ("empty.csv", b"", ["empty file"]),
    ("blank.csv", b"\n   \n\n", ["empty file"]),
    ("header_only.csv", b"x,y\n", ["no data rows"]),
    ("zero_rows.npy", np.zeros((0, 2)), ["no data", "(0, 2)"]),
    ("one_row.npy", np.zeros((1, 2)), ["1 row", "at least 2"]),
    ("cube.npy", np.zeros((10, 3, 2)), ["expected a 2-D array", "(10, 3, 2)"]),
    ("scalar.npy", np.array(1.0), ["expected a 2-D array"]),
    ("nan.npy", NAN, ["NaN", "1 NaN"]),
    ("inf.npy", INF, ["infinite", "1 infinite"]),
    ("nan.csv", b"1,2\nnan,4\n5,6\n", ["NaN", "1 NaN"]),
    ("inf.csv", b"1,2\n3,inf\n5,6\n", ["infinite"]),
    ("overflow.csv", b"1,2\n3,1e999\n5,6\n", ["infinite"]),
    ("words.csv", b"x,y\n1,2\n3,oops\n", ["non-numeric value", "line 3"]),
    ("semicolons.csv", b"1;2\n3;4\n", ["non-numeric value", "comma"]),
    ("ragged.csv", b"1,2\n3\n", ["different numbers of columns"]),
    ("latin1.csv", b"x,y\n1,2\n\xe9,3\n", ["not a UTF-8"]),
    ("strings.npy", np.array([["a", "b"]]), ["not real numeric"]),
    ("complex.npy", np.ones((4, 2), dtype=complex), ["not real numeric"]),
    ("truncated.npy", _npy_bytes(np.ones((100, 2)))[:200], ["not a valid .npy"]),
    ("garbage.npy", b"definitely not numpy", ["not a valid .npy"]),
    ("archive.npy", b"PK\x03\x04" + b"\x00" * 40, ["zip"]),
    ("data.txt", b"1,2\n3,4\n", ["unsupported file type", ".txt"]),
    ("data", b"1,2\n3,4\n", ["unsupported file type"]),
])
def test_bad_data_file(refused, tmp_path, name, content, words):
    path = _write(tmp_path / name, content)
    refused(["train", "--preset", "file", f"data.path={path}", "--quiet"], name, *words)


def test_data_file_missing_or_a_directory(refused, tmp_path):
    refused(["train", "--preset", "file", f"data.path={tmp_path / 'gone.npy'}"], "data file not found",
            "gone.npy")
    (tmp_path / "folder.csv").mkdir()
    refused(["train", "--preset", "file", f"data.path={tmp_path / 'folder.csv'}"], "folder.csv",
            "not a regular file")


@pytest.mark.parametrize("kind", ["pickle", "object-array"])
def test_pickled_data_is_refused_not_executed(refused, tmp_path, kind):
    marker = tmp_path / "pwned_by_data"
    path = tmp_path / "evil.npy"
    if kind == "pickle":
        path.write_bytes(evil_pickle(marker))
    else:
        np.save(path, np.array([Evil(marker), Evil(marker)], dtype=object), allow_pickle=True)
    refused(["train", "--preset", "file", f"data.path={path}"], "evil.npy", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("teacher, data, words", [
    ("teacher2", "data3", ["teacher has dimension 2", "the data has 3"]),
    ("teacher2", "data1", ["teacher has dimension 2", "the data has 1"]),
    ("teacher3", None, ["teacher has dimension 3", "the data has 2"]),  # gmm data: 2-D
])
def test_distill_refuses_data_of_another_dimension_before_any_run_dir(refused, runs, teacher, data,
                                                                     words):
    data_args = ["--preset", "file", f"data.path={getattr(runs, data)}"] if data else ["--preset", "gmm"]
    refused(["distill", "--teacher", getattr(runs, teacher), *data_args, *TINY], *words)


def test_evaluate_refuses_a_teacher_of_another_dimension(refused, runs):
    refused(["evaluate", runs.lmd2, "--teacher", runs.teacher3, "--n", "50", "--steps", "1",
             "--no-dopri5"], "teacher has dimension 3", "dimension 2")


def test_evaluate_refuses_a_data_file_that_no_longer_matches(refused, runs, tmp_path):
    """The checkpoint's data file now holds 3-D points while its model is 2-D."""
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "moved")
    meta = json.loads(stem.with_name("ck.json").read_text())
    meta["config"]["data"].update(name="file", path=str(runs.data3))
    stem.with_name("ck.json").write_text(json.dumps(meta))
    refused(["evaluate", stem, "--n", "50", "--steps", "1", "--no-dopri5", "--teacher", runs.teacher2],
            "data has dimension 3", "dimension 2")


@pytest.mark.parametrize("data, words", [
    ("data3", ["dimension 3", "dimension 2"]),
    ("missing", ["data file not found", "missing.npy"]),
    ("nan", ["NaN"]),
])
def test_sample_refuses_bad_plot_data_before_writing(refused, runs, tmp_path, data, words):
    path = {"data3": runs.data3, "missing": tmp_path / "missing.npy",
            "nan": _write(tmp_path / "nan.npy", NAN)}[data]
    refused(["sample", runs.lmd2, "--data", path, "--n", "20", "--steps", "1", "--out", tmp_path / "s"],
            *words)


# --- checkpoints ----------------------------------------------------------------------------------

def _copy_checkpoint(run_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(run_dir / "checkpoints" / f"final{suffix}", dest / f"ck{suffix}")
    return dest / "ck"


def _edit_json(stem: Path, edit) -> None:
    path = stem.with_name(stem.name + ".json")
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _flip(path: Path, start: int, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def _nan_weights(stem: Path) -> None:
    """Valid safetensors (and a matching checksum) whose weights hold a NaN."""
    from safetensors.torch import load, save

    weights = stem.with_name(stem.name + ".safetensors")
    flat = load(weights.read_bytes())
    key = next(k for k in flat if flat[k].is_floating_point())
    flat[key] = flat[key].clone()
    flat[key].view(-1)[0] = float("nan")
    blob = save(flat)
    weights.write_bytes(blob)
    _edit_json(stem, lambda m: m.update(weights_sha256=hashlib.sha256(blob).hexdigest()))


def _setitem(path: list, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


J, W = ".json", ".safetensors"
CORRUPTIONS = {  # name: (what to do to the checkpoint STEM, words the error must hold)
    "weights-truncated-100": (lambda s, r: _trunc(s, W, 100), ["ck.safetensors", "corrupted"]),
    "weights-truncated-half": (lambda s, r: _trunc(s, W, 0.5), ["ck.safetensors", "corrupted"]),
    "weights-empty": (lambda s, r: _trunc(s, W, 0), ["ck.safetensors", "corrupted"]),
    "weights-header-flipped": (lambda s, r: _flip(_f(s, W), 8), ["ck.safetensors", "corrupted"]),
    "weights-length-flipped": (lambda s, r: _flip(_f(s, W), 0, 8), ["ck.safetensors", "corrupted"]),
    "weights-data-flipped": (lambda s, r: _flip(_f(s, W), _f(s, W).stat().st_size // 2),
                             ["ck.safetensors", "checksum"]),
    "weights-from-another-run": (lambda s, r: shutil.copy(r.teacher3 / "checkpoints/final.safetensors",
                                                          _f(s, W)), ["ck.safetensors", "checksum"]),
    "weights-nan": (lambda s, r: _nan_weights(s), ["ck.safetensors", "NaN"]),
    "json-truncated": (lambda s, r: _trunc(s, J, 0.5), ["ck.json", "not valid JSON"]),
    "json-empty": (lambda s, r: _trunc(s, J, 0), ["ck.json", "not valid JSON"]),
    "json-binary": (lambda s, r: _f(s, J).write_bytes(b"\xff\xfe\x00\x01garbage"),
                    ["ck.json", "not valid JSON"]),
    "json-not-a-checkpoint": (lambda s, r: _f(s, J).write_text('{"hello": "world"}'),
                              ["ck.json", "not a flowmaps checkpoint"]),
    "json-a-list": (lambda s, r: _f(s, J).write_text("[1, 2, 3]"),
                    ["ck.json", "not a flowmaps checkpoint"]),
    "format-newer": (lambda s, r: _edit_json(s, lambda m: m.update(format_version=2,
                                                                   library_version="2.0.0")),
                     ["ck.json", "format 2", "2.0.0", "upgrade"]),
    "format-older": (lambda s, r: _edit_json(s, _setitem(["format_version"], 0)), ["ck.json", "format 0"]),
    "format-string": (lambda s, r: _edit_json(s, _setitem(["format_version"], "1")),
                      ["ck.json", "format_version"]),
    "format-bool": (lambda s, r: _edit_json(s, _setitem(["format_version"], True)),
                    ["ck.json", "format_version"]),
    "format-missing": (lambda s, r: _edit_json(s, _setitem(["format_version"], KeyError)),
                       ["ck.json", "format_version"]),
    "arch-width": (lambda s, r: _edit_json(s, _setitem(["config", "model", "width"], 32)),
                   ["ck", "weights do not match the architecture"]),
    "arch-depth": (lambda s, r: _edit_json(s, _setitem(["config", "model", "depth"], 3)),
                   ["ck", "weights do not match the architecture"]),
    "arch-frequencies": (lambda s, r: _edit_json(s, _setitem(["config", "model", "n_frequencies"], 4)),
                         ["ck", "weights do not match the architecture"]),
    "arch-dim": (lambda s, r: (_edit_json(s, _setitem(["scales", "dim"], 3)),
                               _edit_json(s, _setitem(["scales", "shape"], [3]))),
                 ["ck", "weights do not match the architecture"]),
    "shape-inconsistent": (lambda s, r: _edit_json(s, _setitem(["scales", "dim"], 3)),
                           ["ck.json", "scales.shape"]),
    "dim-missing": (lambda s, r: _edit_json(s, _setitem(["scales", "dim"], KeyError)),
                    ["ck.json", "scales.dim"]),
    "dim-not-int": (lambda s, r: _edit_json(s, _setitem(["scales", "dim"], "two")),
                    ["ck.json", "scales.dim"]),
    "scales-missing": (lambda s, r: _edit_json(s, _setitem(["scales"], KeyError)), ["ck.json", "scales"]),
    "sigma-data-bad": (lambda s, r: _edit_json(s, _setitem(["scales", "sigma_data"], "x")),
                       ["ck.json", "scales.sigma_data"]),
    "config-missing": (lambda s, r: _edit_json(s, _setitem(["config"], KeyError)), ["ck.json", "config"]),
    "config-unknown-key": (lambda s, r: _edit_json(s, _setitem(["config", "train", "stepz"], 3)),
                           ["ck.json", "stepz"]),
    "config-bad-value": (lambda s, r: _edit_json(s, _setitem(["config", "model", "activation"], "relu9")),
                         ["ck.json", "model.activation"]),
    "standardizer-bad": (lambda s, r: _edit_json(s, _setitem(["standardizer"], {"mean": [0.0]})),
                         ["ck.json", "standardizer"]),
    "groups-extra": (lambda s, r: _edit_json(s, _setitem(["groups"], ["ema", "model", "optimizer"])),
                     ["ck.safetensors", "missing weight groups", "optimizer"]),
    "json-missing": (lambda s, r: _f(s, J).unlink(), ["not found", "ck.json"]),
    "weights-missing": (lambda s, r: _f(s, W).unlink(), ["not found", "ck.safetensors"]),
    "weights-a-zip": (lambda s, r: torch.save({"w": torch.zeros(3)}, _f(s, W)), ["ck.safetensors", "zip"]),
    "weights-an-npy": (lambda s, r: np.save(_f(s, W), np.zeros(3)) or _npy_rename(s),
                       ["ck.safetensors", ".npy"]),
}


def _f(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _trunc(stem: Path, suffix: str, keep) -> None:
    path = _f(stem, suffix)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])


def _npy_rename(stem: Path) -> None:  # np.save appends .npy
    weights = _f(stem, W)
    weights.with_name(weights.name + ".npy").replace(weights)


# Which checkpoint each command is given, and its arguments around it.
COMMANDS = {
    "sample": ("lmd2", lambda ck: ["sample", ck, "--n", "20", "--steps", "1"]),
    "evaluate": ("lmd2", lambda ck: ["evaluate", ck, "--n", "50", "--steps", "1", "--no-dopri5"]),
    "distill": ("teacher2", lambda ck: ["distill", "--preset", "gmm", "--teacher", ck, *TINY]),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_checkpoint_is_refused(refused, runs, tmp_path, command, corruption):
    source, argv = COMMANDS[command]
    stem = _copy_checkpoint(getattr(runs, source), tmp_path / "bad")
    corrupt, words = CORRUPTIONS[corruption]
    corrupt(stem, runs)
    refused(argv(stem), *words)


def test_missing_checkpoint(refused, tmp_path):
    refused(["sample", tmp_path / "nowhere" / "final", "--n", "10"], "checkpoint not found", "final")
    (tmp_path / "empty_run").mkdir()
    refused(["sample", tmp_path / "empty_run"], "empty_run", "no checkpoints/final.json", "exported model")
    refused(["evaluate", tmp_path / "nowhere"], "checkpoint not found", "nowhere")
    refused(["distill", "--teacher", tmp_path / "nowhere", *TINY], "checkpoint not found", "nowhere")


def test_library_version_is_informational(runs, tmp_path):
    """The compatibility rule: format_version is the contract; a checkpoint of format 1 written by any
    library version (even a newer major) loads."""
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "future")
    _edit_json(stem, _setitem(["library_version"], "7.3.0"))
    loaded = load_model(stem)
    assert loaded.metadata["library_version"] == "7.3.0" and loaded.scales["dim"] == 2


def test_checkpoints_without_a_checksum_still_load(runs, tmp_path):
    """Format-1 checkpoints written before ``weights_sha256`` existed stay readable."""
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "old")
    _edit_json(stem, _setitem(["weights_sha256"], KeyError))
    assert load_model(stem).scales["dim"] == 2


def test_a_stem_with_dots_round_trips(runs, tmp_path):
    """``run.v2/ck.step20`` names ``ck.step20.json`` + ``ck.step20.safetensors`` (suffixes appended)."""
    loaded = load_model(runs.lmd2)
    stem = tmp_path / "run.v2" / "ck.step20"
    save_model(stem, loaded.model, None, loaded.config, loaded.scales, None, step=20)
    assert sorted(p.name for p in stem.parent.iterdir()) == ["ck.step20.json", "ck.step20.safetensors"]
    assert load_model(stem).metadata["step"] == 20
    assert load_model(stem.parent / "ck.step20.json").metadata["step"] == 20


def test_valid_safetensors_whose_header_length_looks_like_a_pickle_loads(runs, tmp_path):
    """A 640-byte header makes a valid file start with b"\\x80\\x02", a pickle's magic: the layout is
    checked first, so it is not refused as one."""
    header = json.dumps({"model.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    raw = (640).to_bytes(8, "little") + header.ljust(640) + np.array([1.5, -2.0], np.float32).tobytes()
    assert raw[:2] == b"\x80\x02"
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "odd")
    _f(stem, W).write_bytes(raw)
    _edit_json(stem, lambda m: m.update(groups=["model"], weights_sha256=hashlib.sha256(raw).hexdigest()))
    groups, _ = load_checkpoint(stem)
    assert groups["model"]["w"].tolist() == [1.5, -2.0]


# --- malicious pickles offered as checkpoints ------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_disguised_as_safetensors_is_not_executed(refused, runs, tmp_path, protocol):
    marker = tmp_path / "pwned"
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "evil")          # a plausible evil.json ...
    _f(stem, W).write_bytes(evil_pickle(marker, protocol))        # ... beside a pickle
    for argv in (["sample", stem, "--n", "10"], ["sample", _f(stem, W), "--n", "10"],
                 ["sample", tmp_path / "evil" / "ck.json", "--n", "10"],
                 ["evaluate", stem, "--no-dopri5"], ["distill", "--teacher", stem, *TINY]):
        refused(argv, "ck.safetensors", "pickle")
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="pickle") as err:
            load(stem)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_malicious_pickle_as_json_or_alone_is_not_executed(refused, runs, tmp_path):
    marker = tmp_path / "pwned"
    stem = _copy_checkpoint(runs.lmd2, tmp_path / "evil")
    _f(stem, J).write_bytes(evil_pickle(marker))
    refused(["sample", stem, "--n", "10"], "ck.json", "pickle")
    _f(stem, J).unlink()                                          # no JSON at all, pickled weights
    _f(stem, W).write_bytes(evil_pickle(marker))
    refused(["sample", stem, "--n", "10"], "ck.safetensors", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".pkl"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_malicious_torch_style_file_is_not_executed(refused, tmp_path, suffix, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if kind == "pickle":
        path.write_bytes(evil_pickle(marker))
    else:
        torch.save(Evil(marker), path)  # a zip holding data.pkl with the payload
    word = "pickle" if kind == "pickle" else "zip"
    refused(["sample", path, "--n", "10"], path.name, word)
    refused(["evaluate", path, "--no-dopri5"], path.name, word)
    refused(["distill", "--teacher", path, *TINY], path.name, word)
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=word) as err:
            load(path)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_malicious_run_directory_is_not_executed(refused, runs, tmp_path):
    """A run directory whose checkpoints/final.safetensors is a torch.save zip of the payload."""
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(runs.lmd2 / "checkpoints" / "final.json", ckpts / "final.json")
    torch.save(Evil(marker), ckpts / "final.safetensors")
    refused(["sample", tmp_path / "run", "--n", "10"], "final.safetensors", "zip")
    refused(["evaluate", tmp_path / "run", "--no-dopri5"], "final.safetensors", "zip")
    with pytest.raises(CheckpointError, match="zip"):
        load_checkpoint(tmp_path / "run")
    assert not marker.exists()


# --- no unsafe loader anywhere in the package -------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls in ``source`` that may execute code from a file: pickle-family ``load(s)``, ``torch.load``
    without ``weights_only=True``, ``np.load`` without ``allow_pickle=False``, any ``allow_pickle=True``,
    ``yaml.load``/``unsafe_load``/``full_load``, and ``import``s of the pickle family."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom)
                                                     and node.module else [])
            if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                found.append(f"{filename}:{node.lineno}: imports {names}")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy", "yaml") and any(
                    a.name in ("load", "unsafe_load", "full_load") for a in node.names):
                found.append(f"{filename}:{node.lineno}: from {node.module} imports a bare loader")
        if not isinstance(node, ast.Call):
            continue
        full = _dotted(node.func)
        owner, _, name = full.rpartition(".")
        kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
        where = f"{filename}:{node.lineno}: {full or '<call>'}"
        if kw.get("allow_pickle") is True:
            found.append(where + " with allow_pickle=True")
        elif owner in UNSAFE_MODULES and name in ("load", "loads", "Unpickler", "open"):
            found.append(where)
        elif full == "torch.load" and kw.get("weights_only") is not True:
            found.append(where + " without weights_only=True")
        elif full in ("np.load", "numpy.load") and kw.get("allow_pickle") is not False:
            found.append(where + " without allow_pickle=False")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
            found.append(where)
    return found


def test_the_unsafe_loader_scan_catches_offenders():
    """The scan itself can fail: each offender below is found, the safe forms are not."""
    bad = ["import pickle", "from pickle import loads", "pickle.load(f)", "pickle.loads(b)",
           "torch.load(p)", "torch.load(p, weights_only=False)", "np.load(p)", "numpy.load(p)",
           "np.load(p, allow_pickle=True)", "x = f(a, allow_pickle=True)", "yaml.load(t)",
           "yaml.unsafe_load(t)", "import dill", "marshal.loads(b)", "from torch import load",
           "pickle.Unpickler(f).load()", "import _pickle as p"]
    for line in bad:
        assert unsafe_loads(line), line
    good = ["torch.load(p, weights_only=True)", "np.load(p, allow_pickle=False)", "yaml.safe_load(t)",
            "json.loads(t)", "safetensors.torch.load(b)"]
    for line in good:
        assert not unsafe_loads(line), line


def test_no_unsafe_loader_in_the_package():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 15 and SRC / "checkpoint.py" in files and SRC / "data" / "points.py" in files
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(SRC)))]
    assert found == []
    assert "allow_pickle=False" in (SRC / "data" / "points.py").read_text()  # the one np.load, and it is safe


# --- output directories -----------------------------------------------------------------------------

def test_out_holding_another_run_is_refused(refused, runs, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(runs.teacher2, other)
    refused(["train", "--preset", "gmm", "--out", other, *TINY], "--out", "other_run",
            "already holds files", "--overwrite")
    refused(["distill", "--preset", "gmm", "--teacher", runs.teacher2, "--out", other, *TINY],
            "other_run", "already holds files")
    refused(["evaluate", runs.lmd2, "--out", other, "--n", "50", "--steps", "1", "--no-dopri5"],
            "other_run", "already holds files")


def test_out_holding_any_file_is_refused(refused, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    refused(["train", "--preset", "gmm", "--out", tmp_path / "notes", *TINY], "notes",
            "already holds files")


def test_out_that_is_a_regular_file_is_refused(refused, runs, tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    refused(["train", "--preset", "gmm", "--out", tmp_path / "taken", *TINY], "taken", "not a directory")
    refused(["evaluate", runs.lmd2, "--out", tmp_path / "taken", "--n", "50", "--steps", "1",
             "--no-dopri5"], "taken", "not a directory")


def test_sample_out_holding_samples_is_refused(refused, runs, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    np.save(out / "samples_steps1.npy", np.zeros((3, 2)))
    refused(["sample", runs.lmd2, "--out", out, "--n", "20", "--steps", "1"], "samples_steps1.npy",
            "already exists", "--overwrite")


def test_sample_out_that_is_a_regular_file_is_refused(refused, runs, tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    refused(["sample", runs.lmd2, "--out", tmp_path / "taken", "--n", "20", "--steps", "1"], "taken",
            "not a directory")


def test_out_below_a_regular_file_is_refused(refused, tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    refused(["train", "--preset", "gmm", "--out", tmp_path / "taken" / "run", *TINY], "taken")


def test_resume_of_something_that_is_not_a_run_is_refused(refused, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    refused(["train", "--resume", "--out", tmp_path / "notes"], "--resume", "notes", "not a run directory")
    refused(["train", "--resume", "--out", tmp_path / "nowhere"], "--resume", "nowhere",
            "not a run directory")


def _run_with_bad_final(runs, tmp_path, payload: bytes) -> Path:
    run_dir = tmp_path / "interrupted"
    shutil.copytree(runs.teacher2, run_dir)
    (run_dir / "checkpoints" / "final.safetensors").write_bytes(payload)
    return run_dir


def test_resume_from_a_pickle_is_refused_not_executed(capsys, runs, tmp_path):
    """Whatever the wording, a run whose only checkpoint is a pickle ends with exit 2, no code run,
    nothing changed (the strict one-line form is the next test)."""
    marker = tmp_path / "pwned"
    run_dir = _run_with_bad_final(runs, tmp_path, evil_pickle(marker))
    before = snapshot(tmp_path, runs.root)
    rc, out, err = run(["train", "--resume", "--out", run_dir, "train.steps=40", "--quiet"], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith("flowmaps: error: ") and "Traceback" not in err
    assert _diff(before, snapshot(tmp_path, runs.root)) == []
    assert not marker.exists()


def test_resume_from_a_corrupted_checkpoint_is_one_line(refused, runs, tmp_path):
    raw = (runs.teacher2 / "checkpoints" / "final.safetensors").read_bytes()
    run_dir = _run_with_bad_final(runs, tmp_path, raw[:100])
    refused(["train", "--resume", "--out", run_dir, "train.steps=40", "--quiet"], "--resume",
            "final.safetensors", "corrupted")


def test_overwrite_replaces_the_run_and_keeps_other_files(capsys, runs, tmp_path):
    """Control for the refusals above: with --overwrite the same command runs, replacing the run files."""
    other = tmp_path / "other_run"
    shutil.copytree(runs.teacher2, other)
    (other / "notes.txt").write_text("mine\n")
    before = (other / "checkpoints" / "final.safetensors").read_bytes()
    rc, _, err = run(["train", "--preset", "gmm", "--out", other, "--overwrite", "train.seed=5", *TINY],
                     capsys)
    assert rc == 0, err
    assert (other / "checkpoints" / "final.safetensors").read_bytes() != before
    assert (other / "notes.txt").read_text() == "mine\n"
