"""``teacher.factory=package.module:function`` in the CLI and the API: a torchcfm model trained here with
torchcfm's own ``ConditionalFlowMatcher`` is distilled end to end by one ``flowmaps distill`` command, and
every bad input (module, function, return value, weights, kwargs, adapter, dimension) is refused with one
line, exit status 2 and nothing on disk changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import GMM_COVS, GMM_MEANS, GMM_WEIGHTS
from test_faults_input import _diff, evil_pickle, run, snapshot

import flowmaps.teachers as teachers
from flowmaps.cli import main
from flowmaps.exact import GaussianMixture
from flowmaps.runs.models import load_model
from flowmaps.solvers import solve_ode

torch.set_num_threads(1)

WIDTH = 64
MODULE = '''
"""User code: a torchcfm MLP for `flowmaps distill teacher.factory=cfm_teacher:make`."""
import torch
from torchcfm.models.models import MLP

import flowmaps.teachers

CONSTANT = 3


def make(width=64, dim=2):
    return MLP(dim=dim, w=width, time_varying=True)


def make_adapted(width=64):
    """The adapter applied in user code instead of teacher.adapter (the velocity is a module: weights
    cannot be loaded into it by name, so this one is for runs without teacher.weights)."""
    return flowmaps.teachers.torchcfm(make(width))


def velocity(scale=1.0):
    return lambda x, t: -scale * x


def wrong_shape():
    return lambda x, t: x[:, :1]


def returns_int():
    return 5


def returns_tuple():
    return make(), None


def nan_velocity():
    return lambda x, t: x * float("nan")
'''


def train_torchcfm(steps: int = 400, seed: int = 0):
    """A torchcfm MLP trained with torchcfm's ConditionalFlowMatcher on the gmm preset's mixture."""
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.models import MLP

    torch.manual_seed(seed)
    gmm = GaussianMixture(GMM_MEANS, covs=GMM_COVS, weights=GMM_WEIGHTS)
    model = MLP(dim=2, w=WIDTH, time_varying=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfm = ConditionalFlowMatcher(sigma=0.0)
    for _ in range(steps):
        x1 = gmm.sample(256)
        t, xt, ut = cfm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
        loss = (model(torch.cat([xt, t[:, None]], dim=-1)) - ut).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A folder holding the user's module ``cfm_teacher.py`` and the trained weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("user_code")
    (root / "cfm_teacher.py").write_text(MODULE)
    (root / "broken_teacher.py").write_text("raise RuntimeError('broken on import')\n")
    model = train_torchcfm()
    save_file(model.state_dict(), str(root / "cfm.safetensors"))
    save_file(torch.nn.Linear(3, 3).state_dict(), str(root / "other.safetensors"))
    save_file(model.state_dict() | {"extra": torch.zeros(1)}, str(root / "extra.safetensors"))
    (root / "cfm.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return root


def flowmaps(user: Path, *args, cwd=None):
    exe = Path(sys.executable).parent / "flowmaps"
    path = os.pathsep.join(p for p in (str(user), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


SMALL = ["model.width=64", "model.depth=2", "data.n_train=20000", "data.n_eval=2000", "train.batch_size=256",
         "train.log_every=100", "train.checkpoint_every=1000", "eval.n_samples=500", "eval.w2_samples=300",
         "eval.energy_samples=300"]


DISTIL_STEPS = 300
# The distilled 1-step map's error over one Euler step's of the teacher (both against the teacher's own
# RK4 endpoint) must stay below this bar. Measured over seeds 0–2 (teacher and distillation) ×
# ATEN_CPU_CAPABILITY default / avx2 / avx512 by benchmarks/training_test_spread.py: 0.110–0.129 (margin
# 1.94; the untrained, identity map fails it, which the test checks).
DISTIL_BAR = 0.25


def distil(user: Path, out: Path, seed: int = 0):
    """`flowmaps distill` of the user's torchcfm teacher (``cfm.safetensors`` in ``user``) by LMD for
    DISTIL_STEPS steps from ``train.seed=seed``; returns the process result and ``{"map/euler": ratio}``,
    the 1-step map's error over one teacher Euler step's (None when the command failed)."""
    result = flowmaps(user, "distill", "--preset", "gmm", "teacher.factory=cfm_teacher:make",
                      f"teacher.weights={user / 'cfm.safetensors'}", "teacher.adapter=torchcfm",
                      f"teacher.kwargs={{width: {WIDTH}}}", "--out", out, "--quiet",
                      f"train.steps={DISTIL_STEPS}", "train.lr=3e-3", "train.lr_decay_start=200",
                      "train.ema_decay=0.95", f"train.seed={seed}", *SMALL)
    if result.returncode != 0:
        return result, None
    if str(user) not in sys.path:
        sys.path.insert(0, str(user))
    teacher = teachers.from_factory("cfm_teacher:make", kwargs={"width": WIDTH},
                                    weights=user / "cfm.safetensors", adapter="torchcfm")
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        endpoint = solve_ode(teacher, x0, "rk4", steps=200).x
        euler = x0 + teacher(x0, torch.zeros(2000))
        one_step = load_model(out).model.sample(x0, steps=1)
    map_error = (one_step - endpoint).norm(dim=1).mean().item()
    euler_error = (euler - endpoint).norm(dim=1).mean().item()
    identity_error = (x0 - endpoint).norm(dim=1).mean().item()  # the untrained (zero-step) map's
    print(f"\n1-step map error {map_error:.4f}, one teacher Euler step {euler_error:.4f}")
    return result, {"map/euler": map_error / euler_error, "identity/euler": identity_error / euler_error}


def _distil_spread(seed):
    """benchmarks/training_test_spread.py: the user folder with a teacher trained from ``seed``."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp)
        (user / "cfm_teacher.py").write_text(MODULE)
        save_file(train_torchcfm(seed=seed).state_dict(), str(user / "cfm.safetensors"))
        result, metrics = distil(user, user / "lmd", seed)
        assert metrics is not None, result.stderr[-2000:]
        sys.path.remove(str(user))
        return {"map/euler": metrics["map/euler"]}, {"map/euler": DISTIL_BAR}


