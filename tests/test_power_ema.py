"""Power-function EMA as EDM2 does it (arXiv 2312.02696; :mod:`flowmaps.train.power_ema`), against closed
forms: the per-step update equals the power-function average of the trajectory, σ_rel ↔ γ both ways,
the profile inner products against quadrature, the post-hoc reconstruction against the directly tracked
profile (and its error falling as snapshots get denser); then the trainer (hand reference, exact
resume, skipped steps under either guard), runs with ``train.ema_std`` and snapshots, ``flowmaps ema``
end to end with its one-line refusals, and classic-EMA runs and checkpoints working as before."""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flowmaps.checkpoint import load_checkpoint
from flowmaps.cli import main
from flowmaps.runs.models import load_model
from flowmaps.runs.config import ConfigError, load_config
from flowmaps.runs.export import export_model, load
from flowmaps.runs.posthoc_ema import list_snapshots
from flowmaps.train import power_ema as pe
from flowmaps.train.trainer import Trainer

torch.set_num_threads(1)


# --- the maths --------------------------------------------------------------------------------------

class Weights(nn.Module):
    """A 'model' whose weights are set by hand: one float64 vector θ."""

    def __init__(self, n: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def track(thetas: np.ndarray, stds, every: int | None = None):
    """Run PowerEMA over the trajectory ``thetas[k-1] = θ(k)`` (k = 1…T); returns the final averages
    ``{name: θ̂}`` and, when ``every`` is given, the snapshots ``[(step, name, θ̂)]`` every that many steps."""
    model = Weights(thetas.shape[1])
    ema = pe.PowerEMA(model, stds)
    snaps = []
    for k, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            model.theta.copy_(torch.from_numpy(theta))
        ema.update(k)
        if every and k % every == 0:
            snaps += [(k, n, m.theta.detach().numpy().copy()) for n, m in ema.models.items()]
    final = {n: m.theta.detach().numpy().copy() for n, m in ema.models.items()}
    return final, snaps


def test_per_step_update_is_the_power_function_average_exactly():
    """θ̂ ← β θ̂ + (1 − β) θ(t), β = (1 − 1/t)^{γ+1}, equals Σ_k w_k θ(k) with
    w_k = (k^{γ+1} − (k−1)^{γ+1}) / t^{γ+1}: in exact rational arithmetic for integer γ, to float64
    round-off for any γ (the EDM2 lengths 0.05 and 0.10 among them)."""
    T = 600
    k = np.arange(1, T + 1, dtype=np.float64)
    thetas = np.stack([1.0 + 0.0 * k, 3.0 - 2.0 * k + 0.01 * k ** 2, np.cos(k / 37.0)], axis=1)
    for gamma in (0.0, 1.0, 2.0, 5.0):
        model = Weights(3)
        ema = pe.PowerEMA(model, [pe.gamma_to_std(gamma)])
        assert ema.gammas[0] == pytest.approx(gamma, abs=1e-9)
        final, _ = track(thetas, [pe.gamma_to_std(gamma)])
        got = next(iter(final.values()))
        g = round(gamma)  # exact: Σ (k^{g+1} − (k−1)^{g+1}) θ(k) / T^{g+1} with the polynomial θ
        exact = sum(Fraction(j ** (g + 1) - (j - 1) ** (g + 1)) * (3 - 2 * Fraction(j) +
                    Fraction(1, 100) * j * j) for j in range(1, T + 1)) / Fraction(T ** (g + 1))
        assert got[0] == pytest.approx(1.0, rel=1e-14)  # a constant stays exactly itself
        assert got[1] == pytest.approx(float(exact), rel=1e-12)
    for std in (0.05, 0.10, 0.2):
        gamma = pe.std_to_gamma(std)
        final, _ = track(thetas, [std])
        w = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / float(T) ** (gamma + 1)
        assert w.sum() == pytest.approx(1.0, rel=1e-12)
        np.testing.assert_allclose(next(iter(final.values())), w @ thetas, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(pe.power_weights(gamma, T), w, rtol=1e-10, atol=1e-300)


def test_the_discrete_average_tends_to_the_integral():
    """For θ(τ) = τ^m the profile integral is (γ+1)/(γ+m+1) t^m; the per-step average differs by O(1/t)."""
    gamma, m = pe.std_to_gamma(0.10), 2
    errors = []
    for T in (100, 1000, 10000):
        k = np.arange(1, T + 1, dtype=np.float64)
        final, _ = track((k ** m)[:, None], [0.10])
        integral = (gamma + 1) / (gamma + m + 1) * T ** m
        errors.append(abs(next(iter(final.values()))[0] / integral - 1))
    assert errors[0] < 0.2 and errors[1] / errors[0] < 0.12 and errors[2] / errors[1] < 0.12
    assert errors[2] < 1e-3


def test_sigma_rel_and_gamma_both_ways():
    """σ_rel(γ) = ((γ+1)/((γ+2)²(γ+3)))^{1/2} is the standard deviation of the profile density over t
    (checked by quadrature), EDM2's pairs (γ 16.97 ↔ 0.05, 6.94 ↔ 0.10), and the inverse both ways."""
    for gamma in (0.0, 0.5, 1.0, 6.94, 16.97, 100.0):
        tau = np.linspace(0.0, 1.0, 200_001)
        p = (gamma + 1) * tau ** gamma
        mean = np.trapezoid(tau * p, tau)
        var = np.trapezoid((tau - mean) ** 2 * p, tau)
        assert pe.gamma_to_std(gamma) == pytest.approx(math.sqrt(var), rel=1e-4)
        assert pe.std_to_gamma(pe.gamma_to_std(gamma)) == pytest.approx(gamma, rel=1e-10, abs=1e-10)
    assert pe.std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert pe.std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for std in (1e-3, 0.01, 0.05, 0.1, 0.25, pe.STD_MAX):
        assert pe.gamma_to_std(pe.std_to_gamma(std)) == pytest.approx(std, rel=1e-12)
    assert pe.std_to_gamma(pe.STD_MAX) == pytest.approx(0.0, abs=1e-12)
    for bad in (0.0, -0.1, 0.3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            pe.std_to_gamma(bad)


def test_profile_inner_products_against_quadrature():
    """⟨p_{a,s}, p_{b,u}⟩ = (a+1)(b+1) min(s,u)^{a+b+1} / ((a+b+1) s^{a+1} u^{b+1}), either order."""
    for a, s, b, u in [(6.94, 1.0, 16.97, 1.0), (6.94, 0.5, 16.97, 1.0), (16.97, 0.3, 6.94, 0.9),
                       (0.0, 1.0, 2.0, 0.25), (10.3, 0.7, 10.3, 0.7)]:
        m = min(s, u)
        tau = np.linspace(0.0, m, 400_001)
        quad = np.trapezoid((a + 1) * tau ** a / s ** (a + 1) * (b + 1) * tau ** b / u ** (b + 1), tau)
        assert pe.profile_inner(a, s, b, u) == pytest.approx(quad, rel=1e-6)
        assert pe.profile_inner(b, u, a, s) == pytest.approx(quad, rel=1e-6)
    # large exponents and step counts: no overflow, and the unit of time only scales it
    assert pe.profile_inner(96.99, 4e5, 16.97, 1e6) == pytest.approx(
        pe.profile_inner(96.99, 0.4, 16.97, 1.0) / 1e6, rel=1e-10)


def smooth_trajectory(T: int) -> np.ndarray:
    k = np.arange(1, T + 1, dtype=np.float64)
    return np.stack([np.sin(k / 300.0), (k / T) ** 2, np.exp(-k / 500.0), 1 + 0 * k], axis=1)


def reconstruct_from(snaps, target_std, T):
    x, residual = pe.posthoc_coefficients([s for s, _, _ in snaps],
                                          [pe.std_to_gamma(float(n[3:])) for _, n, _ in snaps],
                                          T, pe.std_to_gamma(target_std))
    return np.einsum("i,ij->j", x, np.stack([v for _, _, v in snaps])), x, residual


def test_posthoc_reconstruction_matches_the_tracked_profile_and_improves_with_density():
    """Snapshots of σ_rel 0.05 and 0.10 every N steps reconstruct σ_rel 0.075 and 0.15 at step T: close
    to the directly tracked profile of that length (relative error < 3e-4 with 40 snapshots), within the
    Cauchy–Schwarz bound of the profile residual, and the error falls as the snapshots get denser."""
    T = 2000
    thetas = smooth_trajectory(T)
    for target in (0.075, 0.15):
        tracked = next(iter(track(thetas, [target])[0].values()))
        errors = []
        for every in (500, 250, 100, 50):
            _, snaps = track(thetas, [0.05, 0.10], every=every)
            got, x, residual = reconstruct_from(snaps, target, T)
            assert x.sum() == pytest.approx(1.0, abs=1e-10)
            assert got[3] == pytest.approx(1.0, abs=1e-10)  # a constant is reproduced exactly
            err = np.abs(got - tracked)
            # |∫ (Σ x p − p_r) θ| ≤ ‖Σ x p − p_r‖ ‖θ‖: residual is relative to ‖p_r‖ = c^{1/2} (time in T)
            c = pe.profile_inner(pe.std_to_gamma(target), T, pe.std_to_gamma(target), T)
            norm_theta = np.sqrt((thetas ** 2).sum(0))  # ‖θ‖ of the piecewise-constant trajectory
            assert np.all(err <= residual * math.sqrt(c) * norm_theta * (1 + 1e-9) + 1e-12)
            errors.append(err[:3].max())
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 3e-4 and errors[0] / errors[-1] > 20, errors


def test_the_profile_residual_is_the_l2_distance_of_the_profiles():
    steps, gammas = [500, 1000, 1500, 2000] * 2, [pe.std_to_gamma(0.05)] * 4 + [pe.std_to_gamma(0.1)] * 4
    target = pe.std_to_gamma(0.075)
    x, residual = pe.posthoc_coefficients(steps, gammas, 2000, target)
    tau = np.linspace(0.0, 2000.0, 2_000_001)

    def p(g, t):
        return np.where(tau <= t, (g + 1) * (tau / t) ** g / t, 0.0)

    diff = sum(xi * p(g, t) for xi, g, t in zip(x, gammas, steps)) - p(target, 2000)
    l2 = math.sqrt(np.trapezoid(diff ** 2, tau) / np.trapezoid(p(target, 2000) ** 2, tau))
    assert residual == pytest.approx(l2, rel=1e-3)
    assert 0 < residual < 0.1


def test_reconstructing_a_tracked_length_gives_it_back():
    T = 1000
    thetas = smooth_trajectory(T)
    final, snaps = track(thetas, [0.05, 0.10], every=100)
    got, x, residual = reconstruct_from(snaps, 0.10, T)
    assert residual < 1e-6
    np.testing.assert_allclose(got, final["std0.100"], rtol=1e-7, atol=1e-9)


def test_names_and_parsing():
    assert pe.profile_name(0.05) == "std0.050" and pe.profile_name(0.1) == "std0.100"
    assert pe.profile_name(0.0125) == "std0.0125" and pe.profile_group("std0.050") == "ema_std0p050"
    assert [pe.parse_std(v) for v in ("std0.05", "0.050", 0.05, "std0.050")] == [0.05] * 4
    assert pe.parse_std("ema") is None and pe.parse_std("stdx") is None
    with pytest.raises(ValueError, match="duplicate"):
        pe.PowerEMA(Weights(1), [0.1, 0.10])


# --- the trainer ------------------------------------------------------------------------------------

def problem(**options):
    from ddp_worker import gmm_problem

    model, objective, data = gmm_problem(["objective.name=lmd"], n_train=400, n_eval=50)
    return Trainer(model, objective, data, **dict(dict(batch_size=32, lr=5e-3, grad_clip=1.0, seed=3,
                                                       ema_decay=0.9), **options))


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_trainer_profiles_equal_a_hand_reference():
    """θ(k) recorded after every step; the trainer's profiles equal the recursion written out per tensor
    (bit for bit) and the closed-form average Σ w_k θ(k) (float32 round-off); the classic EMA is
    untouched by the profiles (bit for bit the same as without them)."""
    trainer = problem(ema_std=[0.05, 0.10])
    classic = problem()
    assert list(trainer.averages) == ["ema", "std0.050", "std0.100"]
    assert trainer.ema is trainer.averages["std0.050"] and classic.ema is classic.averages["ema"]
    thetas = []
    hand = {s: None for s in (0.05, 0.10)}
    for k in range(1, 13):
        trainer.step()
        classic.step()
        theta = [p.detach().clone() for p in trainer.model.parameters()]
        thetas.append(torch.cat([t.reshape(-1) for t in theta]).double())
        for s in hand:
            beta = (1.0 - 1.0 / k) ** (pe.std_to_gamma(s) + 1.0)
            hand[s] = [t.clone() if hand[s] is None else h.lerp(t, 1.0 - beta)
                       for h, t in zip(hand[s] or theta, theta)]
    assert torch.equal(flat(trainer.averages["ema"]), flat(classic.ema))
    stacked = torch.stack(thetas)
    for s in hand:
        got = flat(trainer.averages[pe.profile_name(s)])
        assert torch.equal(got, torch.cat([h.reshape(-1) for h in hand[s]]))
        w = torch.from_numpy(pe.power_weights(pe.std_to_gamma(s), 12))
        torch.testing.assert_close(got.double(), w @ stacked, rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(trainer.averages["std0.050"]), flat(trainer.averages["std0.100"]))


@pytest.mark.parametrize("sync_every", [1, 4])
def test_skipped_steps_count_in_the_profiles_under_either_guard(sync_every):
    """A non-finite step leaves the weights unchanged; the profiles still average that step in
    (θ(t) = θ(t − 1)), identically under the host and the device guard."""
    from test_hot_loop import everything, guarded

    trainers = {}
    for device_guard in (False, True):
        trainer = guarded(device_guard, bad_calls={3, 5}, ema_std=[0.05, 0.10])
        trainer.run(8, progress=False, sync_every=sync_every)
        trainers[device_guard] = trainer
    a, b = everything(trainers[False]), everything(trainers[True])
    assert a.keys() == b.keys() and any(k.startswith("ema_std0p050.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reference: the recorded trajectory with the skipped steps repeating the previous weights
    trainer = guarded(False, bad_calls={3, 5}, ema_std=[0.10])
    thetas = []
    for _ in range(8):
        trainer.step()
        thetas.append(flat(trainer.model).double())
    w = torch.from_numpy(pe.power_weights(pe.std_to_gamma(0.10), 8))
    assert torch.equal(thetas[2], thetas[1]) and torch.equal(thetas[4], thetas[3])
    torch.testing.assert_close(flat(trainer.ema).double(), w @ torch.stack(thetas), rtol=1e-5, atol=1e-6)


def test_the_profiles_add_no_host_read():
    """Under the device guard (the CUDA path) a window of steps with two profiles still reads the host
    once: β is a Python number and the update one multi-tensor lerp per profile."""
    from test_hot_loop import HostReads, guarded

    trainer = guarded(True, ema_std=[0.05, 0.10])
    trainer.run(4, progress=False)
    with HostReads() as reads:
        trainer.run(8, progress=False, sync_every=4)
    assert reads.count == 2, reads.where


def test_trainer_with_profiles_resumes_bit_for_bit(tmp_path):
    from test_resume import assert_bit_identical, build, everything, save

    straight = build("lmd", ema_std=[0.05, 0.10])
    straight.run(10, progress=False)
    first = build("lmd", ema_std=[0.05, 0.10])
    first.run(6, progress=False)
    save(first, tmp_path / "ckpt")
    groups, meta = load_checkpoint(tmp_path / "ckpt")
    assert {"ema", "ema_std0p050", "ema_std0p100"} <= set(groups)
    assert [p["name"] for p in meta["trainer"]["ema_profiles"]] == ["std0.050", "std0.100"]
    resumed = build("lmd", init_seed=99, ema_std=[0.05, 0.10])
    resumed.load_state_dict(groups, meta["trainer"])
    resumed.run(4, progress=False)
    assert_bit_identical(everything(resumed), everything(straight))
    # a checkpoint without the profiles cannot resume a run that keeps them
    classic = build("lmd")
    classic.run(2, progress=False)
    tensors, cmeta = classic.state_dict()
    with pytest.raises(ValueError, match="ema_std0p050"):
        build("lmd", ema_std=[0.05]).load_state_dict(tensors, cmeta)


# --- configs ----------------------------------------------------------------------------------------

def test_config_keys():
    cfg = load_config("gmm", None, ["train.ema_std=0.05,0.10", "train.ema_snapshot_every=100"])
    assert cfg.train.ema_std == [0.05, 0.1] and cfg.train.ema_snapshot_every == 100
    assert load_config("gmm", None, ["train.ema_std=0.05"]).train.ema_std == [0.05]
    assert load_config("gmm", None, []).train.ema_std is None
    for bad, match in [("train.ema_std=0.5", "train.ema_std"), ("train.ema_std=0,0.1", "train.ema_std"),
                       ("train.ema_std=0.1,0.10", "differ"), ("train.ema_std=[]", "train.ema_std"),
                       ("train.ema_snapshot_every=10", "set train.ema_std"),
                       ("train.ema_std=abc", "train.ema_std")]:
        with pytest.raises(ConfigError, match=match) as err:
            load_config("gmm", None, [bad])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="ema_snapshot_every"):
        load_config("gmm", None, ["train.ema_std=0.1", "train.ema_snapshot_every=0"])


# --- runs and the command ---------------------------------------------------------------------------

TINY = ["model.width=16", "model.depth=2", "train.batch_size=64", "data.n_train=1000", "data.n_eval=200",
        "train.log_every=10", "eval.n_samples=200", "--quiet"]
POWER = ["train.ema_std=0.05,0.10", "train.ema_snapshot_every=10"]


def train(out: Path, *extra) -> None:
    assert main(["train", "--preset", "gmm", "--out", str(out), *TINY, *extra]) == 0


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("phema") / "run"
    train(run, "train.steps=45", "train.checkpoint_every=20", *POWER)
    return run


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_keeps_the_profiles_and_writes_snapshots(power_run):
    assert [k for k, _ in list_snapshots(power_run)] == [10, 20, 30, 40, 45]  # and the last step
    groups, meta = load_checkpoint(power_run / "checkpoints" / "final")
    assert {"model", "ema", "ema_std0p050", "ema_std0p100"} <= set(groups)
    assert meta["ema_default"] == "std0.050"
    assert [p["std"] for p in meta["ema_profiles"]] == [0.05, 0.1]
    snap, smeta = load_checkpoint(power_run / "ema_snapshots" / "step-00000045")
    assert set(snap) == {"ema_std0p050", "ema_std0p100"} and smeta["ema_snapshot"] == {"step": 45}
    for group in snap:  # the last snapshot is the final state of the profiles
        assert all(torch.equal(snap[group][k], groups[group][k]) for k in snap[group])
    # the default weights of sampling and export are the first profile; others by name
    assert load_model(power_run).weights == "std0.050"
    torch.testing.assert_close(load_model(power_run, use_ema="std0.1").model.state_dict(),
                               groups["ema_std0p100"], rtol=0, atol=0)
    assert load_model(power_run, use_ema="ema").weights == "ema"
    assert load_model(power_run, use_ema=False).weights == "model"
    with pytest.raises(Exception, match=r"no averaged weights named 'std0.2'; it holds ema, std0.050"):
        load_model(power_run, use_ema="std0.2")


def test_a_run_with_profiles_resumes_exactly(power_run, tmp_path):
    """25 steps, then --resume to 45: the final checkpoint and every snapshot equal the straight run's."""
    run = tmp_path / "resumed"
    train(run, "train.steps=25", "train.checkpoint_every=20", *POWER)
    assert main(["train", "--resume", "--out", str(run), "--quiet", "train.steps=45"]) == 0
    a, _ = load_checkpoint(run / "checkpoints" / "final")
    b, _ = load_checkpoint(power_run / "checkpoints" / "final")
    for group in ("model", "ema", "ema_std0p050", "ema_std0p100", "optim"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in b[group]), group
    # the same snapshots, plus the one at the end of the first leg (step 25: a true state of the profiles)
    resumed, straight = dict(list_snapshots(run)), dict(list_snapshots(power_run))
    assert sorted(resumed) == sorted([*straight, 25])
    for k, stem in straight.items():
        ga, gb = load_checkpoint(resumed[k])[0], load_checkpoint(stem)[0]
        assert all(torch.equal(ga[g][n], gb[g][n]) for g in gb for n in gb[g])


def test_flowmaps_ema_end_to_end(power_run, capsys, tmp_path):
    """``flowmaps ema RUN --std 0.075,0.10``: new checkpoints whose weights are the least-squares
    combination of the snapshots (recomputed here), the tracked length coming back as tracked."""
    assert main(["ema", str(power_run), "--std", "0.075,0.10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(f"wrote {power_run / 'ema' / 'std0.075-step00000045'}")
    loaded = load_model(power_run / "ema" / "std0.075-step00000045")
    assert loaded.weights == "std0.075" and loaded.metadata["step"] == 45
    posthoc = loaded.metadata["ema_posthoc"]
    # the coefficients, independently: every snapshot's two profiles
    snaps = [(k, n, load_checkpoint(stem)[0][pe.profile_group(n)])
             for k, stem in list_snapshots(power_run) for n in ("std0.050", "std0.100")]
    x, residual = pe.posthoc_coefficients([k for k, _, _ in snaps],
                                          [pe.std_to_gamma(float(n[3:])) for _, n, _ in snaps],
                                          45, pe.std_to_gamma(0.075))
    np.testing.assert_allclose(posthoc["coefficients"], x, rtol=1e-12)
    assert posthoc["profile_residual"] == pytest.approx(residual)
    expected = {key: sum(float(xi) * s[key].double() for xi, (_, _, s) in zip(x, snaps)).float()
                for key in snaps[0][2]}
    torch.testing.assert_close(loaded.model.state_dict(), expected, rtol=1e-6, atol=1e-7)
    # σ_rel 0.10 is tracked: its reconstruction is the tracked profile at step 45
    back = load_model(power_run / "ema" / "std0.100-step00000045").model.state_dict()
    tracked = load_checkpoint(power_run / "checkpoints" / "final")[0]["ema_std0p100"]
    torch.testing.assert_close(back, tracked, rtol=1e-5, atol=1e-6)
    # at an earlier snapshot; and the results sample and export like any checkpoint
    assert main(["ema", str(power_run), "--std", "0.2", "--step", "20"]) == 0
    assert load_model(power_run / "ema" / "std0.200-step00000020").metadata["step"] == 20
    capsys.readouterr()
    assert main(["sample", str(power_run / "ema" / "std0.075-step00000045"), "--n", "50", "--steps",
                 "1", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("samples_*.npy"))) == 1
    assert main(["export", str(power_run), str(tmp_path / "x"), "--ema", "std0.10"]) == 0
    assert "EMA weights std0.100" in capsys.readouterr().out
    torch.testing.assert_close(load(tmp_path / "x").state_dict(),
                               load_checkpoint(power_run / "checkpoints" / "final")[0]["ema_std0p100"],
                               rtol=0, atol=0)


@pytest.mark.parametrize("case", ["not a run", "no snapshots", "std out of range", "std not a number",
                                  "not a snapshot step", "exists", "sample both"])
def test_flowmaps_ema_refuses_bad_input_in_one_line(case, power_run, tmp_path, capsys):
    classic = tmp_path / "classic"
    if case == "no snapshots":
        (classic / "checkpoints").mkdir(parents=True)
        (classic / "config.yaml").write_text("preset: gmm\n")
    args = {"not a run": ["ema", str(tmp_path), "--std", "0.1"],
            "no snapshots": ["ema", str(classic), "--std", "0.1"],
            "std out of range": ["ema", str(power_run), "--std", "0.1,0.3"],
            "std not a number": ["ema", str(power_run), "--std", "x"],
            "not a snapshot step": ["ema", str(power_run), "--std", "0.1", "--step", "15"],
            "exists": ["ema", str(power_run), "--std", "0.12,0.15"],
            "sample both": ["sample", str(power_run), "--raw-weights", "--ema", "std0.1"]}[case]
    if case == "exists":  # the second output exists: neither is written
        assert main(["ema", str(power_run), "--std", "0.15"]) == 0
        capsys.readouterr()
    before = tree(power_run)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowmaps: error:"), err
    assert tree(power_run) == before
    expected = {"not a run": "not a run directory", "no snapshots": "no EMA snapshots",
                "std out of range": "(0, 0.2887]", "std not a number": "comma-separated numbers",
                "not a snapshot step": "not the step of a snapshot", "exists": "exists; not replaced",
                "sample both": "choose one"}[case]
    assert expected in err[0]


# --- classic-EMA runs and checkpoints keep working --------------------------------------------------

OLD_META = {"config", "step", "objective", "domain", "interpolant", "scales", "standardizer", "trainer",
            "best_validation_loss", "format", "format_version", "library_version", "groups",
            "weights_sha256"}
OLD_TRAINER = {"step", "bad_steps", "world_size", "seed", "batch_size", "grad_accum", "optimizer",
               "scheduler", "objective", "data_position"}


def test_a_classic_run_is_unchanged_and_an_old_checkpoint_trains_resumes_and_samples(tmp_path, capsys):
    """A run without train.ema_std writes the checkpoint format of before (same keys, same groups, no
    snapshots); a checkpoint and config written before the new keys existed (stripped of them here)
    loads, samples its EMA, resumes and trains on."""
    run = tmp_path / "classic"
    train(run, "train.steps=20", "train.checkpoint_every=10")
    assert not (run / "ema_snapshots").exists()
    groups, meta = load_checkpoint(run / "checkpoints" / "step-00000010")
    assert set(meta) == OLD_META and set(meta["trainer"]) == OLD_TRAINER
    assert set(groups) == {"model", "ema", "optim", "rng"}
    # make it old: no ema_std / ema_snapshot_every anywhere
    for path in [run / "checkpoints" / f"{s}.json" for s in ("step-00000010", "final", "best")]:
        data = json.loads(path.read_text())
        del data["config"]["train"]["ema_std"], data["config"]["train"]["ema_snapshot_every"]
        path.write_text(json.dumps(data))
    text = (run / "config.yaml").read_text()
    lines = [line for line in text.splitlines() if "ema_std" not in line and "ema_snapshot" not in line]
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    loaded = load_model(run)
    assert loaded.weights == "ema"
    torch.testing.assert_close(loaded.model.state_dict(),
                               load_checkpoint(run / "checkpoints" / "final")[0]["ema"], rtol=0, atol=0)
    with pytest.raises(Exception, match="no averaged weights named 'std0.1'; it holds ema$"):
        load_model(run, use_ema="std0.1")
    assert main(["sample", str(run), "--n", "50", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    assert main(["train", "--resume", "--out", str(run), "--quiet", "train.steps=30"]) == 0
    assert load_checkpoint(run / "checkpoints" / "final")[1]["step"] == 30
    straight = tmp_path / "straight"
    train(straight, "train.steps=30", "train.checkpoint_every=10")
    a, b = load_checkpoint(run / "checkpoints" / "final")[0], load_checkpoint(straight / "checkpoints"
                                                                              / "final")[0]
    assert all(torch.equal(a[g][k], b[g][k]) for g in ("model", "ema") for k in b[g])
    capsys.readouterr()
    assert main(["ema", str(run), "--std", "0.1"]) == 2
    assert "no EMA snapshots" in capsys.readouterr().err
