"""Distillation without a dataset (issue 17 part 3, spec E.8): LMD's points at time ``s`` on the
teacher's ODE paths from the base (:class:`~flowmaps.objectives.trajectories.TeacherPaths`).

* the cached paths are the teacher's exact map ``X_{0,s}(x0)`` (closed form for Gaussian mixtures) to
  RK4's error, at grid times and between them (cubic Hermite interpolation);
* the cache at step ``k`` is rebuilt bit for bit from the seed and ``k``, so a resumed run is the
  uninterrupted one, through the API and the CLI;
* ``fit(model, LMD(interp, teacher), None)`` trains a map that beats exact Euler like data-based LMD's
  test (``test_training``'s spec mixture, bars from several seeds × CPU kernel paths:
  ``benchmarks/training_test_spread.py --modules test_data_free``);
* what cannot train without data is refused in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import flowmaps as fm
from flowmaps.cli.main import main
from flowmaps.exact import Gaussian, GaussianMixture
from flowmaps.objectives import EMD, FMM, LMD, LSD, PFMM, Velocity
from flowmaps.objectives.trajectories import TeacherPaths
from test_training import beats, map_errors, spec_mixture

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return spec_mixture()


# --- the cache against the exact map -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_cached_paths_are_the_exact_map_of_the_teacher(problem, kind):
    """States at the grid times and Hermite-interpolated points between them against the closed-form
    ``X_{0,s}(x0)``. Measured (float64, 32 RK4 intervals): Gaussian mean 2e-9, mixture mean ~4e-6,
    max ~1e-3 (the narrow component near t = 1); 4 intervals are far off, so the check can fail."""
    interp = fm.Linear()
    ref = (Gaussian(torch.tensor([1.5, -0.5]), torch.tensor([0.3, 0.8]), interpolant=interp)
           if kind == "gaussian" else problem["gmm"])
    errors = {}
    for steps in (32, 4):
        paths = TeacherPaths(ref, interp, (2,), paths=512, steps=steps, refresh_paths=128,
                             dtype=torch.float64)
        paths.fill(0)
        x0 = paths.states[0]
        grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        on_grid = max(float((paths.states[i] - ref.flow(x0, 0.0, float(grid[i]))).norm(dim=1).max())
                      for i in range(steps + 1))
        g = torch.Generator().manual_seed(0)
        s = torch.rand(2000, generator=g, dtype=torch.float64)
        index = torch.randint(paths.paths, (2000,), generator=g)
        between = (paths.at(s, index=index) - ref.flow(x0[index], torch.zeros_like(s), s)).norm(dim=1)
        errors[steps] = (on_grid, float(between.mean()), float(between.max()))
    (grid32, mean32, max32), (_, mean4, _) = errors[32], errors[4]
    print(f"\n{kind}: {errors}")
    assert grid32 < 5e-3 and mean32 < 2e-5 and max32 < 5e-3
    assert mean4 > 50 * mean32  # the comparison is not vacuous: a coarse solve is far off
    assert paths.nfe == 512 * (4 * 4 + 1)  # every teacher evaluation is counted


def test_the_cache_at_step_k_is_rebuilt_bit_for_bit(problem):
    """A cache refreshed step by step equals one solved afresh for step ``k`` (a resume), and refreshes
    replace the chunks named by the schedule with new base points."""
    interp, gmm = problem["interp"], problem["gmm"]
    run = TeacherPaths(gmm, interp, (2,), paths=400, steps=8, refresh_every=3, refresh_paths=100, seed=5)
    run.begin_step(0)
    first = run.states.clone()
    for k in range(1, 17):
        run.begin_step(k)
    fresh = TeacherPaths(gmm, interp, (2,), paths=400, steps=8, refresh_every=3, refresh_paths=100, seed=5)
    fresh.begin_step(16)
    assert torch.equal(run.states, fresh.states) and torch.equal(run.velocities, fresh.velocities)
    # 5 refresh events (steps 3, 6, ..., 15) over 4 chunks: chunk 0 twice, chunks 1-3 once
    changed = [not torch.equal(first[:, c * 100:(c + 1) * 100], run.states[:, c * 100:(c + 1) * 100])
               for c in range(4)]
    assert all(changed) and run.solved == 400 + 5 * 100
    other = TeacherPaths(gmm, interp, (2,), paths=400, steps=8, refresh_every=3, refresh_paths=100, seed=6)
    other.begin_step(16)
    assert not torch.equal(other.states, run.states)


# --- training through the API --------------------------------------------------------------------

STEPS = 1000
PATHS = dict(paths=2048, steps=32, refresh_every=50, refresh_paths=128)
# Bars as data-based LMD's (test_training "lmd"): the 1- and 4-step maps beat 8 exact Euler steps.
# Measured (benchmarks/training_test_spread.py --modules test_data_free --caps default,avx2, seeds 0-2):
# map1 0.099-0.105 (bar 0.206, margin 1.95); map4 0.048-0.066 (bar 0.206, margin 3.10).
BARS = beats(map1=8, map4=8)


def train_data_free(problem, seed: int = 0, steps: int = STEPS):
    torch.manual_seed(seed)
    model = fm.FlowMap(fm.MLP(2, width=128, depth=3, n_frequencies=0))
    trainer = fm.Trainer(model, LMD(problem["interp"], problem["gmm"]), None, batch_size=256, lr=2e-3,
                         lr_decay_start=steps // 4, grad_clip=1.0, ema_decay=0.999, seed=seed,
                         total_steps=steps, teacher_paths=PATHS)
    trainer.run(steps, progress=False)
    return trainer


def _spread(seed):
    """benchmarks/training_test_spread.py: the test's training from ``seed``."""
    problem = spec_mixture()
    trainer = train_data_free(problem, seed)
    return map_errors(problem, trainer.ema), BARS(problem)