SPREAD = {"torchcfm-distil": _distil_spread}


def test_a_torchcfm_model_distils_end_to_end_in_one_command(user, tmp_path, monkeypatch):
    """One `flowmaps distill` command: the user's module, its safetensors weights, kwargs and the torchcfm
    adapter. After 300 steps the distilled 1-step map lands far closer to the teacher's own ODE endpoint
    (RK4, 200 steps) than one Euler step of the teacher (the 1-NFE baseline), and `flowmaps evaluate`
    rebuilds the teacher from the run's config."""
    out = tmp_path / "lmd"
    monkeypatch.syspath_prepend(str(user))
    result, metrics = distil(user, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "checkpoints" / "final.safetensors").is_file() and (out / "plots" / "samples.png").is_file()
    assert metrics["map/euler"] < DISTIL_BAR, metrics
    assert metrics["identity/euler"] >= DISTIL_BAR  # the bar can fail: the untrained map is above it

    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--steps", "1", "--no-dopri5",
                 "--n", "500"]) == 0
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "teacher (cfm_teacher:make)" in table and "euler" in table


def test_the_factory_from_python_loads_weights_into_the_module(user, monkeypatch):
    """API: from_factory loads the safetensors state dict into the returned module (eval mode, frozen)."""
    monkeypatch.syspath_prepend(str(user))
    from safetensors.torch import load_file

    velocity = teachers.from_factory("cfm_teacher:make", weights=user / "cfm.safetensors", adapter="torchcfm")
    state = load_file(str(user / "cfm.safetensors"))
    assert all(torch.equal(velocity.model.state_dict()[k], v) for k, v in state.items())
    assert not velocity.model.training and not any(p.requires_grad for p in velocity.parameters())
    plain = teachers.from_factory("cfm_teacher:velocity", kwargs={"scale": 2.0})
    x = torch.randn(4, 2)
    assert torch.equal(plain(x, torch.zeros(4)), -2.0 * x)
    adapted = teachers.from_factory("cfm_teacher:make_adapted")
    assert isinstance(adapted, teachers.TeacherVelocity)
    teachers.check_teacher(adapted, x)


# --- bad input: one line, exit 2, nothing on disk changed ---------------------------------------------

