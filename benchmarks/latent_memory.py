"""Benchmark — memory of latent data: peak RSS of reading a set of latent shards lazily (the ``latents``
dataset, :class:`flowmaps.data.latents.LatentShards`) against reading it whole, and of a short
``flowmaps train --preset latents`` run on it.

The data: ``--shards`` random float16 shards of ``--rows`` latents ``4×32×32`` (the shape of SD-VAE
latents of 256×256 images; 8 × 8192 rows = 512 MiB by default) with labels, in the format
``flowmaps encode`` writes (index, shards, a held-out file), in a temporary folder. Every measurement
is a fresh subprocess; the parent reads its peak RSS from ``os.wait4`` (``ru_maxrss``) and the child
reports ``VmRSS`` before reading (after its imports and one warm-up of the ops a draw uses) and
``VmHWM`` (its peak) from ``/proc/self/status``. Modes:

* ``lazy`` — ``LatentShards``: batches of ``--batch-size`` drawn until every shard was visited twice;
* ``whole`` — every shard read with ``safetensors.torch.load_file`` and concatenated (float16), then
  the same number of batches drawn from it: what a reader holding the set costs;
* ``train`` — ``flowmaps train --preset latents`` for ``--steps`` steps on the set (velocity, a small
  U-Net, class-conditional), which loads, trains and checkpoints as a user's run does (its sample sheet
  is skipped: the synthetic set has no VAE); ``train_one_shard`` — the same run on a set of one such
  shard: the difference between the two is what the other shards cost a run (a reader holding the set
  would add their bytes).

Results: ``benchmarks/results/latent_memory.{json,md}``. Nothing is downloaded.
Run: ``.venv/bin/python benchmarks/latent_memory.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "latent_memory.json"
MODES = ("lazy", "whole", "train", "train_one_shard")
MIB = 2 ** 20
SHAPE = (4, 32, 32)


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args) -> int:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    warm = torch.randn(64, *SHAPE).half()
    for _ in range(3):  # the ops of a draw, once, so the baseline includes their set-up
        float(warm[torch.randint(64, (args.batch_size,), generator=g)].float().sum())
        bool(torch.isfinite(warm).all())
    from flowmaps.cli.main import main as flowmaps_main
    from flowmaps.data.latents import LatentShards, read_index

    baseline = _status("VmRSS")
    start = time.perf_counter()
    report = {}
    if args.mode.startswith("train"):
        code = flowmaps_main(["train", "--preset", "latents", f"data.path={args.data}", "--out", args.run,
                              "--overwrite", "--quiet", "model.class_conditional=true", "model.channels=16",
                              f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                              f"train.checkpoint_every={args.steps + 1}", "train.threads=1"])
        if code != 0:
            return code
        report["steps"] = args.steps
    else:
        index = read_index(args.data)
        draws = 2 * index["count"] // args.batch_size + 1
        if args.mode == "lazy":
            source = LatentShards(args.data, labeled=True, seed=0)
            for _ in range(draws):
                x, _ = source.draw_labeled(args.batch_size, g)
            report["shard_loads"] = source.loads
        else:
            from safetensors.torch import load_file

            parts = [load_file(str(Path(args.data) / s["file"])) for s in index["shards"]]
            z = torch.cat([p["latents"] for p in parts])
            del parts
            for _ in range(draws):
                x = z[torch.randint(z.shape[0], (args.batch_size,), generator=g)].float()
        report["draws"] = draws
    report.update(seconds=round(time.perf_counter() - start, 2), baseline_rss=baseline,
                  peak_rss=_status("VmHWM"))
    print(json.dumps(report))
    return 0


def write_data(folder: Path, shards: int, rows: int, held_out: int = 1000) -> int:
    """Random float16 latents in ``shards`` shards of ``rows`` (+ a held-out file and the index, as
    ``flowmaps encode`` writes them); returns the bytes of one shard's latents."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def part(n):
        return {"latents": torch.randn(n, *SHAPE, generator=g).half(),
                "labels": torch.randint(1000, (n,), generator=g), "source_index": torch.arange(n)}

    entries = []
    for k in range(shards):
        save_file(part(rows), str(folder / f"latents-{k:05d}.safetensors"))
        entries.append({"file": f"latents-{k:05d}.safetensors", "count": rows})
    save_file(part(held_out), str(folder / "held_out.safetensors"))
    index = {"format": "flowmaps-latents", "format_version": 1, "shape": list(SHAPE), "dtype": "float16",
             "count": shards * rows, "shards": entries,
             "held_out": {"file": "held_out.safetensors", "count": held_out}, "num_classes": 1000,
             "image_shape": [3, 256, 256], "stats": {"std_all": 1.0},
             "vae": {"path": str(folder / "no-vae"), "config_sha256": "synthetic", "scaling_factor": 1.0,
                     "shift_factor": 0.0, "downsample": 8}}
    (folder / "index.json").write_text(json.dumps(index))
    return rows * 2 * SHAPE[0] * SHAPE[1] * SHAPE[2]


