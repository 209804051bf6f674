"""Benchmark — GPU check (issue 18): what one training step of each objective costs on a device, whether it
waits for the device, and whether the device computes the same loss as the CPU.

One row per (network, objective, precision, compile), every row a full ``flowmaps.Trainer.step()``:

* **step time against a velocity step** of the same network, precision and compile setting: the row's
  trainer and a velocity trainer take turns, one step each per round in a freshly shuffled order, so
  drift hits both alike. On CUDA a step is timed by CUDA events after a ``torch.cuda.synchronize()``
  (the device's time for the step, host gaps included); on the CPU by the process's CPU time (robust on
  a shared machine), wall-clock beside it. The ratio is of the medians; the per-round ratio beside it.
* **peak memory** of one more step, above what was allocated when it began: on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (also the process's absolute
  peak); on the CPU the running sum of the allocator's allocation and free events recorded by
  ``torch.profiler`` (``profile_memory=True``), which is the same quantity for the CPU allocator. The
  trainer's persistent state (weights, gradients, optimiser state, EMA) is reported beside it.
* **host syncs per step** (the goal is 0): :class:`flowmaps.train.host_syncs.HostSyncs` counts the ATen
  operations that make the host wait for the device (value reads, data-dependent shapes, blocking
  copies), with where each was issued; on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` counts the
  synchronising CUDA calls as a cross-check. A CPU run counts the same reads (the rehearsal of a GPU
  run) but cannot see host-device copies; it lists instead the tensors made from Python numbers, which
  are blocking copies where a GPU run makes them on the device.
* **device vs CPU loss agreement**: a tiny float64 network of the row's kind, the same weights, batch and
  random draws (every seeded random operation is drawn on the CPU and moved), loss and gradients once
  on ``--device`` and once on the CPU; the largest relative difference (per tensor, against its largest
  magnitude). On ``--device cpu`` it is the CPU-vs-CPU check of this plumbing and must be 0.

The trainer runs as on CUDA on every device: the fused Adam with the device guard (``fused=True``), so a
CPU run executes the code a GPU runs. Networks and settings are the ``imagenet256`` preset's (Adam,
betas (0.9, 0.95), lr 1e-4, EMA 0.9999, class-conditional with label dropout 0.1, each objective's block
of the preset) on synthetic 4-channel latents with random labels (nothing is downloaded):

* full size: the DiT-B/2 of the preset (768 wide, 12 blocks, 12 heads, patch 2: 256 tokens) and the
  ``imagenet32`` preset's U-Net (128 channels, multipliers 1-2-2-2, 3 blocks per level, attention at
  16 and 8) on 4x32x32 latents, 1000 classes, batch 16; by default the objectives the ``imagenet256``
  preset configures (lmd, lsd, meanflow, imf) and the velocity row.
* ``--quick`` (CI-sized): a 32-wide 2-block DiT and a 16-channel U-Net on 4x8x8 latents, 10 classes,
  batch 4, every objective; its compile-on rows use the ``eager`` backend (dynamo traces the step, its
  graph breaks and failures show, no code is generated: the inductor takes minutes per network on a
  CPU), ``--compile-backend inductor`` for the real thing.

Sizing the full run for <= 10 minutes on one GPU (an estimate: no GPU figure exists yet). DiT-B/2 is
about 23 GFLOPs per 256-token forward pass, so a velocity step at batch 16 (forward + backward, about 3
passes) is about 1.1 TFLOP and a JVP objective's about 2.5x that: on an A100 about 0.08 s and 0.2 s in
fp32 (torch's default full-precision matmuls, no TF32), four to six times less in bf16; the U-Net is
cheaper. A row is 3 warm-up and 10 timed rounds of two steps plus 5 measured steps (memory, syncs):
about 5 s (fp32) and 1.5 s (bf16) for the DiT, so the eager rows take about 2 minutes. Memory: at most
two trainers (about 2.6 GB of state each for DiT-B) and the teacher live at once, plus a batch of 16's
activations, under 16 GB. With ``--compile on`` the first compiled step of each (network, precision)
is the cost (the inductor compiles forward and backward, typically 0.5 to 2 minutes; later models of
the same architecture reuse the compiled code). ``--budget`` (default 450 s) stops starting rows once
it is spent and reports the rest as not run; a row takes at most a first compile (about 2 minutes), so
the command ends within 10 minutes whatever the compile times are. The first GPU run tells how many
rows fit.

    python benchmarks/gpu_check.py                          # full size, on CUDA when present
    python benchmarks/gpu_check.py --device cpu --quick     # CI-sized (tests/test_gpu_check.py)

Writes ``<out>/<name>.json`` (every number, the exact command, torch version, device name, load average
before and after, threads) and ``<out>/<name>.md`` (the table); ``<name>`` defaults to
``<device type>-quick`` or ``<device type>-full``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import flowmaps as fm
from flowmaps.runs import experiment as ex
from flowmaps.runs import models
from flowmaps.runs.config import ConfigError, load_config
from flowmaps.runs.devices import open_device
from flowmaps.runs.validation import CHOICES
from flowmaps.train.host_syncs import HostSyncs
from flowmaps.train.trainer import COMPILE_BACKENDS, Trainer

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "gpu_check"
OBJECTIVES = CHOICES["objective.name"]
PRESET_OBJECTIVES = ("lmd", "lsd", "meanflow", "imf")  # the imagenet256 preset's blocks
NETS = ("unet", "dit")
PRECISIONS = ("fp32", "bf16")
COMPILE = ("off", "on")
PRESET = "imagenet256"

# Network sizes: config overrides of the imagenet256 preset, the latent shape, classes and batch.
SIZES = {
    "full": {"shape": (4, 32, 32), "classes": 1000, "batch": 16, "steps": 10, "warmup": 3,
             "unet": ["model.channels=128", "model.channel_mults=[1,2,2,2]", "model.blocks_per_level=3",
                      "model.attention_resolutions=[16,8]"],
             "dit": []},  # the preset's DiT-B/2
    "quick": {"shape": (4, 8, 8), "classes": 10, "batch": 4, "steps": 3, "warmup": 1,
              "unet": ["model.channels=16", "model.channel_mults=[1,2]", "model.blocks_per_level=1",
                       "model.attention_resolutions=[4]"],
              "dit": ["model.dit_width=32", "model.dit_depth=2", "model.heads=2"]},
}
AGREEMENT_BATCH = 4
SYNC_STEPS = 2  # steps counted by HostSyncs (and by the CUDA sync debug mode)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"gpu_check: error: {message}\n")


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise ValueError(f"{what}: {', '.join(bad) or 'nothing given'} not among {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"cpu, cuda, cuda:N or mps (default {default_device})")
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny networks, few steps, every objective")
    p.add_argument("--objectives", default=None,
                   help="comma-separated (default: every objective with --quick, else "
                        f"{','.join(PRESET_OBJECTIVES)}); the velocity row always runs")
    p.add_argument("--nets", default="unet,dit")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--compile", default="off,on")
    p.add_argument("--compile-backend", default=None, choices=COMPILE_BACKENDS,
                   help="torch.compile backend of the compile-on rows (default inductor; with --quick "
                        "eager: dynamo traces the step, no code is generated)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per row (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    p.add_argument("--batch", type=int, default=None, help="batch per step (default 16, quick 4)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds after which no new row starts (the rest are reported as not run); 0: none")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the JSON and the table")
    p.add_argument("--name", default=None, help="file stem (default <device type>-quick or -full)")
    args = p.parse_args(argv)
    try:
        args.nets = _choices(args.nets, NETS, "--nets")
        args.precision = _choices(args.precision, PRECISIONS, "--precision")
        args.compile = _choices(args.compile, COMPILE, "--compile")
        wanted = args.objectives or ",".join(OBJECTIVES if args.quick else PRESET_OBJECTIVES)
        args.objectives = _choices(wanted, OBJECTIVES, "--objectives")
    except ValueError as err:
        p.error(str(err))
    size = SIZES["quick" if args.quick else "full"]
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    for key in ("steps", "warmup", "batch"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
    if args.steps < 2 or args.warmup < 0 or args.batch < 1:
        p.error("--steps must be >= 2, --warmup >= 0 and --batch >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.budget < 0 or not math.isfinite(args.budget):
        p.error("--budget must be a number of seconds >= 0")
    try:
        args.device = open_device(args.device)[0]
    except ConfigError as err:
        p.error(str(err))
    args.name = args.name or f"{args.device.type}-{'quick' if args.quick else 'full'}"
    return args


# --------------------------------------------------------------------------- building rows

def _config(objective: str, net: str, size: dict):
    return load_config(PRESET, None, [f"objective.name={objective}", f"model.name={net}", *size[net]])


def _scales(size: dict) -> dict:
    c, h, w = size["shape"]
    return {"sigma0": 1.0, "sigma_data": 1.0, "dim": c * h * w, "shape": list(size["shape"]),
            "num_classes": size["classes"]}


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Random weights in the zero-initialised layers too (drawn on the CPU), so that no output,
    tangent or gradient is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return model


def build_teacher(net: str, size: dict, device, dtype=torch.float32):
    """A velocity network of the row's architecture, jittered (a trained teacher's cost and a non-zero
    velocity), frozen."""
    torch.manual_seed(1)
    teacher = models.build_model(_config("velocity", net, size), _scales(size))
    return _jitter(teacher.to(dtype), seed=1).to(device).requires_grad_(False)


def build_objective(objective: str, net: str, size: dict, teacher):
    cfg = _config(objective, net, size)
    scales = _scales(size)
    interpolant = models.build_interpolant(cfg, scales)
    return cfg, ex.build_objective(cfg, interpolant, teacher if ex.needs_teacher(cfg) else None,
                                   num_classes=size["classes"])


def build_trainer(objective: str, net: str, size: dict, args, data, labels, teacher, precision: str,
                  compiled: bool, seed: int) -> Trainer:
    cfg, obj = build_objective(objective, net, size, teacher)
    torch.manual_seed(seed)
    model = models.build_model(cfg, _scales(size)).to(args.device)
    t = cfg.train
    return Trainer(model, obj, data, batch_size=args.batch, lr=t.lr, optimizer=t.optimizer,
                   weight_decay=t.weight_decay, grad_clip=t.grad_clip, lr_decay_start=t.lr_decay_start,
                   ema_decay=t.ema_decay, seed=seed, max_bad_steps=10**9, precision=precision,
                   compile=compiled, compile_backend=args.compile_backend, labels=labels,
                   label_dropout=t.label_dropout, null_label=size["classes"], lr_schedule=t.lr_schedule,
                   warmup_steps=t.warmup_steps, total_steps=t.steps, lr_final=t.lr_final,
                   ema_warmup=t.ema_warmup, betas=tuple(t.betas), fused=t.optimizer in ("adam", "adamw"))


# --------------------------------------------------------------------------- measurements

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Trainer, device) -> dict:
    """One step: ``ms`` (CUDA events on CUDA, process CPU time elsewhere), ``wall_ms``, ``cpu_ms``."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.step()
    if device.type == "cuda":
        end.record()
    _sync(device)
    out = {"wall_ms": 1e3 * (time.perf_counter() - wall), "cpu_ms": 1e3 * (time.process_time() - cpu)}
    out["ms"] = start.elapsed_time(end) if device.type == "cuda" else out["cpu_ms"]
    return out