@pytest.fixture
def refused(capsys, tmp_path, user, monkeypatch):
    """``refused(argv, *words)``: `flowmaps distill --preset gmm ARGV` in-process from the test folder
    exits 2 with one ``flowmaps: error:`` line holding every word, and changes nothing on disk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(user))

    def check(argv, *words, preset="gmm"):
        before = snapshot(tmp_path, user)
        rc, out, err = run(["distill", "--preset", preset, "--quiet", "train.steps=5", "data.n_train=2000",
                            "data.n_eval=500", "--out", tmp_path / "run", *argv], capsys)
        after = snapshot(tmp_path, user)
        lines = err.splitlines()
        assert "Traceback" not in out + err, err
        assert len(lines) == 1 and lines[0].startswith("flowmaps: error: "), f"stderr was: {err!r}"
        assert rc == 2, (rc, err)
        for word in words:
            assert str(word) in lines[0], f"{word!r} not named in: {lines[0]}"
        assert _diff(before, after) == [], _diff(before, after)[:5]
        return lines[0]

    return check


@pytest.mark.parametrize("overrides, words", [
    (["teacher.factory=no_such_module_zz:make"], ["teacher.factory", "cannot import", "no_such_module_zz",
                                                   "PYTHONPATH"]),
    (["teacher.factory=broken_teacher:make"], ["teacher.factory", "importing", "broken on import"]),
    (["teacher.factory=cfm_teacher:nope"], ["teacher.factory", "has no", "nope"]),
    (["teacher.factory=cfm_teacher:CONSTANT"], ["teacher.factory", "not a function"]),
    (["teacher.factory=cfm_teacher:returns_int"], ["teacher.factory", "type int", "not a velocity"]),
    (["teacher.factory=cfm_teacher:returns_tuple"], ["teacher.factory", "tuple"]),
    (["teacher.factory=cfm_teacher:make", "teacher.kwargs.depth=3"],
     ["teacher.factory", "failed", "TypeError", "depth"]),
    (["teacher.factory=cfm_teacher:make", "teacher.kwargs=5"], ["teacher.kwargs", "mapping"]),
    (["teacher.factory=cfm_teacher", ], ["teacher.factory", "package.module:function"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfn"], ["teacher.adapter", "torchcfn",
                                                                       "torchcfm"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=diffusers_vp"],
     ["teacher.adapter", "needs the scheduler"]),
    (["teacher.weights=cfm.safetensors", "--teacher", "exact"], ["teacher.weights", "teacher.factory"]),
    (["teacher.factory=cfm_teacher:make", "--teacher", "exact"], ["exactly one"]),
    (["teacher.factory=cfm_teacher:wrong_shape"], ["teacher.factory", "(8, 1)", "(8, 2)",
                                                    "dimension mismatch"]),
    (["teacher.factory=cfm_teacher:make", "teacher.kwargs.dim=3", "teacher.adapter=torchcfm"],
     ["teacher.factory", "failed on a batch of the data of shape (8, 2)"]),
    (["teacher.factory=cfm_teacher:nan_velocity"], ["teacher.factory", "NaN"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfm", "teacher.guidance=2"],
     ["teacher.guidance"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfm", "teacher.noise_end=gaussian"],
     ["teacher.noise_end", "diffusers_vp"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=diffusers_vp", "teacher.noise_end=soft"],
     ["teacher.noise_end", "soft", "gaussian"]),
    (["teacher.factory=cfm_teacher:make", "teacher.adapter=diffusers_vp", "teacher.tau_start=2"],
     ["teacher.tau_start", "[0, 1)"]),
    (["eval.samplers=[heun]"], ["eval.samplers", "heun", "dpmpp_2m"]),
    (["eval.spacings=[karras]"], ["eval.spacings", "karras", "trailing"]),
    (["eval.spacings=[]"], ["eval.spacings", "at least one"]),
    (["eval.schedulers=[own,1x]"], ["eval.schedulers", "class names"]),
])
def test_bad_factory_input_is_one_line(refused, overrides, words):
    refused(overrides, *words)


def test_bad_weights_are_one_line(refused, user, tmp_path):
    base = ["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfm"]
    refused(base + [f"teacher.weights={tmp_path / 'missing.safetensors'}"], "teacher.weights", "not found")
    refused(base + [f"teacher.weights={user / 'cfm.pt'}"], "teacher.weights", "expected a .safetensors")
    refused(base + [f"teacher.weights={user / 'other.safetensors'}"], "teacher.weights", "does not fit",
            "missing net.0.bias", "unexpected bias, weight")
    refused(base + [f"teacher.weights={user / 'extra.safetensors'}"], "teacher.weights", "unexpected extra")
    refused(base + ["teacher.kwargs.width=32", f"teacher.weights={user / 'cfm.safetensors'}"],
            "teacher.weights", "shape differs for net.0.bias")
    refused(["teacher.factory=cfm_teacher:velocity", f"teacher.weights={user / 'cfm.safetensors'}"],
            "teacher.weights", "not an nn.Module")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refused(base + [f"teacher.weights={garbage}"], "teacher.weights", "not a valid safetensors")


def test_a_pickle_offered_as_weights_is_refused_not_executed(refused, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(evil_pickle(marker))
    refused(["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfm", f"teacher.weights={evil}"],
            "teacher.weights", "pickle")
    assert not marker.exists()


def test_an_adapter_needs_one_base_scale(refused):
    refused(["teacher.factory=cfm_teacher:make", "teacher.adapter=torchcfm"], "teacher.adapter",
            "interpolant.sigma0", preset="checkerboard")