SPREAD = {"lmd-data-free": _spread}


def test_data_free_lmd_trains_a_map_that_beats_exact_euler(problem):
    trainer = train_data_free(problem)
    metrics, bars = map_errors(problem, trainer.ema), BARS(problem)
    cost = trainer.objective.points.cost()
    print(f"\ndata-free lmd: {metrics} bars {bars} teacher {cost}")
    assert trainer.bad_steps == 0
    assert all(metrics[k] < v for k, v in bars.items()), (metrics, bars)
    untrained = fm.FlowMap(fm.MLP(2, width=128, depth=3, n_frequencies=0))
    assert all(map_errors(problem, untrained)[k] >= v for k, v in bars.items())  # the bars can fail
    assert cost["teacher_paths_solved"] == 2048 + (STEPS // 50 - 1) * 128 and cost["teacher_seconds"] > 0


def test_fit_without_data_and_an_exact_resume(problem):
    """``fit(model, LMD, None)`` trains; a Trainer restored from a mid-run state (and so rebuilding its
    cache) continues exactly as the uninterrupted run."""
    interp, gmm = problem["interp"], problem["gmm"]
    paths = dict(paths=256, steps=8, refresh_every=4, refresh_paths=64)

    def fresh():
        torch.manual_seed(0)
        model = fm.FlowMap(fm.MLP(2, width=32, depth=2))
        return fm.Trainer(model, LMD(interp, gmm), None, batch_size=64, seed=3, ema_decay=0.99,
                          teacher_paths=paths)

    hist = fm.fit(fm.FlowMap(fm.MLP(2, width=32, depth=2)), LMD(interp, gmm), None, steps=5,
                  batch_size=32, teacher_paths=paths)
    assert len(hist) == 5 and all(math.isfinite(v) for v in hist)

    whole = fresh()
    whole.run(14, progress=False)
    first = fresh()
    first.run(6, progress=False)
    tensors, meta = first.state_dict()
    resumed = fresh()
    resumed.load_state_dict(tensors, json.loads(json.dumps(meta)))
    resumed.run(8, progress=False)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)