def cpu_step_peak(step) -> int:
    """Bytes: the peak, during ``step()``, of the CPU allocator's running sum of allocations minus frees
    since the step began, from ``torch.profiler``'s memory events (a block allocated before the step
    has no size in them; its free is left out, so the sum counts the step's own allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [(e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for _, _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def step_memory(trainer: Trainer, device) -> dict:
    """Peak memory of one step above its start (and on CUDA the process's absolute peak), in MB. The
    gradients are set to None first (the step does it anyway), so that on every device the peak counts
    the memory the step allocates, its gradients included."""
    trainer.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_step_mb": (peak - before) / 2**20, "peak_total_mb": peak / 2**20}
    if device.type == "cpu":
        return {"peak_step_mb": cpu_step_peak(trainer.step) / 2**20, "peak_total_mb": None}
    trainer.step()  # mps: no per-step peak in torch
    return {"peak_step_mb": None, "peak_total_mb": None}


def state_mb(trainer: Trainer) -> float:
    """The trainer's persistent tensors (weights, gradients, optimiser state, EMA, objective modules),
    each storage once, in MB."""
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    for average in trainer.averages.values():
        tensors += list(average.parameters()) + list(average.buffers())
    for module in trainer.objective.trainable_modules():
        tensors += list(module.parameters())
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total / 2**20


def count_syncs(trainer: Trainer, device) -> dict:
    """Host syncs of :data:`SYNC_STEPS` steps, one count per step, with their sites; on CUDA also the
    synchronising calls ``torch.cuda.set_sync_debug_mode("warn")`` reports."""
    counts, sites, made = [], {}, {}
    for _ in range(SYNC_STEPS):
        with HostSyncs(device) as syncs:
            trainer.step()
        counts.append(syncs.count)
        if syncs.count >= max(counts):
            sites = dict(syncs.sites)
        made = dict(syncs.host_made)
    out = {"syncs_per_step": max(counts), "syncs_by_step": counts, "sync_sites": sites,
           "host_made_per_step": sum(made.values()), "host_made_sites": made}
    if device.type == "cuda":
        warned = []
        for _ in range(SYNC_STEPS):
            _sync(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            warned.append(sum("synchroniz" in str(w.message) for w in caught))
        out["cuda_sync_warnings_per_step"] = max(warned)
    return out


class CPUDraws(TorchDispatchMode):
    """Every seeded random operation drawn on the CPU from one generator and moved to its device: the
    same draws on every device (a CUDA generator's stream differs from the CPU's)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        names = [a.name for a in func._schema.arguments]
        tensors = [t for t in (list(args) + list(kwargs.values())) if isinstance(t, torch.Tensor)]
        device = kwargs.get("device") or (tensors[0].device if tensors else torch.device("cpu"))
        to_cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
        cpu_args, cpu_kwargs = tree_map(to_cpu, list(args)), tree_map(to_cpu, kwargs)
        if "device" in names:
            cpu_kwargs["device"] = torch.device("cpu")
        if "generator" in names:
            cpu_kwargs["generator"] = self.generator
        else:  # drawn from the global generator: seed it from ours
            torch.manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
        out = func(*cpu_args, **cpu_kwargs)
        if func._schema.is_mutable and tensors:  # in place: write the CPU draw back
            return args[0].copy_(out if isinstance(out, torch.Tensor) else cpu_args[0])
        return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, out)


