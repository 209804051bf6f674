"""Benchmark 3 — peers: velocity models trained with `torchcfm` and Meta's `flow_matching`, sampled with
their own ODE machinery at 1, 2, 4, 8 NFE, beside flowmaps' flow maps at the same NFE (checkerboard).

Same data (the checkerboard of the benchmark-1 run), same network (an MLP of the same width/depth on
``[x, t]``), same training budget (steps × batch) as the flowmaps teacher of benchmark 1, same optimiser
settings; the same base points and the same W2 estimator (exact OT on 2000-point subsamples against the
same held-out data) for every row.

* torchcfm: ``ConditionalFlowMatcher(sigma=0)`` targets; it ships no ODE solver (its examples use torchdyn,
  whose dependencies need torchvision, which does not import beside this CPU torch, or torchdiffeq), so
  it is sampled with ``torchdiffeq.odeint`` on a fixed grid (euler; midpoint for even NFE).
* flow_matching: ``AffineProbPath(CondOTScheduler())`` targets, sampled by its ``ODESolver`` (euler;
  midpoint for even NFE).

Needs the peers installed only for the benchmark (``make bench-peers`` does it):
    .venv/bin/pip install --no-deps torchcfm==1.0.7 flow-matching==1.0.10
Run benchmarks/quality_vs_cost.py --only checkerboard first: its flow-map rows are read from
benchmarks/results/quality_vs_cost/checkerboard/eval/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flowmaps.metrics import wasserstein2
from flowmaps.runs.config import load_config
from flowmaps.runs.experiment import build_data
from flowmaps.train.schedules import inverse_sqrt_schedule

HERE = Path(__file__).resolve().parent
OURS = HERE / "results" / "quality_vs_cost" / "checkerboard"
OUT = HERE / "results" / "peers"


class VelocityMLP(nn.Module):
    """``b(x, t)`` on ``[x, t]`` with GELU layers (the usual 2-D flow-matching network)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        layers, fan_in = [], 3
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.GELU()]
            fan_in = width
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=1))


def train(name, sample_target, data, sigma0, steps, batch, lr, width, depth, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = VelocityMLP(width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_schedule(max(1, steps // 4)))
    for _ in tqdm(range(steps), desc=name, unit="step"):
        x1 = data[torch.randint(data.shape[0], (batch,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g) * sigma0
        t, xt, ut = sample_target(x0, x1)
        loss = (model(xt, t) - ut).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import flow_matching  # noqa: F401
        import torchcfm  # noqa: F401
    except ImportError:
        print("peers missing: .venv/bin/pip install --no-deps torchcfm==1.0.7 flow-matching==1.0.10",
              file=sys.stderr)
        return 2
    import torchdiffeq
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    ours_path = OURS / "eval" / "results.json"
    if not ours_path.exists():
        print(f"run benchmarks/quality_vs_cost.py --only checkerboard first ({ours_path})",
              file=sys.stderr)
        return 2
    teacher_cfg = load_config(config_file=OURS / "teacher" / "config.yaml")
    ours = json.loads(ours_path.read_text())
    bundle = build_data(teacher_cfg)
    data = bundle.train
    sigma0 = data.std(0)  # the same base as the checkerboard preset (sigma0 = data std)
    t = teacher_cfg.train
    common = dict(data=data, sigma0=sigma0, steps=t.steps, batch=t.batch_size, lr=t.lr,
                  width=teacher_cfg.model.width, depth=teacher_cfg.model.depth, seed=t.seed)

    cfm = ConditionalFlowMatcher(sigma=0.0)
    path = AffineProbPath(scheduler=CondOTScheduler())

    def cfm_target(x0, x1):
        return cfm.sample_location_and_conditional_flow(x0, x1)

    def fm_target(x0, x1):
        tt = torch.rand(x1.shape[0])
        s = path.sample(x_0=x0, x_1=x1, t=tt)
        return tt, s.x_t, s.dx_t

    start = time.time()
    models = {"torchcfm": train("torchcfm", cfm_target, **common),
              "flow_matching": train("flow_matching", fm_target, **common)}

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t)

    g = torch.Generator().manual_seed(teacher_cfg.eval.seed)
    n = ours["meta"]["n_samples"]
    x0 = torch.randn(n, 2, generator=g) * sigma0
    rows = []
    with torch.no_grad():
        for nfe in (1, 2, 4, 8):
            method, k = ("euler", nfe) if nfe == 1 else ("midpoint", nfe // 2)
            grid = torch.linspace(0, 1, k + 1)
            x_cfm = torchdiffeq.odeint(lambda tt, x: models["torchcfm"](x, tt), x0, grid,
                                       method=method)[-1]
            x_fm = ODESolver(Wrapped(models["flow_matching"])).sample(
                x_init=x0, step_size=1.0 / k, method=method, time_grid=torch.tensor([0.0, 1.0]))
            for name, x in (("torchcfm", x_cfm), ("flow_matching", x_fm)):
                w2 = wasserstein2(x, bundle.held_out, max_samples=teacher_cfg.eval.w2_samples,
                                  generator=torch.Generator().manual_seed(teacher_cfg.eval.seed))
                rows.append({"method": name, "solver": f"{method} x{k}", "nfe": nfe, "w2": w2})
    ours_rows = [r for r in ours["rows"] if r["sampler"] == "flow map" and r["nfe"] in (1, 2, 4, 8)]
    lines = ["| NFE | " + " | ".join(sorted({r["method"] for r in ours_rows})) +
             " | torchcfm | flow_matching | best-peer / best-ours |", "|" + "---|" * 6]
    table = {}
    for nfe in (1, 2, 4, 8):
        mine = {r["method"]: r["w2"] for r in ours_rows if r["nfe"] == nfe}
        peer = {r["method"]: r["w2"] for r in rows if r["nfe"] == nfe}
        ratio = min(peer.values()) / min(mine.values())
        table[nfe] = {"ours": mine, "peers": peer, "ratio_best_peer_to_best_ours": ratio}
        lines.append(f"| {nfe} | " + " | ".join(f"{mine[m]:.4f}" for m in sorted(mine)) +
                     f" | {peer['torchcfm']:.4f} | {peer['flow_matching']:.4f} | {ratio:.1f}x |")
    md = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"budget": f"{t.steps} steps x batch {t.batch_size}", "threads": args.threads,
            "load_average": os.getloadavg(), "seconds": round(time.time() - start),
            "targets": {"w2_5x_lower_at_1_nfe": table[1]["ratio_best_peer_to_best_ours"] >= 5,
                        "w2_5x_lower_at_2_nfe": table[2]["ratio_best_peer_to_best_ours"] >= 5}}
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table},
                                                 indent=2))
    (OUT / "table.md").write_text(md + "\n")
    print(md)
    print(json.dumps(meta, indent=2))
    return 0 if math.isfinite(table[1]["ratio_best_peer_to_best_ours"]) else 1


if __name__ == "__main__":
    sys.exit(main())