def measure(mode: str, data: Path, run: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--data",
               str(data), "--run", str(run), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if code != 0 or not lines:
            raise RuntimeError(f"{mode} failed ({code}): {err.read()[-2000:]}")
    report = json.loads(lines[-1])
    report["ru_maxrss"] = usage.ru_maxrss * 1024
    return report


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"Peak RSS of latent data: {meta['shards']} float16 shards of {meta['rows']:,} latents "
             f"{'x'.join(map(str, SHAPE))} ({meta['shard_bytes'] / MIB:.0f} MiB each, "
             f"{meta['shards'] * meta['shard_bytes'] / MIB:.0f} MiB in all), batches of "
             f"{meta['batch_size']}; training {meta['steps']} steps; CPU, 1 thread; torch {meta['torch']}; "
             f"loadavg {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}.",
             f"Command: `{meta['command']}`.", "",
             "| mode | peak RSS (MiB) | above baseline (MiB) | above baseline / shard | seconds |",
             "|---|---:|---:|---:|---:|"]
    for mode, row in result["modes"].items():
        above = (row["peak_rss"] - row["baseline_rss"]) / MIB
        lines.append(f"| {mode} | {row['ru_maxrss'] / MIB:.0f} | {above:.0f} | "
                     f"{above * MIB / meta['shard_bytes']:.2f} | {row['seconds']:.1f} |")
    if {"train", "train_one_shard"} <= set(result["modes"]):
        a, b = (result["modes"][m] for m in ("train", "train_one_shard"))
        extra = ((a["peak_rss"] - a["baseline_rss"]) - (b["peak_rss"] - b["baseline_rss"])) / MIB
        lines += ["", f"Training on {meta['shards']} shards against one: {extra:+.0f} MiB above baseline "
                  f"(the {meta['shards'] - 1} other shards hold "
                  f"{(meta['shards'] - 1) * meta['shard_bytes'] / MIB:.0f} MiB)."]
    lines += ["", "Peak RSS is the child's `ru_maxrss` (os.wait4); 'above baseline' is its `VmHWM` minus "
              "its `VmRSS` after its imports and a warm-up of the ops a draw uses (the train mode's "
              "baseline is before flowmaps builds its network and optimiser, which it includes)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import torch

    start, load_start = time.time(), os.getloadavg()
    result = {"modes": {}}
    with tempfile.TemporaryDirectory(prefix="latent_memory_") as tmp:
        data = Path(tmp) / "latents"
        shard_bytes = write_data(data, args.shards, args.rows)
        modes = [m for m in args.modes.split(",") if m]
        if "train_one_shard" in modes:
            write_data(Path(tmp) / "one", 1, args.rows)
        for mode in modes:
            row = measure(mode, Path(tmp) / "one" if mode == "train_one_shard" else data,
                          Path(tmp) / "run", args)
            result["modes"][mode] = row
            print(f"{mode:6s}: peak RSS {row['ru_maxrss'] / MIB:6.0f} MiB, above baseline "
                  f"{(row['peak_rss'] - row['baseline_rss']) / MIB:6.0f} MiB ({row['seconds']:.1f} s)",
                  flush=True)
    result["meta"] = {"command": " ".join(["benchmarks/latent_memory.py", *sys.argv[1:]]),
                      "shards": args.shards, "rows": args.rows, "shard_bytes": shard_bytes,
                      "batch_size": args.batch_size, "steps": args.steps, "torch": torch.__version__,
                      "python": platform.python_version(), "cpus": os.cpu_count(),
                      "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                      "seconds": round(time.time() - start)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