def test_objectives_that_need_data_are_refused_without_it(problem):
    interp, gmm = problem["interp"], problem["gmm"]
    model = fm.FlowMap(fm.MLP(2, width=16, depth=1))
    cases = [(Velocity(interp), "learns from data"), (FMM(interp), "learns from data"),
             (PFMM(interp, gmm), "learns from data"), (LSD(interp), "its own diagonal"),
             (LSD(interp, source="teacher", teacher=gmm, eta=0.5), "diagonal term is flow matching")]
    for objective, message in cases:
        with pytest.raises(ValueError, match=message):
            fm.fit(model, objective, None, steps=1)
    # with a teacher and no flow-matching term the self-distillation step and EMD train without data
    for objective in (LSD(interp, source="teacher", teacher=gmm, eta=0.5, diagonal="teacher"),
                      EMD(interp, gmm)):
        assert len(fm.fit(model, objective, None, steps=2, batch_size=16,
                          teacher_paths=dict(paths=64, steps=4))) == 2
    with pytest.raises(ValueError, match="teacher_paths: applies"):
        fm.fit(model, LMD(interp, gmm), gmm.sample(64), steps=1, teacher_paths=dict(paths=64))


# --- the CLI -------------------------------------------------------------------------------------

FAST = ["train.steps=40", "train.batch_size=64", "model.width=32", "model.depth=2", "train.log_every=10",
        "train.checkpoint_every=20", "data.teacher_paths=256", "data.teacher_steps=8",
        "data.refresh_every=10", "data.refresh_paths=64", "data.n_eval=500"]


def test_distill_without_data_through_the_cli_and_resume(tmp_path, capsys):
    """``flowmaps distill --preset gmm --teacher exact data.name=none``: trains, logs the teacher's ODE
    cost, writes a checkpoint that evaluates against the exact map; a run cut at step 20 and resumed
    ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    out, part = tmp_path / "free", tmp_path / "part"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(out), "--quiet",
                 "data.name=none", *FAST]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "teacher_seconds" in r][-1]
    assert last["teacher_paths_solved"] == 256 + 3 * 64 and last["teacher_nfe"] > 0
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(part), "--quiet",
                 "data.name=none", *FAST[1:], "train.steps=20"]) == 0
    assert main(["distill", "--resume", "--out", str(part), "--quiet", "train.steps=40"]) == 0
    a = load_file(str(out / "checkpoints" / "final.safetensors"))
    b = load_file(str(part / "checkpoints" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--steps", "1", "--no-dopri5",
                 "--n", "500"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert any(r.get("map_error") is not None for r in rows)


@pytest.mark.parametrize("command, overrides, message", [
    (["train"], ["data.name=none"], "velocity learns from data"),
    (["train", "--objective", "lsd"], ["data.name=none"], "lsd learns from data"),
    (["distill", "--objective", "pfmm", "--teacher", "exact"], ["data.name=none"], "pfmm trains at"),
    (["distill", "--objective", "lsd", "--teacher", "exact"],
     ["data.name=none", "objective.source=teacher", "objective.eta=0.5"], "flow matching on the data"),
    (["distill", "--teacher", "exact"], ["data.name=none", "data.standardize=true"], "data.standardize"),
])
def test_data_free_config_errors_are_one_line(tmp_path, capsys, command, overrides, message):
    out = tmp_path / "run"
    status = main([*command, "--preset", "gmm", "--out", str(out), "--quiet", *overrides, *FAST])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# --- class-conditional teachers and teacher.factory without data ------------------------------------

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=torch.float64)


def gaussian_velocity(x, t, mean, std):
    """The exact velocity of the linear interpolant from N(0, I) to N(mean, std² I):
    ``b_t(x) = m + (t s² − (1 − t)) / v · (x − t m)``, ``v = (1 − t)² + t² s²``."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    v = (1 - t) ** 2 + t**2 * std**2
    return mean + (t * std**2 - (1 - t)) / v * (x - t * mean)


