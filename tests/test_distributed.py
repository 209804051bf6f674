"""Two-process training on torchrun (gloo): every JVP objective stays synchronised under DDP.

The pitfall (see flowmaps.train.distributed): forward-mode passes that bypass DDP's forward skip gradient
synchronisation silently. These tests run the real trainer in two processes and assert

(a) the parameters are bit-identical across the two ranks after every step, and
(b) they equal a one-process run on the concatenated batch (rank 0's and rank 1's draws, each from its
    own generator, averaged in one loss) within float64 round-off.

Then the CLI itself under torchrun: one run directory written by rank 0, a resumable checkpoint that
records the world size, a resume under torchrun, and a clear refusal to resume with another world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker
from ddp_worker import BATCH, CASES, STEPS, TRAIN, build, flat_parameters, trained_parameters
from flowmaps.checkpoint import load_checkpoint
from flowmaps.runs.models import load_model
from flowmaps.train.distributed import rank_seed
from flowmaps.train.schedules import inverse_sqrt_schedule

BIN = Path(sys.executable).parent


def torchrun(*args, cwd=None, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a rank that aborts shows where
    return subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(ddp_worker.__file__, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "verdicts.json").read_text())


def one_process_reference(case: str, world: int = 2) -> torch.Tensor:
    """The same training on one process: each step averages the losses of every rank's batch."""
    model, objective, data = build(case)
    accum = CASES[case][1].get("grad_accum", 1)
    generators = [torch.Generator().manual_seed(rank_seed(TRAIN["seed"], r)) for r in range(world)]
    params = trained_parameters(model, objective)
    optimizer = torch.optim.Adam(params, lr=TRAIN["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 inverse_sqrt_schedule(TRAIN["lr_decay_start"]))
    for step in range(STEPS):
        objective.begin_step(model, step)
        optimizer.zero_grad()
        total = 0.0
        for g in generators:
            for _ in range(accum):
                idx = torch.randint(data.shape[0], (BATCH // accum,), generator=g)
                total = total + objective(model, data[idx], generator=g).loss
        (total / (world * accum)).backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN["grad_clip"])
        optimizer.step()
        schedule.step()
    return flat_parameters(model, objective)


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_stay_bit_identical_after_every_step(ddp_results, case):
    _, verdicts = ddp_results
    assert verdicts[case]["bit_identical_each_step"] == [True] * STEPS
    assert verdicts[case]["skipped"] == 0


def test_the_run_time_replica_check_catches_drifted_parameters(ddp_results):
    assert ddp_results[1]["drift_detected"] is True


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_concatenated_batch(ddp_results, case):
    out, _ = ddp_results
    ddp = load_file(str(out / f"{case}.safetensors"))["params"]
    ref = one_process_reference(case)
    model, objective, _ = build(case)
    start = flat_parameters(model, objective)
    assert not torch.equal(ddp, start)  # training moved the parameters
    torch.testing.assert_close(ddp, ref, rtol=1e-9, atol=1e-11)
    # ...and a run that averaged nothing across ranks (rank 0's batch alone) is clearly different,
    # so the comparison above can tell synchronised from unsynchronised training.
    alone = one_process_reference(case, world=1)
    assert (ddp - alone).abs().max() > 1e-6


TINY = ["model.width=16", "model.depth=2", "train.batch_size=32", "train.log_every=5",
        "data.n_train=1000", "data.n_eval=300", "train.checkpoint_every=10"]


def test_cli_under_torchrun_writes_one_run_and_resumes(tmp_path):
    run = tmp_path / "run"
    first = torchrun("-m", "flowmaps", "distill", "--preset", "gmm", "--teacher", "exact",
                     "--objective", "lmd", "--out", run, "--quiet", "train.steps=20", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [5, 10, 15, 20]  # rank 0 only
    groups, meta = load_checkpoint(run / "checkpoints" / "final")
    assert meta["trainer"]["world_size"] == 2 and meta["step"] == 20
    assert {"generator.0", "generator.1"} <= set(groups["rng"])
    assert not torch.equal(groups["rng"]["generator.0"], groups["rng"]["generator.1"])
    # Resuming with one process is refused (its RNG streams belong to two ranks), nothing written.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    single = subprocess.run([str(BIN / "flowmaps"), "distill", "--resume", "--out", str(run),
                             "--quiet", "train.steps=30"], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert single.returncode == 2
    assert single.stderr.strip().count("\n") == 0 and "2 process(es)" in single.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # Extending the run under torchrun continues from step 20.
    more = torchrun("-m", "flowmaps", "distill", "--resume", "--out", run, "--quiet", "train.steps=30")
    assert more.returncode == 0, more.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "final")[1]["step"] == 30
    assert load_model(run).model.net.dim == 2
