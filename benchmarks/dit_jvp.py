"""The DiT's JVP options on the CPU: the exact JVP (torch.func.jvp, math attention) against the central
finite-difference JVP (fused SDPA), error and time, for a tangent (dx, ds, dt) = (N(0, I), 0, 1).

    OMP_NUM_THREADS=1 python benchmarks/dit_jvp.py [--width 128 --depth 4 --batch 8 --repeats 3]

Error: ‖FD − exact‖ / ‖exact‖ with the fp32 FD against the float64 exact JVP of the same weights (random
weights, the zero-initialised layers perturbed). Time: forward + JVP + backward of ‖JVP‖², the median of
``--repeats`` after a warm-up. Prints a table and writes benchmarks/results/dit_jvp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from flowmaps import FlowMap
from flowmaps.nets.dit import DiT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_jvp.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    shape = (4, 32, 32)
    net = DiT(shape, patch=2, width=args.width, depth=args.depth, heads=args.heads, num_classes=10)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.02 * torch.randn_like(q))
    g = torch.Generator().manual_seed(1)
    x, dx = torch.randn(args.batch, *shape, generator=g), torch.randn(args.batch, *shape, generator=g)
    s, t = torch.rand(args.batch, generator=g) * 0.5, 0.5 + torch.rand(args.batch, generator=g) * 0.5
    cond = torch.arange(args.batch) % 11
    ref = DiT(shape, patch=2, width=args.width, depth=args.depth, heads=args.heads, num_classes=10).double()
    ref.load_state_dict(net.state_dict())
    _, exact = FlowMap(ref).v_jvp(x.double(), s.double(), t.double(), dx=dx.double(), dt=1.0, cond=cond)

    def timed(mode: str, eps: float) -> tuple[float, float]:
        net.jvp, net.fd_eps = mode, eps
        model = FlowMap(net)

        def once() -> torch.Tensor:
            net.zero_grad(set_to_none=True)
            _, dv = model.v_jvp(x, s, t, dx=dx, dt=1.0, cond=cond)
            dv.square().mean().backward()
            return dv.detach()

        dv = once()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        err = ((dv.double() - exact).norm() / exact.norm()).item()
        return err, statistics.median(times)

    rows = [dict(mode="exact", eps=None, **dict(zip(("rel_error", "seconds"), timed("exact", 1e-3))))]
    for eps in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
        rows.append(dict(mode="fd", eps=eps, **dict(zip(("rel_error", "seconds"), timed("fd", eps)))))
    print(f"DiT width {args.width}, depth {args.depth}, 4x32x32 patch 2 (256 tokens), batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'mode':6} {'eps':>8} {'rel. error':>11} {'s/step':>8}")
    for r in rows:
        print(f"{r['mode']:6} {r['eps'] if r['eps'] else '-':>8} {r['rel_error']:11.2e} {r['seconds']:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores (times on a shared machine are indicative)")
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "load_average": load,
                               "cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