def conditional_teacher(x, t, cond=None):
    """Label c < 3: the exact velocity towards N(MEANS[c], 0.3² I); the null label 3 (and no label):
    towards N(0, I), a path unlike every class's."""
    mean = torch.zeros_like(x) if cond is None else torch.cat([MEANS.to(x), torch.zeros(1, 2).to(x)])[cond]
    std = torch.where(cond == 3, 1.0, 0.3).to(x).reshape(-1, 1) if cond is not None else torch.ones(1, 1).to(x)
    return gaussian_velocity(x, t, mean, std)


def test_class_conditional_paths_follow_the_teacher_of_their_label():
    """Path ``i`` is the teacher's exact flow given label ``i mod L`` (closed form), and points drawn for
    labels ``c`` lie on paths of label ``c``: the draw is ``c + L·j`` with ``j`` uniform."""
    interp = fm.Linear()
    paths = TeacherPaths(conditional_teacher, interp, (2,), paths=300, steps=32, refresh_paths=100,
                         labels=4, dtype=torch.float64)
    paths.fill(0)
    x0, labels = paths.states[0], paths.path_labels(torch.arange(paths.paths))
    assert labels.tolist() == [i % 4 for i in range(300)]
    mean, std = torch.cat([MEANS, torch.zeros(1, 2, dtype=torch.float64)])[labels], \
        torch.where(labels == 3, 1.0, 0.3).double().reshape(-1, 1)
    for i, s in ((8, 0.25), (32, 1.0)):  # closed form: X_{0,s}(x0) = a_s x0 + s m, a_s = sqrt(v_s)
        exact = ((1 - s) ** 2 + s**2 * std**2).sqrt() * x0 + s * mean
        assert (paths.states[i] - exact).norm(dim=1).max() < 1e-6
    assert (paths.endpoints()[labels == 0].mean(0) - MEANS[0]).norm() < 0.1  # label 0's samples
    cond = torch.randint(4, (500,), generator=torch.Generator().manual_seed(1))
    s = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    drawn = paths.at(s, torch.Generator().manual_seed(3), cond=cond)
    index = cond + 4 * torch.randint(300 // 4, (500,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, paths.at(s, index=index))
    a = ((1 - s) ** 2 + s**2 * std[index, 0] ** 2).sqrt()[:, None]
    exact = a * x0[index] + s[:, None] * mean[index]
    assert (drawn - exact).norm(dim=1).max() < 1e-4
    with pytest.raises(ValueError, match="labels"):
        paths.at(s, torch.Generator())  # a conditional cache needs the labels of its points


def test_a_trainer_without_data_draws_labels_and_uses_their_paths():
    """``Trainer(model, LMD(...), None, labels=pool, label_dropout=p, null_label=K)``: the cache has
    ``K + 1`` labels (the null label's paths for dropped labels), every step's points lie on paths of the
    step's labels, and a float pool is refused."""
    from flowmaps.nets.unet import UNet

    interp = fm.Linear()

    def teacher(x, t, cond=None):
        return conditional_teacher(x.flatten(1)[:, :2], t, cond).repeat(1, 32).reshape(x.shape)

    net = UNet((1, 8, 8), channels=8, channel_mults=(1,), blocks_per_level=1, attention_resolutions=(),
               num_classes=3)
    model = fm.FlowMap(net)
    trainer = fm.Trainer(model, LMD(interp, teacher), None, labels=torch.arange(3), label_dropout=0.2,
                         null_label=3, batch_size=16, sample_shape=(1, 8, 8),
                         teacher_paths={"paths": 64, "steps": 4, "refresh_paths": 32})
    seen = []
    original = trainer.objective.points.at
    trainer.objective.points.at = lambda s, g=None, index=None, cond=None: (seen.append(cond),
                                                                          original(s, g, index, cond))[1]
    out = trainer.step()
    assert torch.isfinite(out.loss) and trainer.objective.points.labels == 4
    assert seen and all(c is not None and c.max() <= 3 for c in seen)
    with pytest.raises(ValueError, match="labels"):
        fm.Trainer(fm.FlowMap(UNet((1, 8, 8), channels=8, channel_mults=(1,), blocks_per_level=1,
                                   attention_resolutions=(), num_classes=3)),
                   LMD(interp, teacher), None, labels=torch.ones(3), null_label=3, sample_shape=(1, 8, 8))


FACTORY = '''
"""User code: a class-conditional velocity for `teacher.factory=cond_images:make` (1×8×8 images)."""
import torch

MEANS = torch.linspace(-1, 1, 64).reshape(1, 8, 8)


def make(classes=3):
    def b(x, t, cond=None):
        m = torch.zeros_like(x) if cond is None else MEANS.to(x) * (cond.to(x) - 1).reshape(-1, 1, 1, 1)
        t = t.reshape(-1, 1, 1, 1)
        v = (1 - t) ** 2 + t**2 * 0.09
        return m + (t * 0.09 - (1 - t)) / v * (x - t * m)
    return b
'''

IMAGE_FAST = ["train.steps=4", "train.batch_size=16", "model.channels=8", "model.channel_mults=[1]",
              "model.attention_resolutions=[]", "data.teacher_paths=64", "data.teacher_steps=4",
              "data.refresh_every=2", "data.refresh_paths=32", "data.n_eval=60", "train.log_every=2",
              "train.checkpoint_every=4"]


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "cond_images.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_distill_a_class_conditional_factory_teacher_without_data(factory_module, tmp_path, capsys):
    """``flowmaps distill --preset digits data.name=none teacher.factory=… teacher.shape=[1,8,8]
    teacher.num_classes=3 model.class_conditional=true``: trains from the user's function alone, the
    run records three classes, and its held-out samples are the teacher's, class by class."""
    from flowmaps.runs.experiment import load_model

    out = tmp_path / "run"
    assert main(["distill", "--preset", "digits", "--out", str(out), "--quiet", "data.name=none",
                 "teacher.factory=cond_images:make", "teacher.shape=[1,8,8]", "teacher.num_classes=3",
                 "model.class_conditional=true", *IMAGE_FAST]) == 0, capsys.readouterr().err
    loaded = load_model(out)
    assert loaded.scales["num_classes"] == 3 and loaded.scales["shape"] == [1, 8, 8]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "teacher_seconds" in r][-1]["teacher_paths_solved"] >= 64


@pytest.mark.parametrize("overrides, message", [
    (["teacher.factory=cond_images:make"], "teacher.shape: data.name: none with teacher.factory"),
    (["teacher.factory=cond_images:make", "teacher.shape=[1,8,8]", "model.class_conditional=true"],
     "teacher.num_classes"),
    (["teacher.factory=cond_images:make", "teacher.shape=[1,8,8]", "interpolant.sigma0=data"],
     "interpolant.sigma0"),
    (["teacher.factory=cond_images:make", "teacher.shape=[0,8]"], "teacher.shape: a list of positive"),
    (["teacher.exact=true", "model.class_conditional=true"], "the exact mixture teacher takes no labels"),
])
def test_data_free_factory_errors_are_one_line(factory_module, tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    status = main(["distill", "--preset", "digits", "--out", str(out), "--quiet", "data.name=none",
                   *overrides, *IMAGE_FAST])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_teacher_shape_applies_without_data_only(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "gmm", "--teacher", "exact", "--out", str(out), "--quiet",
                 "teacher.shape=[2]", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "apply without data" in err and len(err.splitlines()) == 1 and not out.exists()
