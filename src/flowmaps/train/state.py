"""The resumable state of a :class:`~flowmaps.train.trainer.Trainer`: what
:meth:`~flowmaps.train.trainer.Trainer.state_dict` gathers and
:meth:`~flowmaps.train.trainer.Trainer.load_state_dict` restores, so that a resumed run continues
bit-identically.

Tensors are grouped ``{group: {name: tensor}}`` (the groups of a checkpoint file): ``model``, ``ema``
and the power profiles' ``ema_std…`` groups, ``optim`` (the optimiser's state tensors, ``"{param}.{key}"``),
``rng`` (every rank's data/time generator, global RNG and CUDA RNG states, gathered), ``objective``.
The JSON metadata holds the step and counters, world size, seed, batch split, the optimiser's
hyper-parameters and scalar state, the scheduler, the objective's state, the power profiles
(``ema_profiles``) and the data position (the generator's draws, and every rank's position of a source
that keeps one).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

__all__ = ["trainer_state", "load_trainer_state"]


def trainer_state(trainer) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """``(tensors, metadata)`` of ``trainer`` (module docstring); gathers from every rank, so call it on
    every rank."""
    from . import distributed as dist_

    optim = trainer.optimizer.state_dict()
    flat_optim = {f"{idx}.{key}": value for idx, state in optim["state"].items()
                  for key, value in state.items() if isinstance(value, Tensor)}
    scalars = {f"{idx}.{key}": value for idx, state in optim["state"].items()
               for key, value in state.items() if not isinstance(value, Tensor)}
    rng = {}
    for r, state in enumerate(dist_.all_gather_bytes(trainer.generator.get_state())):
        rng[f"generator.{r}"] = state
    for r, state in enumerate(dist_.all_gather_bytes(torch.get_rng_state())):
        rng[f"torch.{r}"] = state
    if trainer.device.type == "cuda":
        for r, state in enumerate(dist_.all_gather_bytes(torch.cuda.get_rng_state(trainer.device))):
            rng[f"cuda.{r}"] = state
    obj_tensors, obj_meta = trainer.objective.state_dict()
    tensors = {"model": trainer.model.state_dict(), "optim": flat_optim, "rng": rng,
               "objective": obj_tensors}
    if trainer.classic_ema is not None:
        tensors["ema"] = trainer.classic_ema.state_dict()
    if trainer.power_ema is not None:
        tensors.update(trainer.power_ema.state_dict())
    meta = {"step": trainer.step_count, "bad_steps": trainer.bad_steps,
            "world_size": trainer.dist.world_size, "seed": trainer.seed,
            "batch_size": trainer.batch_size, "grad_accum": trainer.grad_accum,
            "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
            "scheduler": trainer.scheduler.state_dict(), "objective": obj_meta,
            # Data are drawn with replacement by the generator above, so its state is the data
            # position: the next batch follows from it exactly.
            "data_position": {"sampler": "with replacement", "draws": trainer.step_count *
                              trainer.batch_size * trainer.dist.world_size}}
    if trainer.power_ema is not None:
        meta["ema_profiles"] = trainer.power_ema.profiles()
    if trainer.source is not None and hasattr(trainer.source, "state_dict"):
        # a sharded source's position (this rank's; every rank's, gathered, for a resume)
        text = json.dumps(trainer.source.state_dict()).encode().ljust(256)  # equal lengths to gather
        positions = dist_.all_gather_bytes(torch.frombuffer(bytearray(text), dtype=torch.uint8))
        meta["data_position"]["source"] = [json.loads(bytes(p.tolist()).decode()) for p in positions]
    return tensors, meta


def load_trainer_state(trainer, tensors: dict[str, dict[str, Tensor]], meta: dict) -> None:
    """Restore :func:`trainer_state` into ``trainer`` (same world size, model and objective)."""
    if meta["world_size"] != trainer.dist.world_size:
        raise ValueError(f"the checkpoint was written by {meta['world_size']} process(es); resume "
                         f"it with the same number (this run has {trainer.dist.world_size})")
    trainer.model.load_state_dict(tensors["model"])
    if trainer.classic_ema is not None:
        if "ema" not in tensors:
            raise ValueError("the checkpoint has no EMA weights but this run keeps an EMA")
        trainer.classic_ema.load_state_dict(tensors["ema"])
    if trainer.power_ema is not None:
        trainer.power_ema.load_state_dict(tensors)
    state: dict = {}
    for key, value in tensors.get("optim", {}).items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value.to(trainer.device) if name != "step" else value
    for key, value in meta["optimizer"]["scalars"].items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    # The kernel (foreach, fused) is this run's choice for its device, not the writer's.
    groups = [dict(group, **trainer._kernel) for group in meta["optimizer"]["param_groups"]]
    trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.objective.load_state_dict(trainer.model, tensors.get("objective", {}), meta["objective"])
    rank = trainer.dist.rank
    rng = tensors["rng"]
    trainer.generator.set_state(rng[f"generator.{rank}"].to(torch.uint8))
    torch.set_rng_state(rng[f"torch.{rank}"].to(torch.uint8))
    if trainer.device.type == "cuda" and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"].to(torch.uint8), trainer.device)
    trainer.step_count, trainer.bad_steps = int(meta["step"]), int(meta["bad_steps"])
    positions = meta.get("data_position", {}).get("source")
    if trainer.source is not None and positions:
        trainer.source.load_state_dict(positions[rank])
