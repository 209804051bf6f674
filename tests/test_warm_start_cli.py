"""``flowmaps distill ... model.init=teacher`` end to end: a user's own small ε-network brought through
``teacher.factory`` (diffusers' VP convention, converted by ``teacher.adapter=diffusers_vp``) and a flowmaps
velocity checkpoint each seed a student that equals the teacher at initialisation, trains, resumes,
exports and loads; bad combinations are refused with one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import flowmaps as fm
from flowmaps.cli import main
from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_model, resolve_warm_start
from flowmaps.runs.config import load_config
from flowmaps.teachers.warm_start import CorrectedStudent, FactoryStudent

MODULE = '''
"""User code: an epsilon-prediction network of 2-D points trained the diffusers way (not here)."""
import torch
from diffusers import DDPMScheduler


class EpsNet(torch.nn.Module):
    def __init__(self, dim=2, width=32):
        super().__init__()
        self.lift = torch.nn.Linear(dim, width)
        self.when = torch.nn.Linear(1, width)
        self.out = torch.nn.Linear(width, dim)

    def forward(self, x, timestep):
        return self.out(torch.tanh(self.lift(x) * torch.cos(self.when(timestep[:, None] / 1000.0))))


def make(width=32):
    return EpsNet(width=width), DDPMScheduler(beta_schedule="squaredcos_cap_v2")
'''

SRC = str(Path(fm.__file__).resolve().parents[1])   # this checkout's flowmaps, without the user's folder
SMALL = ["data.n_train=2000", "data.n_eval=200", "train.batch_size=64", "train.log_every=1",
         "train.checkpoint_every=2", "eval.n_samples=100", "eval.w2_samples=100", "eval.energy_samples=100"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ws_user")
    (root / "ws_eps_teacher.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    try:
        import ws_eps_teacher

        torch.manual_seed(0)
        net = ws_eps_teacher.EpsNet()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
        save_file(net.state_dict(), str(root / "eps.safetensors"))
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("ws_eps_teacher", None)


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def flowmaps(capsys, monkeypatch, tmp_path):
    """``flowmaps ARGS`` in-process (the user's module is importable through the ``user`` fixture's
    sys.path entry); argparse's SystemExit becomes the status."""
    monkeypatch.chdir(tmp_path)

    def call(*args) -> Result:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
        return Result(rc, capsys.readouterr().err)

    return call


def factory_args(user) -> list[str]:
    return ["teacher.factory=ws_eps_teacher:make", f"teacher.weights={user / 'eps.safetensors'}",
            "teacher.adapter=diffusers_vp", "model.init=teacher"]


def test_a_users_epsilon_network_warm_starts_through_the_factory(user, tmp_path, flowmaps):
    """The student the run assembles equals the converted teacher, v_{s,t}(x) = b_s(x), bit for bit; the
    command trains it, resumes it, exports it, and the export loads with the same outputs."""
    overrides = ["objective.name=lmd", *factory_args(user), *SMALL]
    cfg = load_config("gmm", None, overrides)
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    teacher = ex.build_teacher(cfg, bundle, scales)
    model = build_model(cfg, scales, teacher)
    assert isinstance(model.net, FactoryStudent) and isinstance(model.net.student, CorrectedStudent)
    x = bundle.train[:50]
    s, t = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(50)
    with torch.no_grad():
        assert torch.equal(model.v(x, s, t), teacher(x, s))
        assert float(teacher(x, s).abs().max()) > 0.1
    # The teacher's weights were copied (a student built from the factory alone differs).
    bare = build_model(cfg, scales)
    with torch.no_grad():
        assert not torch.allclose(bare.v(x, s, t), model.v(x, s, t))

    run = tmp_path / "run"
    result = flowmaps("distill", "--preset", "gmm", *factory_args(user), "--out", run, "--quiet",
                      "train.steps=4", *SMALL)
    assert result.returncode == 0, result.stderr
    result = flowmaps("distill", "--resume", "--out", run, "--quiet", "train.steps=6")
    assert result.returncode == 0, result.stderr
    assert '"step": 6' in (run / "checkpoints" / "final.json").read_text()
    result = flowmaps("export", run, tmp_path / "export")
    assert result.returncode == 0, result.stderr
    from_run = fm.load(run)
    exported = fm.load(tmp_path / "export")
    assert isinstance(exported.net, FactoryStudent)
    with torch.no_grad():
        assert torch.allclose(exported(x, s, t), from_run(x, s, t), atol=1e-6)
    # The export needs the user's module; without it, one line.
    result = subprocess.run([sys.executable, "-c", f"import flowmaps; flowmaps.load({str(tmp_path / 'export')!r})"],
                            capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC))
    assert result.returncode != 0 and "ws_eps_teacher" in result.stderr.strip().splitlines()[-1]