def loss_and_grads(objective: str, net: str, device, seed: int = 0) -> list[torch.Tensor]:
    """Loss and gradients (on the CPU) of one float64 step of a tiny network of kind ``net``."""
    size = SIZES["quick"]
    teacher = build_teacher(net, size, device, torch.float64)
    cfg, obj = build_objective(objective, net, size, teacher)
    torch.manual_seed(seed)
    model = _jitter(models.build_model(cfg, _scales(size)).double(), seed=2).to(device)
    modules = obj.trainable_modules()
    for module in modules:
        module.to(device=device, dtype=torch.float64)
    if hasattr(model, "domain"):
        model.domain = obj.domain
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(AGREEMENT_BATCH, *size["shape"], generator=g, dtype=torch.float64).to(device)
    cond = torch.randint(size["classes"], (AGREEMENT_BATCH,), generator=g).to(device)
    model.train()
    obj.begin_step(model, 0)
    with CPUDraws(seed):
        out = obj(model, x1, cond, generator=torch.Generator(device).manual_seed(seed))
        out.loss.backward()
    params = list(model.parameters()) + [p for m in modules for p in m.parameters()]
    return [out.loss.detach().cpu()] + [p.grad.detach().cpu() for p in params if p.grad is not None]


def agreement(objective: str, net: str, device) -> float:
    """Largest relative difference between ``device`` and the CPU over the loss and every gradient."""
    ours, reference = loss_and_grads(objective, net, device), loss_and_grads(objective, net, "cpu")
    if len(ours) != len(reference):
        return math.inf
    worst = 0.0
    for a, b in zip(ours, reference):
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# --------------------------------------------------------------------------- the run

