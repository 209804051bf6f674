"""Benchmark — memory of image data: peak RSS of loading a synthetic ImageNet-32 set and of a few training
steps, with the images kept as float32 (before) and as uint8 codes decoded per batch (after).

The data: ``--n`` random 32×32×3 images (100,000 by default: 307 MB as bytes, 1.23 GB as float32) with
labels 1..1000, written as ``--files`` official-format ``train_data_batch_<k>.npz`` files in a temporary
folder (or ``--data DIR``, reused). Every measurement is a fresh subprocess; the parent reads its peak
RSS from ``os.wait4`` (``ru_maxrss``) and the child reports ``VmRSS`` right after its imports (the
baseline) and ``VmHWM`` (its peak) from ``/proc/self/status``. Two phases, each its own process:

* ``load`` — ``build_data`` + ``resolve_scales`` of the ``imagenet32`` preset (``data.path`` the synthetic
  folder, 10,000 images held out, ``model.sigma_data=data``: the std of all pixels);
* ``train`` — ``flowmaps train --preset imagenet32`` for ``--steps`` steps of batch ``--batch-size`` on the
  CPU (class-conditional, flips, ``sigma_data=data``) with a small U-Net (``--channels``, multipliers
  [1, 2], one block per level, no attention, so the network's memory is small beside the data), which
  loads the data, trains, writes the final checkpoint and plots the samples, as a user's run does.

Modes, side by side: ``before`` — the library at ``--before-ref`` (the commit before images stayed uint8,
extracted with ``git archive`` into a temporary folder and put first on ``PYTHONPATH``); ``float32`` — this
library with the bundle's images decoded to float32 right after loading (the stored representation of
``before`` without its loading-time copies); ``uint8`` — this library. ``os.getloadavg()`` is recorded
before and after. Results: ``benchmarks/results/image_memory.{json,md}``. Nothing is downloaded.

Run: ``.venv/bin/python benchmarks/image_memory.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "image_memory.json"
BEFORE_REF = "e40b4c1"  # main before image datasets stayed uint8 in memory
MODES = ("before", "float32", "uint8")
PHASES = ("load", "train")
MIB = 2 ** 20


# ------------------------------------------------------------------------------------------- child

def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _overrides(data: str, args) -> list[str]:
    return [f"data.path={data}", "data.n_eval=10000", "model.sigma_data=data", "model.class_conditional=true",
            f"model.channels={args.channels}", "model.channel_mults=[1,2]", "model.blocks_per_level=1",
            "model.attention_resolutions=[]", "train.device=cpu", "train.threads=1",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.log_every=1",
            f"train.checkpoint_every={args.steps + 1}"]


def child(args) -> int:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    import flowmaps
    from flowmaps.cli.main import main as flowmaps_main
    from flowmaps.runs import experiment as ex
    from flowmaps.runs.config import load_config

    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    if args.mode == "float32":  # the images as float32, as they were stored before
        build = ex.build_data

        def build_float32(cfg):
            bundle = build(cfg)
            bundle.train, bundle.held_out = bundle.train.decode(), bundle.held_out.decode()
            return bundle

        ex.build_data = build_float32
    overrides = _overrides(args.data, args)
    start = time.perf_counter()
    report = {}
    if args.phase == "load":
        cfg = load_config("imagenet32", None, overrides)
        bundle = ex.build_data(cfg)
        scales = ex.resolve_scales(cfg, bundle)
        train, held_out = (getattr(x, "codes", x) for x in (bundle.train, bundle.held_out))  # the tensors
        report = {"stored": f"{type(bundle.train).__name__} {str(train.dtype).replace('torch.', '')}",
                  "stored_bytes": sum(x.numel() * x.element_size() for x in (train, held_out)),
                  "train_images": len(train), "held_out_images": len(held_out),
                  "sigma_data": scales["sigma_data"]}
    else:
        code = flowmaps_main(["train", "--preset", "imagenet32", "--objective", "velocity", "--out",
                              args.run, "--overwrite", "--quiet", *overrides])
        if code != 0:
            return code
        final = json.loads((Path(args.run) / "checkpoints" / "final.json").read_text())
        losses = [json.loads(line)["loss"] for line in
                  (Path(args.run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        report = {"steps": final["step"], "sigma_data": final["scales"]["sigma_data"], "losses": losses}
    report.update(seconds=round(time.perf_counter() - start, 2), baseline_rss=baseline,
                  peak_rss=_status("VmHWM"), flowmaps=str(Path(flowmaps.__file__).parent))
    print(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------------------ parent

def write_data(folder: Path, n: int, files: int, seed: int = 0) -> None:
    """``n`` random images in ``files`` official-format ImageNet-32 ``.npz`` files (uncompressed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for k in range(files):
        m = int(bounds[k + 1] - bounds[k])
        np.savez(folder / f"train_data_batch_{k + 1}.npz",
                 data=rng.integers(0, 256, size=(m, 3072), dtype=np.uint8),
                 labels=rng.integers(1, 1001, size=m))


def extract_tree(ref: str, into: Path) -> Path:
    """The ``src`` folder of the library at git ``ref``, extracted into ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "src"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def measure(src: Path, mode: str, phase: str, data: Path, run: Path, args) -> dict:
    """Run one child process on the library in ``src``; its report with the parent's ``ru_maxrss``."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--phase", phase,
               "--data", str(data), "--run", str(run), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--channels", str(args.channels)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{mode}/{phase} failed ({proc.returncode}): {err.read()[-2000:]}")
    report = json.loads(lines[-1])
    report["ru_maxrss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return report


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"Peak RSS of image data: {meta['n']:,} synthetic 32×32×3 images in {meta['files']} "
             f"ImageNet-32 .npz files ({meta['n'] * 3072 / MIB:.0f} MiB as bytes, "
             f"{meta['n'] * 3072 * 4 / MIB:.0f} MiB as float32), {meta['held_out']:,} held out; "
             f"training: {meta['steps']} steps × batch "
             f"{meta['batch_size']}, U-Net {meta['channels']} channels [1, 2], CPU, 1 thread; torch "
             f"{meta['torch']}; loadavg {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}.",
             f"Command: `{meta['command']}`; before = {meta['before_ref']}.", "",
             "| mode | stored images | load: peak RSS (MiB) | load: above baseline | train: peak RSS (MiB) "
             "| train: above baseline | baseline after imports | load s | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, row in result["modes"].items():
        load, train = row["load"], row["train"]
        above = [(r["peak_rss"] - r["baseline_rss"]) / MIB for r in (load, train)]
        lines.append(f"| {mode} | {load['stored']}, {load['stored_bytes'] / MIB:.0f} MiB | "
                     f"{load['ru_maxrss'] / MIB:.0f} | {above[0]:.0f} | {train['ru_maxrss'] / MIB:.0f} | "
                     f"{above[1]:.0f} | {load['baseline_rss'] / MIB:.0f} | {load['seconds']:.1f} | "
                     f"{train['seconds']:.1f} |")
    ratio = result["ratios"]
    lines += ["", f"uint8 / before: loading {ratio['load']:.2f}× the peak RSS ({ratio['load_above']:.2f}× "
              f"above the baseline), training {ratio['train']:.2f}× ({ratio['train_above']:.2f}× above the "
              f"baseline). Same losses in every mode: {result['same_losses']}; same sigma_data: "
              f"{result['same_sigma_data']}.",
              "Peak RSS is the child's `ru_maxrss` (os.wait4); 'above baseline' is its `VmHWM` minus its "
              "`VmRSS` after importing torch and flowmaps."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic images")
    parser.add_argument("--files", type=int, default=4, help=".npz files they are written to")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--before-ref", default=BEFORE_REF, help="git ref of the 'before' library")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--data", help="folder of the synthetic .npz files (written when missing)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result (and .md beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not Path("/proc/self/status").exists():
        print("image_memory: needs Linux (/proc/self/status)", file=sys.stderr)
        return 1
    import torch

    modes = [m for m in args.modes.split(",") if m]
    start, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="image_memory_") as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else tmp / "imagenet32"
        if not any(data.glob("train_data_batch_*.npz")):
            write_data(data, args.n, args.files)
        trees = {"before": extract_tree(args.before_ref, tmp / "before"), "float32": REPO / "src",
                 "uint8": REPO / "src"}
        result = {"modes": {}}
        for phase in PHASES:  # one phase for every mode, then the next: modes side by side
            for mode in modes:
                row = measure(trees[mode], mode, phase, data, tmp / f"run-{mode}", args)
                result["modes"].setdefault(mode, {})[phase] = row
                print(f"{mode:8s} {phase:5s}: peak RSS {row['ru_maxrss'] / MIB:7.0f} MiB, above baseline "
                      f"{(row['peak_rss'] - row['baseline_rss']) / MIB:7.0f} MiB ({row['seconds']:.1f} s)",
                      flush=True)
    rows = result["modes"]
    if "before" in rows and "uint8" in rows:
        b, a = rows["before"], rows["uint8"]

        def above(r):
            return r["peak_rss"] - r["baseline_rss"]

        result["ratios"] = {"load": a["load"]["ru_maxrss"] / b["load"]["ru_maxrss"],
                            "load_above": above(a["load"]) / above(b["load"]),
                            "train": a["train"]["ru_maxrss"] / b["train"]["ru_maxrss"],
                            "train_above": above(a["train"]) / above(b["train"])}
    result["same_losses"] = len({json.dumps(r["train"]["losses"]) for r in rows.values()}) == 1
    result["same_sigma_data"] = len({r[p]["sigma_data"] for r in rows.values() for p in PHASES}) == 1
    result["meta"] = {"command": " ".join(["benchmarks/image_memory.py", *sys.argv[1:]]), "n": args.n,
                      "files": args.files, "held_out": 10_000, "steps": args.steps,
                      "batch_size": args.batch_size, "channels": args.channels,
                      "before_ref": args.before_ref, "torch": torch.__version__,
                      "python": platform.python_version(), "cpus": os.cpu_count(),
                      "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                      "seconds": round(time.time() - start)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if "ratios" in result:
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
