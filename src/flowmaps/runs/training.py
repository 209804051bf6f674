"""Train or distil the model a config describes into a run directory (``flowmaps train`` / ``distill``).

:func:`run_training` is the whole job: the checks, the processes (torchrun), the point a resume starts
from, the assembly of data, model, teacher and objective (:mod:`flowmaps.runs.experiment`) and the run
directory; then a :class:`TrainingRun` trains with logging, rotated checkpoints and graceful stops, and
plots samples of the result. Under torchrun every rank runs all of it; rank 0 alone writes files.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from ..data.grids import save_labeled_grids
from ..data.images import random_hflip
from ..flowmap import FlowMap
from ..interpolants import Interpolant
from ..objectives import Objective
from ..solvers import solve_ode
from ..train import distributed
from ..train.resume import CheckpointRotation, StopOnSignal, latest_checkpoint
from ..train.trainer import Trainer
from . import experiment as ex
from .models import (build_interpolant, build_model, check_model_checkpoint, class_labels, resolve_warm_start,
                     save_model)
from . import extras, tracking
from .config import Config, ConfigError, dump_config, load_config, to_dict
from .devices import open_device
from .posthoc_ema import write_snapshot
from .rundir import RunDir, RunDirError, default_out
from .validation import SELF_DISTILLATION, _flatten

__all__ = ["run_training", "TrainingRun", "TrainingStopped", "TrainingInterrupted", "RESUMABLE_CHANGES"]

RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.threads", "train.device", "train.max_bad_steps", "train.logger")


class TrainingStopped(Exception):
    """Training ended early (non-finite steps); the message names the last good checkpoint."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: the run wrote a checkpoint and said how to resume; the command exits 0 (and a
    multi-run command such as ``demo`` stops instead of starting its next run)."""


def run_training(cfg: Config, out: Path | None, overwrite: bool, distill: bool,
                 progress: bool = True, label: str | None = None, resume: bool = False) -> Path:
    """Train (or distil) the model ``cfg`` describes into a run directory; returns the directory.

    Under torchrun every rank runs this; rank 0 alone writes files. With ``resume`` the run in ``out``
    continues from its newest checkpoint, bit-identically to an uninterrupted run. SIGTERM/SIGINT end
    the run after the current step with a checkpoint and raise :class:`TrainingInterrupted` (``main``
    prints how to resume and exits 0); non-finite steps raise :class:`TrainingStopped` (exit 3).
    """
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = _resume_config(Path(out), cfg)
    _check_objective(cfg, distill)
    if cfg.model.init == "teacher" and not distill:
        raise ConfigError("model.init: teacher copies the teacher's network; use `flowmaps distill`")
    cfg = resolve_warm_start(cfg)
    tracking.check_logger(cfg.train.logger)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device, dist = open_device(cfg.train.device, "train.device")
    resumed = _resume_point(Path(out), dist.world_size) if resume else None
    parts = _assemble(cfg, distill, device)
    if resumed is not None and resumed[2]["step"] >= cfg.train.steps:
        print(f"flowmaps: {out} is already at step {resumed[2]['step']} (train.steps={cfg.train.steps}); "
              "nothing to do (raise train.steps to continue it)", file=sys.stderr)
        return Path(out)
    run = _open_run_dir(cfg, out, overwrite, resume, dist)
    job = TrainingRun(cfg, parts, run, dist, device, label or cfg.objective.name, distill)
    if resumed is not None:
        job.restore(resumed)
    return job.train(progress, resumed=resumed is not None)


# --- before training: config, objective, processes, resume point, parts, run directory ---------------

def _resume_config(run: Path, cfg: Config) -> Config:
    """The saved config of the run at ``run``, with the changes a resume may make taken from ``cfg``."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise RunDirError(f"--resume: {run} is not a run directory (no config.yaml)")
    saved = load_config(None, saved_path)
    if cfg is None:
        return saved
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    changed = [k for k in a if a[k] != b.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        k = changed[0]
        raise ConfigError(f"--resume: {k} is {b.get(k)!r} here but {a[k]!r} in the run being resumed; "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change")
    for key in RESUMABLE_CHANGES:
        section, name = key.split(".")
        setattr(getattr(saved, section), name, getattr(getattr(cfg, section), name))
    return saved


def _check_objective(cfg: Config, distill: bool) -> None:
    name, teacher = cfg.objective.name, ex.needs_teacher(cfg)
    if distill and not teacher:
        hint = (" (or objective.source=teacher to self-distil against the teacher)"
                if name in SELF_DISTILLATION else "")
        raise ConfigError(f"objective.name: {name} trains without a teacher; use `flowmaps train`{hint}")
    if not distill and teacher:
        what = "objective.source: teacher" if name in SELF_DISTILLATION else f"objective.name: {name}"
        raise ConfigError(f"{what} distils from a teacher; use `flowmaps distill`")


def _resume_point(out: Path, world_size: int) -> tuple[Path, dict, dict]:
    """The newest resumable checkpoint of the run in ``out``, as ``(stem, tensors, metadata)``."""
    skipped: list[str] = []
    resumed = latest_checkpoint(out / "checkpoints", skipped=skipped, check=check_model_checkpoint)
    if resumed is None:
        why = f": {skipped[0]}" if skipped else ""
        raise RunDirError(f"--resume: no resumable checkpoint in {out / 'checkpoints'}{why}")
    for reason in skipped:
        print(f"flowmaps: warning: {reason}", file=sys.stderr)
    if resumed[2]["trainer"]["world_size"] != world_size:
        raise ConfigError(f"--resume: {resumed[0]} was written by {resumed[2]['trainer']['world_size']}"
                          f" process(es); resume with the same number (now {world_size})")
    return resumed


@dataclass
class _Parts:
    """What a run trains, built from its config: data, scales, interpolant, model and objective."""

    bundle: ex.DataBundle
    scales: dict
    interpolant: Interpolant
    model: FlowMap
    objective: Objective


def _assemble(cfg: Config, distill: bool, device: torch.device) -> _Parts:
    bundle = ex.build_data(cfg)
    if bundle.latents is not None and cfg.decode.vae is None:  # recorded in the run's config
        cfg.decode.vae = bundle.latents["vae"]["path"]
    scales = ex.resolve_scales(cfg, bundle)
    interpolant = build_interpolant(cfg, scales)
    ex.attach_reference(cfg, bundle, interpolant)
    teacher = ex.build_teacher(cfg, bundle, scales, device) if distill else None
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, scales, teacher).to(device)
    objective = ex.build_objective(cfg, interpolant, teacher, num_classes=scales["num_classes"])
    if bundle.data_free:  # data.name=none: the objective must train on the teacher's paths alone
        refusal = getattr(objective, "data_free_refusal", None)
        why = refusal() if refusal is not None else f"{cfg.objective.name} trains at the data's points"
        if why is not None:
            raise ConfigError(f"data.name: none: {why}")
    return _Parts(bundle, scales, interpolant, model, objective)


def _open_run_dir(cfg: Config, out: Path | None, overwrite: bool, resume: bool, dist) -> RunDir:
    """Every rank checks the directory (read-only) before rank 0 creates anything."""
    run_path = Path(out) if out else default_out(cfg, cfg.objective.name)
    if dist.enabled and not out:
        raise ConfigError("under torchrun give --out (each rank must agree on the run directory)")
    run = RunDir(run_path, overwrite, create=False, resume=resume)
    distributed.barrier()
    if dist.is_main:
        run.create()
        if not resume:
            (run.path / "config.yaml").write_text(dump_config(cfg))
    return run


# --- training --------------------------------------------------------------------------------------

class TrainingRun:
    """A run being trained in its directory: the :class:`Trainer`, its rotated checkpoints, its metrics
    log and its plots. Collective calls (state, barriers, gathers) happen on every rank; rank 0 writes."""

    def __init__(self, cfg: Config, parts: _Parts, run: RunDir, dist, device: torch.device,
                 label: str, distill: bool):
        self.cfg, self.parts, self.run, self.dist, self.device = cfg, parts, run, dist, device
        self.label, self.distill = label, distill
        self.main = dist.is_main
        self.trainer = self._make_trainer()
        self.rotation = CheckpointRotation(run.checkpoints, keep=cfg.train.keep_checkpoints)

    @property
    def conditional(self) -> bool:
        return self.parts.scales["num_classes"] > 0

    def _make_trainer(self) -> Trainer:
        t, bundle, scales = self.cfg.train, self.parts.bundle, self.parts.scales
        augment = None
        if self.cfg.data.hflip and bundle.latents is None:  # latents: the flips were encoded
            if not bundle.image:
                raise ConfigError("data.hflip: horizontal flips apply to image datasets only")
            augment = random_hflip
        conditional = self.conditional
        d = self.cfg.data
        paths = None
        if bundle.data_free:  # the teacher's ODE paths, solved and refreshed by the objective (spec E.8)
            paths = dict(paths=d.teacher_paths, steps=d.teacher_steps, refresh_every=d.refresh_every,
                         refresh_paths=d.refresh_paths)
        return Trainer(self.parts.model, self.parts.objective,
                       None if bundle.data_free else bundle.train.to(self.device),
                       teacher_paths=paths, sample_shape=bundle.sample_shape if paths else None,
                       batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                       weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                       lr_decay_start=t.lr_decay_start, ema_decay=t.ema_decay, seed=t.seed,
                       max_bad_steps=t.max_bad_steps, grad_accum=t.grad_accum,
                       precision=t.precision, tf32=t.tf32, compile=t.compile,
                       compile_backend=t.compile_backend,
                       labels=bundle.labels if conditional else None, label_dropout=t.label_dropout,
                       null_label=scales["num_classes"] if conditional else None, augment=augment,
                       lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.steps,
                       lr_final=t.lr_final, ema_warmup=t.ema_warmup, ema_std=t.ema_std,
                       betas=tuple(t.betas))

    def restore(self, resumed: tuple[Path, dict, dict]) -> None:
        """Continue from a checkpoint found by :func:`latest_checkpoint`."""
        stem, tensors, meta = resumed
        try:
            self.trainer.load_state_dict(tensors, meta["trainer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{stem}: cannot resume from it ({str(err).splitlines()[0]})") from None
        self.rotation.best_loss = meta.get("best_validation_loss")
        if self.main:
            self.run.truncate_metrics(self.trainer.step_count)
            print(f"[{self.label}] resuming {self.run.path} from {stem.name} (step "
                  f"{self.trainer.step_count})", file=sys.stderr)

    def train(self, progress: bool, resumed: bool = False) -> Path:
        """Train to ``train.steps``, write the final checkpoint and the plots; returns the run directory."""
        cfg, t, name = self.cfg, self.cfg.train, self.cfg.objective.name
        if self.parts.objective.points is not None:  # the bar of the first solve of the teacher's paths
            self.parts.objective.points.progress = progress and self.main
        self._set_validation_batch()
        self.start = time.perf_counter()
        if progress and self.main:
            world = (f", {self.dist.world_size} processes ({self.dist.backend})" if self.dist.enabled
                     else "")
            print(f"[{self.label}] {self.run.path}: {name} on {cfg.data.name}, {t.steps} steps, "
                  f"batch {t.batch_size}{world}", file=sys.stderr)
        self.sink = tracking.open_sink(t.logger, self.run.path, self.trainer.step_count if resumed
                                       else None) if self.main else None
        try:
            history, signal_name = self._run_steps(progress)
        finally:
            if self.sink is not None:
                self.sink.close()
                self.sink = None
        if self.trainer.stopped:
            path = self.checkpoint()
            raise TrainingInterrupted(
                f"stopped by {signal_name} at step {self.trainer.step_count}; checkpoint {path}. Resume "
                f"with: flowmaps {'distill' if self.distill else 'train'} --resume --out {self.run.path}")
        self.checkpoint(final=True)
        self._plot(history, resumed)
        if progress and self.main:
            final_loss = history[-1] if history else float("nan")
            print(f"[{self.label}] done in {time.perf_counter() - self.start:.0f}s, final loss "
                  f"{final_loss:.4g}; checkpoint {self.run.checkpoints / 'final'}", file=sys.stderr)
            points = self.parts.objective.points
            if points is not None:
                cost = points.cost()
                print(f"[{self.label}] teacher's ODE paths: {cost['teacher_paths_solved']} solved, "
                      f"{cost['teacher_nfe']} point evaluations, {cost['teacher_seconds']:.1f}s CPU",
                      file=sys.stderr)
        return self.run.path

    def _set_validation_batch(self) -> None:
        bundle = self.parts.bundle
        val_data = bundle.held_out[:2048 if not bundle.image else 256]
        self.val_cond = bundle.held_out_labels[:val_data.shape[0]] if self.conditional else None
        if bundle.standardizer is not None:
            val_data = bundle.standardizer.transform(val_data)
        self.val_data = val_data

    def _run_steps(self, progress: bool) -> tuple[list[float], str | None]:
        """The training loop under signal handling; returns the losses and the signal that stopped it."""
        t = self.cfg.train
        with StopOnSignal() as stop:
            try:
                # Read the device every log_every steps, and at every checkpoint (the callback
                # checkpoints the state of the step it is given: the last one read).
                history = self.trainer.run(t.steps - self.trainer.step_count, progress=progress,
                                           callback=self._after_step, should_stop=stop,
                                           sync_every=math.gcd(t.log_every, t.checkpoint_every,
                                                               t.ema_snapshot_every or 0))
            except FloatingPointError as err:
                kept = (latest_checkpoint(self.run.checkpoints, check=check_model_checkpoint)
                        if self.main else None)
                where = f"; the last good checkpoint is {kept[0]}" if kept else "; no checkpoint was written"
                raise TrainingStopped(f"{err}{where}") from None
        return history, stop.signal_name

    def _after_step(self, step: int, out) -> None:
        """The trainer's callback: log skipped and every ``log_every``-th step, checkpoint periodically."""
        t, trainer = self.cfg.train, self.trainer
        if self.main and out.skipped:
            values = out.logged()
            terms = {k: values[k] for k in out.terms}
            self.log({"step": step, "event": "skipped", "non_finite": out.skipped,
                          "loss": values["loss"], **terms, "grad_norm": float(out.grad_norm)})
            print(f"flowmaps: warning: step {step}: non-finite {out.skipped}, update skipped "
                  f"(terms {terms})", file=sys.stderr)
        if self.main and (step % t.log_every == 0 or step == t.steps):
            points = self.parts.objective.points  # without data: the teacher's ODE cost so far
            self.log({"step": step, **out.logged(), **(points.cost() if points is not None else {}),
                      "lr": trainer.scheduler.get_last_lr()[0],
                          "grad_norm": float(out.grad_norm),
                          "seconds": round(time.perf_counter() - self.start, 3)})
        if t.ema_snapshot_every and (step % t.ema_snapshot_every == 0 or step == t.steps):
            self.snapshot()
        if step % t.checkpoint_every == 0 and step < t.steps:
            self.checkpoint()

    def log(self, record: dict) -> None:
        """A record for ``metrics.jsonl`` and the ``train.logger`` sink (rank 0)."""
        self.run.log(record)
        if getattr(self, "sink", None) is not None:
            self.sink.log(record)

    def checkpoint(self, final: bool = False) -> Path | None:
        """Write ``final`` or the next rotated ``step-K`` (with the validation loss); every rank calls it."""
        self.trainer.check_replicas()  # under torchrun: refuse to save replicas that drifted apart
        state = self.trainer.state_dict()  # collective under torchrun: every rank calls it
        path = None
        if self.main:
            if final:
                path = self.run.checkpoints / "final"
                self._write_checkpoint(path, self.rotation.best_loss, state)
            else:
                val = self.trainer.validation_loss(self.val_data, seed=self.cfg.eval.seed,
                                                   cond=self.val_cond)
                path = self.rotation.save(self.trainer.step_count,
                                          lambda stem, best: self._write_checkpoint(stem, best, state), val)
                self.log({"step": self.trainer.step_count, "event": "checkpoint", "path": str(path),
                              "validation_loss": val})
        distributed.barrier()
        return path

    def _write_checkpoint(self, stem: Path, best_loss, state) -> None:
        save_model(stem, self.parts.model, self.trainer.ema, self.cfg, self.parts.scales,
                      self.parts.bundle.standardizer, self.trainer.step_count,
                      extra={"best_validation_loss": best_loss, **self.trainer.ema_metadata()},
                      trainer_state=state)

    def snapshot(self) -> None:
        """``RUN/ema_snapshots/step-K``: the power-function EMA profiles now (rank 0; the profiles are
        the same on every rank), for ``flowmaps ema`` (:mod:`flowmaps.runs.posthoc_ema`)."""
        if self.main:
            write_snapshot(self.run.path, self.trainer, self.cfg, self.parts.scales,
                           self.parts.bundle.standardizer, getattr(self.parts.model, "domain", None))

    # --- after training ----------------------------------------------------------------------------

    def _plot(self, history: list[float], resumed: bool) -> None:
        """``plots/loss.png`` and ``plots/samples.png`` (samples of the trained model beside data).
        Without matplotlib (a plain install) the loss plot and vector sample plots are skipped with a
        warning; image sheets need only Pillow."""
        cfg, bundle, name = self.cfg, self.parts.bundle, self.cfg.objective.name
        n_plot, shown = self._samples()
        if not self.main:
            return
        if not extras.plots_available():
            extras.warn_no_plots("plots/loss.png" + ("" if bundle.image else " or plots/samples.png"))
        else:
            from .plotting import plot_loss, plot_samples

            plot_loss(history if not resumed else self.run.losses(), self.run.plots / "loss.png",
                      title=f"{name} on {cfg.data.name}")
            if not bundle.image:
                plot_samples({k: bundle.to_data_units(v.cpu()) for k, v in shown.items()},
                             bundle.held_out, self.run.plots / "samples.png",
                             title=f"{name} on {cfg.data.name}")
        if bundle.image:
            decode = self._decoder()
            if decode is None:
                return
            save_labeled_grids({"data" if bundle.latents is None else "data (through the VAE)":
                                decode(bundle.held_out[:n_plot]).clamp(-1, 1),
                                **{k: decode(v.cpu()).clamp(-1, 1) for k, v in shown.items()}},
                               self.run.plots / "samples.png")

    def _decoder(self):
        """Images from model-space samples: the identity for pixels; for latents the VAE of
        ``decode.vae`` (when it cannot be loaded the sheet is skipped with a warning, the run stands)."""
        if self.parts.bundle.latents is None:
            return lambda x: x
        from .latents import latent_codec

        try:
            return latent_codec(self.cfg, self.parts.scales, self.device)
        except ValueError as err:
            print(f"flowmaps: warning: plots/samples.png not written: {err}", file=sys.stderr)
            return None

    def _samples(self) -> tuple[int, dict[str, Tensor]]:
        """Samples of the trained model (EMA weights when kept): RK4 for a velocity, 1, 2 and 4 steps for a
        flow map. Drawn in shards, one per rank, and gathered on rank 0; returns ``(n, samples)``."""
        bundle, scales, dist = self.parts.bundle, self.parts.scales, self.dist
        evaluated = self.trainer.ema if self.trainer.ema is not None else self.parts.model
        n_plot = 64 if bundle.image else 4000
        n_plot -= n_plot % dist.world_size
        g = torch.Generator(device=self.device).manual_seed(
            distributed.rank_seed(self.cfg.eval.seed, dist.rank))
        x0 = self.parts.interpolant.sample_base(
            torch.empty(n_plot // dist.world_size, *bundle.sample_shape, device=self.device), g)
        cond = class_labels(x0.shape[0], scales, self.device)
        with torch.no_grad():
            if self.cfg.objective.name == "velocity":
                shown = {"RK4, 8 steps (NFE 32)": solve_ode(
                    lambda x, tt: evaluated.velocity(x, tt, cond), x0, "rk4", steps=8).x}
            else:  # a map trained on jumps to the data only (sCT) samples with γ = 1
                gamma = (dict(gamma=1.0, interpolant=self.parts.interpolant, generator=g)
                         if getattr(evaluated, "domain", None) == "data" else {})
                shown = {f"{k} step{'s' * (k > 1)}{', γ=1' * (bool(gamma) and k > 1)}":
                         evaluated.sample(x0, steps=k, cond=cond, **gamma) for k in (1, 2, 4)}
        return n_plot, {k: distributed.all_gather_rows(v) for k, v in shown.items()}