def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(row: dict, base: Trainer, make, args, order_rng: random.Random) -> None:
    """Time the row's trainer against ``base`` (interleaved), then its memory and syncs."""
    device = args.device
    started = time.perf_counter()
    trainer = make()
    first = timed_step(trainer, device)  # the compiled rows compile here
    row["first_step_s"] = round(time.perf_counter() - started, 2)
    for _ in range(max(args.warmup - 1, 0)):
        trainer.step()
    times = {"row": [], "base": []}
    pair = [("row", trainer), ("base", base)]
    for _ in range(args.steps):
        order_rng.shuffle(pair)
        for key, tr in pair:
            times[key].append(timed_step(tr, device))
    med = {k: statistics.median(t["ms"] for t in v) for k, v in times.items()}
    wall = {k: statistics.median(t["wall_ms"] for t in v) for k, v in times.items()}
    per_round = [r["ms"] / b["ms"] for r, b in zip(times["row"], times["base"])]
    row.update(ms_per_step=med["row"], velocity_ms_per_step=med["base"], ratio=med["row"] / med["base"],
               ratio_per_round=statistics.median(per_round), wall_ms=wall["row"],
               velocity_wall_ms=wall["base"], wall_ratio=wall["row"] / wall["base"],
               first_step_ms=first["ms"])
    row.update(step_memory(trainer, device))
    row["state_mb"] = state_mb(trainer)
    row.update(count_syncs(trainer, device))
    row["skipped_steps"] = trainer.bad_steps
    row["status"] = "ok"
    del trainer


