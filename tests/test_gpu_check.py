"""benchmarks/gpu_check.py (issue 18 part 6) in its CI-sized form on the CPU, and the host-sync counter it
relies on (flowmaps.train.host_syncs), which must see a sync where there is one."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from flowmaps.train.host_syncs import HostSyncs

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def run(tmp_path, *options) -> tuple[dict, str]:
    argv = ["--device", "cpu", "--quick", "--steps", "2", "--warmup", "0", "--out", str(tmp_path),
            "--name", "check", *options]
    assert gpu_check.main(argv) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    return result, (tmp_path / "check.md").read_text()


# Every objective on the DiT; on the U-Net (slower at this size) the JVP and guidance paths.
UNET_OBJECTIVES = ["lmd", "emd", "fmm", "lsd", "meanflow", "imf"]


@pytest.mark.parametrize("net, objectives", [("dit", list(gpu_check.OBJECTIVES)),
                                             ("unet", UNET_OBJECTIVES)])
def test_the_quick_cpu_run_reports_every_row(net, objectives, tmp_path):
    result, table = run(tmp_path, "--objectives", ",".join(objectives), "--nets", net,
                        "--precision", "fp32", "--compile", "off")
    info, rows = result["info"], result["rows"]
    assert {"torch", "device_name", "loadavg_before", "loadavg_after", "threads", "command",
            "memory_method", "sync_method", "timing_method"} <= set(info)
    assert info["command"].startswith("python ") and "--quick" in info["command"]
    assert info["threads"] == 1 and info["device"] == "cpu"
    keys = [(r["net"], r["objective"], r["precision"], r["compile"]) for r in rows]
    assert sorted(keys) == sorted((net, o, "fp32", "off") for o in {"velocity", *objectives})
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("ratio", "ratio_per_round", "ms_per_step", "velocity_ms_per_step", "wall_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_step_mb"] > 0 and r["state_mb"] > 0, r
        assert isinstance(r["syncs_per_step"], int) and all(isinstance(c, int) for c in r["syncs_by_step"])
        assert r["syncs_per_step"] == 0, r["sync_sites"]  # the trainer and every objective are sync-free
        assert r["agreement_max_rel_diff"] is not None and r["agreement_max_rel_diff"] <= 1e-12, r
        assert f"| {r['net']} | {r['objective']} | fp32 | off |" in table
    assert table.count("\n| ") == len(rows) + 1  # a header and one line per row


def test_bf16_and_compiled_rows_run_or_say_why(tmp_path):
    result, table = run(tmp_path, "--objectives", "meanflow", "--nets", "dit", "--precision", "bf16",
                        "--compile", "on")
    rows = result["rows"]
    assert [(r["objective"], r["precision"], r["compile"]) for r in rows] == [
        ("velocity", "bf16", "on"), ("meanflow", "bf16", "on")]
    assert result["info"]["compile_backend"] == "eager"
    for r in rows:
        assert r["status"] == "ok" or (r["status"] == "error" and "\n" not in r["error"]), r
        assert r["status"] != "ok" or (math.isfinite(r["ratio"]) and r["ratio"] > 0)


def test_a_failing_build_is_reported_in_its_rows_not_raised(tmp_path, monkeypatch):
    real = gpu_check.build_trainer

    def failing(objective, net, size, args, data, labels, teacher, precision, compiled, seed):
        if compiled:
            raise RuntimeError("backend exploded\nwith a second line")
        return real(objective, net, size, args, data, labels, teacher, precision, compiled, seed)

    monkeypatch.setattr(gpu_check, "build_trainer", failing)
    result, table = run(tmp_path, "--objectives", "psd", "--nets", "dit", "--precision", "fp32",
                        "--compile", "off,on")
    by_compile = {(r["objective"], r["compile"]): r for r in result["rows"]}
    assert by_compile[("psd", "off")]["status"] == "ok"
    failed = by_compile[("psd", "on")]
    assert failed["status"] == "error"
    assert failed["error"] == "velocity baseline: RuntimeError: backend exploded with a second line"
    assert "backend exploded" in table


@pytest.mark.parametrize("argv, message", [
    (["--nets", "resnet"], "--nets: resnet"),
    (["--objectives", "lmd,nope"], "--objectives: nope"),
    (["--precision", "fp16"], "--precision: fp16"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--device", "cuda:99"], "cuda"),
    (["--device", "tpu"], "not a device"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- the sync counter

X = torch.linspace(-1.0, 1.0, 7)


@pytest.mark.parametrize("name, fn", [
    ("item", lambda: X[0].item()),
    ("bool", lambda: bool(X[1] > 0)),
    ("if", lambda: 1 if (X > 0).any() else 0),
    ("float", lambda: float(X.sum())),
    ("tolist", lambda: X.tolist()),
    ("mask", lambda: X[X > 0]),
    ("nonzero", lambda: torch.nonzero(X)),
    ("where", lambda: torch.where(X > 0)),
    ("unique", lambda: torch.unique(X)),
    ("equal", lambda: torch.equal(X, X)),
])
def test_the_counter_sees_a_host_read(name, fn):
    with HostSyncs("cpu") as syncs:
        fn()
    assert syncs.count >= 1, name
    assert all("test_gpu_check.py" in site for site in syncs.sites), syncs.sites


def test_the_counter_counts_nothing_in_sync_free_code():
    def sync_free():
        y = torch.where(X > 0, X, 0.0).exp() * 2
        z = torch.full((3,), 0.5) + y[:3]
        mask = X > 0
        return (y.masked_fill(~mask, 0.0).sum() + z.sum()).clamp(max=1.0), y[torch.tensor([0, 2])]

    with HostSyncs("cpu") as syncs:
        sync_free()
    assert syncs.count == 0, syncs.sites
    with HostSyncs("cuda") as syncs:  # reads of CPU tensors do not count for another device
        X[0].item()
    assert syncs.count == 0


def test_the_counter_sees_blocking_copies_between_host_and_device():
    """On a CPU-only machine the copy rules are checked on the meta device (no data, but copies)."""
    like = torch.empty(4, device="meta")
    with HostSyncs("meta") as syncs:
        X.to("meta")
        like.copy_(torch.ones(4))
        X.to("meta", non_blocking=True)  # does not block
        like + 1.0  # no copy
    assert syncs.count == 2 and set(syncs.ops) == {"aten._to_copy", "aten.copy_"}, syncs.sites


def test_cpu_draws_are_the_same_whatever_the_generator():
    draws = []
    for seed in (0, 1):
        with gpu_check.CPUDraws(7):
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(5, generator=g)
            b = torch.empty(3).uniform_(generator=g)
            c = torch.rand(2)
        draws.append(torch.cat([a, b, c]))
    assert torch.equal(draws[0], draws[1])