def test_a_flowmaps_checkpoint_warm_starts_with_its_own_architecture(tmp_path, flowmaps):
    """With teacher.checkpoint the run takes the teacher's model section (width 32, its 8 Fourier
    frequencies, not the width 64 given), the student equals the teacher's velocity, and the run resumes."""
    teacher_run = tmp_path / "teacher"
    result = flowmaps("train", "--preset", "checkerboard", "--objective", "velocity", "--out", teacher_run,
                      "--quiet", "train.steps=30", "model.width=32", "model.depth=2", "train.ema_decay=0",
                      "train.lr=1e-2", *SMALL)
    assert result.returncode == 0, result.stderr
    ckpt = teacher_run / "checkpoints" / "final"
    overrides = ["objective.name=lmd", f"teacher.checkpoint={ckpt}", "model.init=teacher", "model.width=64",
                 *SMALL]
    cfg = resolve_warm_start(load_config("checkerboard", None, overrides))
    assert (cfg.model.width, cfg.model.depth, cfg.model.n_frequencies) == (32, 2, 8)
    assert resolve_warm_start(cfg) == cfg   # idempotent (a resume resolves again)
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    teacher = ex.build_teacher(cfg, bundle, scales)
    model = build_model(cfg, scales, teacher)
    x = bundle.train[:50]
    s, t = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(50)
    with torch.no_grad():
        assert torch.allclose(model.v(x, s, t), teacher.velocity(x, s), atol=1e-6, rtol=0)
        assert float(teacher.velocity(x, s).abs().max()) > 0.1

    run = tmp_path / "run"
    result = flowmaps("distill", "--preset", "checkerboard", f"teacher.checkpoint={ckpt}",
                      "model.init=teacher", "model.width=64", "--out", run, "--quiet", "train.steps=3", *SMALL)
    assert result.returncode == 0, result.stderr
    saved = (run / "config.yaml").read_text()
    assert "width: 32" in saved and "init: teacher" in saved
    result = flowmaps("distill", "--resume", "--out", run, "--quiet", "train.steps=5")
    assert result.returncode == 0, result.stderr
    assert isinstance(fm.load(run).net, fm.MLP)


@pytest.mark.parametrize("args, words", [
    (["train", "--preset", "gmm", "model.init=teacher"], ["model.init", "teacher.checkpoint"]),
    (["distill", "--preset", "gmm", "teacher.exact=true", "model.init=teacher"], ["model.init", "teacher.exact"]),
    (["distill", "--preset", "gmm", "teacher.exact=true", "model.init=warm"], ["model.init", "not one of"]),
    (["distill", "--preset", "gmm", "teacher.checkpoint=x", "teacher.guidance=2", "model.init=teacher"],
     ["model.init", "guid"]),
    (["distill", "--preset", "gmm", "teacher.checkpoint=/no/such/run", "model.init=teacher"],
     ["teacher.checkpoint"]),
])
def test_bad_combinations_are_one_line_errors(tmp_path, flowmaps, args, words):
    result = flowmaps(*args, "--out", tmp_path / "out", "train.steps=2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()