def run(args) -> dict:
    device = args.device
    size = SIZES["quick" if args.quick else "full"]
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n = max(256, 4 * args.batch)
    data = torch.randn(n, *size["shape"], generator=g).to(device)
    labels = (torch.arange(n) % size["classes"]).to(device)
    objectives = ["velocity"] + [o for o in args.objectives if o != "velocity"]
    order_rng = random.Random(args.seed)
    rows, start = [], time.perf_counter()
    agreements: dict[tuple[str, str], float | str] = {}
    for compiled in args.compile:
        for precision in args.precision:
            for net in args.nets:
                group = [dict(net=net, objective=o, precision=precision, compile=compiled,
                              status="not run", error=None) for o in objectives]
                rows += group
                if args.budget and time.perf_counter() - start > args.budget:
                    for row in group:
                        row["error"] = f"time budget ({args.budget:.0f} s) spent"
                    continue
                teacher = build_teacher(net, size, device) if any(
                    ex.needs_teacher(_config(o, net, size)) for o in objectives) else None

                def make(objective, seed, _net=net, _precision=precision, _teacher=teacher,
                         _compiled=compiled):
                    return build_trainer(objective, _net, size, args, data, labels, _teacher,
                                         _precision, _compiled == "on", seed)
                try:
                    base = make("velocity", args.seed + 100)
                    for _ in range(args.warmup):
                        base.step()
                except Exception as err:  # noqa: BLE001 - reported in the rows
                    for row in group:
                        row.update(status="error", error=f"velocity baseline: {_one_line(err)}")
                    _release(device)
                    continue
                for row in group:
                    if args.budget and time.perf_counter() - start > args.budget:
                        row["error"] = f"time budget ({args.budget:.0f} s) spent"
                        continue
                    try:
                        run_row(row, base, lambda o=row["objective"]: make(o, args.seed), args,
                                order_rng)
                    except Exception as err:  # noqa: BLE001 - a failed compile or step is a row's note
                        row.update(status="error", error=_one_line(err))
                    _release(device)
                    key = (net, row["objective"])
                    if key not in agreements:
                        try:
                            agreements[key] = agreement(row["objective"], net, device)
                        except Exception as err:  # noqa: BLE001
                            agreements[key] = _one_line(err)
                    value = agreements[key]
                    row["agreement_max_rel_diff"] = value if isinstance(value, float) else None
                    if not isinstance(value, float):
                        row["agreement_error"] = value
                del base, teacher, make  # make's defaults hold the teacher
                _release(device)
    return {"rows": rows, "seconds": time.perf_counter() - start}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine()
    return device.type


def _fmt(value, spec: str = ".2f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{unit}"


def table(info: dict, rows: list[dict]) -> str:
    cuda = info["device"].startswith("cuda")
    timer = "CUDA-event ms" if cuda else "CPU ms"
    lines = [
        f"GPU check on {info['device']} ({info['device_name']}), torch {info['torch']}, "
        f"{info['threads']} thread(s), batch {info['batch']}, {info['size']} size, {info['steps']} timed "
        f"rounds; loadavg {info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f}; "
        f"{info['seconds']:.0f} s",
        "",
        f"Command: `{info['command']}`",
        "",
        f"| net | objective | precision | compile | {timer}/step | velocity {timer}/step | **ratio** "
        "| per-round ratio | peak MB (step) | state MB | host syncs/step | "
        + ("sync-debug warnings/step | " if cuda else "")
        + "device vs CPU max rel. diff | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            note = r["error"] or r["status"]
            lines.append(f"| {r['net']} | {r['objective']} | {r['precision']} | {r['compile']} | — | — | — "
                         f"| — | — | — | — | " + ("— | " if cuda else "")
                         + f"{_fmt(r.get('agreement_max_rel_diff'), '.1e')} | {note} |")
            continue
        ops = ", ".join(sorted({s.split(' at ')[0] for s in r["sync_sites"]})) or ""
        note = f"syncs: {ops}" if ops else ""
        if r.get("skipped_steps"):
            note += f" skipped steps: {r['skipped_steps']}"
        if r.get("agreement_error"):
            note += f" agreement: {r['agreement_error']}"
        lines.append(
            f"| {r['net']} | {r['objective']} | {r['precision']} | {r['compile']} | "
            f"{r['ms_per_step']:.2f} | {r['velocity_ms_per_step']:.2f} | **{r['ratio']:.2f}×** | "
            f"{r['ratio_per_round']:.2f}× | {_fmt(r['peak_step_mb'], '.1f')} | {r['state_mb']:.1f} | "
            f"{r['syncs_per_step']} | "
            + (f"{r['cuda_sync_warnings_per_step']} | " if cuda else "")
            + f"{_fmt(r.get('agreement_max_rel_diff'), '.1e')} | {note.strip()} |")
    lines += ["", f"Ratios: the row's median step over the velocity step's, measured in alternation "
              f"({timer}; wall-clock in the JSON). Peak: {info['memory_method']}. Host syncs: "
              f"{info['sync_method']}"]
    sites: dict[str, int] = {}
    made: dict[str, int] = {}
    for r in rows:
        for site, n in (r.get("sync_sites") or {}).items():
            sites[site] = max(sites.get(site, 0), n)
        for site, n in (r.get("host_made_sites") or {}).items():
            made[site] = max(made.get(site, 0), n)
    if sites:
        lines += ["", "Where the syncs are issued (most per step in any row):", ""]
        lines += [f"- `{site}`: {n}" for site, n in sorted(sites.items())]
    if made:
        lines += ["", "Tensors made from Python numbers during a step (not syncs on the CPU; blocking "
                  "copies where a GPU run makes them on the device; most per step in any row):", ""]
        lines += [f"- `{site}`: {n}" for site, n in sorted(made.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = args.device
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    # Every row compiles its own model: more compiled variants than dynamo keeps by default.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    load_before = os.getloadavg()
    with torch._dynamo.config.patch(**{limit: max(getattr(torch._dynamo.config, limit), 256)}):
        result = run(args)
    load_after = os.getloadavg()
    script = os.path.relpath(__file__)
    info = dict(
        command=shlex.join(["python", script, *argv]), device=str(device), device_name=device_name(device),
        torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
        machine=platform.machine(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        loadavg_before=load_before, loadavg_after=load_after, seconds=result["seconds"],
        size="quick" if args.quick else "full", batch=args.batch, steps=args.steps, warmup=args.warmup,
        budget_s=args.budget, compile_backend=args.compile_backend, preset=PRESET,
        latent_shape=list(SIZES["quick" if args.quick else "full"]["shape"]),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        flowmaps_source=str(Path(fm.__file__).parent),
        timing_method=("CUDA events around each step after torch.cuda.synchronize(); the ratio is of "
                       "their medians" if device.type == "cuda" else
                       "process CPU time (time.process_time) of each step; wall-clock (perf_counter) "
                       "beside it; the ratio is of the CPU-time medians"),
        memory_method=("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
                       "memory_allocated at the step's start (peak_total_mb: the absolute peak)"
                       if device.type == "cuda" else
                       "torch.profiler memory events (profile_memory=True): the peak of the CPU "
                       "allocator's running allocations minus frees since the step began"
                       if device.type == "cpu" else "not measured on this device"),
        sync_method=("flowmaps.train.host_syncs.HostSyncs (a TorchDispatchMode counting value reads, "
                     "data-dependent shapes and blocking host-device copies of tensors on the device), "
                     "the most in any of "
                     f"{SYNC_STEPS} steps"
                     + ("; cross-check: torch.cuda.set_sync_debug_mode('warn') warnings per step"
                        if device.type == "cuda" else
                        "; on the CPU the same reads are counted, host-device copies cannot be seen")),
        trainer="imagenet256 preset's optimisation, fused Adam with the device guard (fused=True)",
    )
    rows = result["rows"]
    text = table(info, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(dict(info=info, rows=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
