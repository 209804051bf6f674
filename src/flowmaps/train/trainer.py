"""Training: a :class:`Trainer` that owns the optimisation state (:func:`~flowmaps.train.fitting.fit` is
the one-call form on top of it).

The step is shared by every objective (shortcut-model style): draw a batch of data ``x1``, let the
objective draw ``x0``, ``(s, t)`` and compute its loss, clip gradients, step the optimiser and the
learning-rate schedule, update the EMA. All randomness of data, base samples and times comes from one
``torch.Generator`` per process seeded from ``seed``, so a run is reproducible from its seed, and
:meth:`Trainer.state_dict` captures it for an exact resume. Under ``torchrun`` the same step runs on
every rank inside DistributedDataParallel (see :mod:`flowmaps.train.distributed` for the forward-mode pitfall
and its fix); non-finite steps are skipped on every rank alike.

Host reads. A step leaves its loss, terms, statistics and gradient norm on the device; :meth:`Trainer.run`
reads them (one transfer) every ``sync_every`` steps, where the caller logs. On CUDA no step waits for
the GPU: the optimiser is fused (``adam``/``adamw``) and skips a non-finite update on the device
(``found_inf``), the EMA is one ``torch._foreach_lerp_`` weighted by the same flag (per-tensor device
weights: a 0-dim tensor weight would be read on the host), and the skipped steps are reported when the
window is read (the *device guard*; :class:`~flowmaps.train.host_syncs.HostSyncs` counts a step's
syncs). Where no fused optimiser exists (``radam``,
and the CPU, where foreach is used so that results stay bit-identical) the trainer reads one flag per
step to skip the update (the *host guard*): on the CPU that read is not a device synchronisation.
Both guards give the same results; a skipped step advances the step counter and the learning-rate
schedule but leaves weights, optimiser state and EMA unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..data.images import ByteImages
from ..objectives.base import LossOutput, Objective
from ..precision import PRECISIONS, autocast, tf32_scope
from .batches import DataSource, batch_sampler, sample_shape_of
from .power_ema import PowerEMA
from .schedules import learning_rate_schedule
from .state import load_trainer_state, trainer_state

__all__ = ["Trainer"]

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
FUSED = ("adam", "adamw")  # torch implements these fused (one kernel, found_inf skips on the device)


class _ObjectiveLoss(nn.Module):
    """``forward(x1, generator) = objective(model, x1, generator)``: the whole objective in one forward.

    This is the module DistributedDataParallel wraps (see :mod:`flowmaps.train.distributed` for why): every
    primal and forward-mode pass of the bare ``model`` happens inside ``DDP.forward``, so the backward of
    the returned loss synchronises every parameter's gradient. The objective is held outside the module
    tree, so a teacher network or a frozen snapshot it owns is never registered with DDP.
    """

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        # Trained modules of the objective (a learned loss weight): registered here so that DDP
        # broadcasts and synchronises them like the model's own parameters.
        self.objective_modules = nn.ModuleList(objective.trainable_modules())
        self._objective = (objective,)

    def forward(self, x1: Tensor, cond: Tensor | None, generator: torch.Generator
                ) -> tuple[Tensor, LossOutput]:
        out = self._objective[0](self.model, x1, cond, generator=generator)
        return out.loss, out


class Trainer:
    """Optimisation state for one model and one objective, on one process or under torchrun.

    Args:
        model: a :class:`~flowmaps.FlowMap` (or a velocity network for :class:`~flowmaps.objectives.Velocity`).
        objective: any :class:`~flowmaps.objectives.Objective`.
        data: samples ``(N, ...)`` drawn with replacement — a tensor, or images kept as 8-bit codes
            (:class:`~flowmaps.data.images.ByteImages`, each drawn batch decoded to float32 on the
            codes' device) — or a callable ``data(n[, generator=g])``, or a source that draws its own
            labeled batches, ``data.draw_labeled(n, g) -> (x, labels | None)`` (labels when its
            ``yields_labels``; :class:`~flowmaps.data.latents.LatentShards`), whose ``state_dict()``
            (its position, every rank's) is part of :meth:`state_dict`;
            or ``None``: distillation without data (spec E.8), the points at time ``s`` on the teacher's
            ODE paths from the base (:class:`~flowmaps.objectives.trajectories.TeacherPaths`, options
            ``teacher_paths``; its cache is rebuilt exactly on resume, its CPU time counted in
            ``objective.points.cost()``).
        batch_size: samples per optimisation step *per process* (split into ``grad_accum`` micro-batches).
        lr: base learning rate.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"radam"`` (the papers' choice).
        betas: the optimiser's ``(β₁, β₂)`` (torch's default ``(0.9, 0.999)``; MeanFlow and improved
            MeanFlow on ImageNet use ``(0.9, 0.95)``).
        grad_clip: global gradient-norm clip (``None``: off).
        lr_decay_start: start of the inverse-sqrt decay (``None``: constant rate).
        lr_schedule: ``"inverse_sqrt"`` (default, with ``lr_decay_start``), ``"constant"``, ``"cosine"``
            or ``"linear"`` decay to ``lr_final`` × ``lr`` over ``total_steps`` (see :func:`learning_rate_schedule`).
        warmup_steps: linear learning-rate warm-up over this many steps (0: none).
        total_steps: the run's length, needed by the cosine and linear schedules (:func:`fit` sets it);
            also told to the objective (:meth:`~flowmaps.objectives.Objective.plan`).
        ema_decay: keep an exponential moving average of the weights (``None``: off; the averaged
            model named ``"ema"`` in :attr:`averages`); with ``ema_warmup`` (default) the decay is
            warmed up as ``min(ema_decay, (1 + k)/(10 + k))`` after ``k`` updates.
        ema_std: also keep EDM2's power-function averages, one per relative standard deviation
            σ_rel in this list (:mod:`flowmaps.train.power_ema`: after step t,
            θ̂ ← β θ̂ + (1 − β) θ(t) with β = (1 − 1/t)^{γ+1}, γ from σ_rel); named ``std0.050`` … in
            :attr:`averages`. When given, the first is the default average :attr:`ema` (what
            validation, sampling and export use unless told otherwise); the classic EMA, if also
            kept, stays available as ``"ema"``.
        seed: seeds the generator of data, base samples and times (rank ``r`` of a distributed run uses
            :func:`~flowmaps.train.distributed.rank_seed`), and the global RNG.
        max_bad_steps: consecutive non-finite steps tolerated (each update is skipped and reported in
            ``LossOutput.skipped``) before :class:`FloatingPointError` stops training.
        grad_accum: micro-batches per step; gradients are averaged (DDP synchronises on the last only).
        precision: ``"fp32"`` (default) or ``"bf16"`` (autocast of the network's plain forward passes;
            forward-mode JVPs and time features stay in fp32 unless the model's ``jvp_fp32`` is off;
            the rules: :mod:`flowmaps.precision`).
        tf32: on CUDA, allow TF32 in the step's fp32 matmuls and convolutions outside JVPs (``True``),
            or forbid it in all of them (``False``, default); the flags are restored after each step.
            No effect on the CPU.
        compile: ``torch.compile`` the network (and its fused JVP pass when it has one).
        compile_backend: the backend of ``compile`` (one of :data:`COMPILE_BACKENDS`): ``"inductor"``
            (default; generates C++ or Triton kernels, needs the host's compiler) or ``"aot_eager"`` /
            ``"eager"`` (trace only, no code generation: shows a network compiles on any host).
        distributed: wrap in DistributedDataParallel; ``None`` (default): when a process group with
            more than one rank is initialised (``flowmaps.train.distributed.init``).
        labels: class labels ``(N,)`` of tensor or ByteImages ``data`` (class-conditional training):
            each batch's labels are passed to the objective as ``cond``; with probability
            ``label_dropout`` a label is replaced by ``null_label`` (the unconditional label, for
            classifier-free guidance).
        augment: ``augment(x, generator) -> x`` applied to every drawn batch (e.g. horizontal flips).
        teacher_paths: options of :class:`~flowmaps.objectives.trajectories.TeacherPaths` when
            ``data`` is ``None`` (``paths``, ``steps``, ``refresh_every``, ``refresh_paths``); under
            torchrun every rank holds the same cache (same seed), solved on each rank.
        sample_shape (Sequence[int] | None): the shape of one sample when ``data`` is ``None`` (default: from
            the model). With ``data=None``, ``labels`` are the class labels to draw (uniformly over the
            tensor, then label dropout): each batch's points lie on the teacher's paths of its labels.
        progress: a progress bar while the teacher's paths are first solved (``data=None``).
        fused: the fused optimiser kernel with the device guard (module docstring); ``None``
            (default): on CUDA for ``adam``/``adamw``, else the multi-tensor (foreach) optimiser.

    Determinism: a run is a function of its seed; :meth:`state_dict` / :meth:`load_state_dict` capture
    everything that evolves (weights, EMA, optimiser and schedule, every rank's generator, the global
    RNG, the objective's own state such as PFMM's frozen teacher, counters), so a resumed run continues
    bit-identically.
    """

    def __init__(self, model: nn.Module, objective: Objective, data: DataSource, *,
                 batch_size: int = 256, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, grad_clip: float | None = None,
                 lr_decay_start: int | None = None, ema_decay: float | None = None, seed: int = 0,
                 max_bad_steps: int = 10, grad_accum: int = 1, precision: str = "fp32", tf32: bool = False,
                 compile: bool = False, compile_backend: str = "inductor",
                 distributed: bool | None = None,
                 labels: Tensor | None = None, label_dropout: float = 0.0,
                 null_label: int | None = None,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 fused: bool | None = None, lr_schedule: str = "inverse_sqrt",
                 warmup_steps: int = 0, total_steps: int | None = None, lr_final: float = 0.0,
                 ema_warmup: bool = True, ema_std: Sequence[float] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), teacher_paths: dict | None = None,
                 sample_shape=None, progress: bool = False):
        from . import distributed as dist_

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if grad_accum < 1 or batch_size % grad_accum:
            raise ValueError(f"grad_accum ({grad_accum}) must be >= 1 and divide batch_size "
                             f"({batch_size})")
        if not lr > 0:
            raise ValueError("lr must be > 0")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if not isinstance(tf32, bool):
            raise ValueError(f"tf32 must be True or False, got {tf32!r}")
        if max_bad_steps < 1:
            raise ValueError("max_bad_steps must be >= 1")
        self.model, self.objective = model, objective
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.device = params[0].device
        for module in objective.trainable_modules():  # a learned loss weight: the model's device and dtype
            module.to(device=self.device, dtype=params[0].dtype)
            params += [p for p in module.parameters() if p.requires_grad]
        if hasattr(model, "domain"):  # where (s, t) is trained: FlowMap.inverse refuses untrained directions
            model.domain = objective.domain
        self.dist = dist_.info()
        use_ddp = self.dist.enabled if distributed is None else bool(distributed)
        if use_ddp and not self.dist.enabled:
            raise ValueError("distributed=True needs an initialised process group with > 1 rank")
        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend: {compile_backend!r} is not one of "
                             f"{', '.join(COMPILE_BACKENDS)}")
        if compile:
            net = getattr(model, "net", model)
            if hasattr(net, "compile_jvp"):
                net.compile_jvp(backend=compile_backend)
            net.compile(backend=compile_backend)
        torch.manual_seed(seed)
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(
            dist_.rank_seed(seed, self.dist.rank))
        if labels is not None:
            if data is None:  # the labels to draw from (uniformly); the points follow b(x | label)
                if labels.ndim != 1 or not len(labels) or labels.is_floating_point() or labels.min() < 0:
                    raise ValueError("labels: without data, a (N,) tensor of the class labels to draw")
            elif not isinstance(data, (Tensor, ByteImages)) or labels.shape != (data.shape[0],):
                raise ValueError("labels must be a (N,) tensor beside a data tensor of N samples")
            if null_label is None:
                raise ValueError("class-conditional training needs null_label (the unconditional "
                                 "label used by label dropout and guidance)")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError("label_dropout must be in [0, 1)")
        self.data_free = data is None
        if data is None:  # without data: the objective's points on the teacher's paths (spec E.8)
            shape = tuple(sample_shape) if sample_shape is not None else sample_shape_of(model)
            n_labels = 0 if labels is None else max(int(labels.max()) + 1,
                                                    null_label + 1 if label_dropout > 0 else 0)
            points = objective.data_free(shape, device=self.device, dtype=params[0].dtype, seed=seed,
                                         progress=progress, labels=n_labels, **(teacher_paths or {}))
            data = points.placeholder
        elif teacher_paths is not None:
            raise ValueError("teacher_paths: applies to training without data (data=None)")
        # A source that draws its own labeled batches (LatentShards: one shard at a time), with a
        # position of its own kept in the resumable state.
        self.source = data if callable(getattr(data, "draw_labeled", None)) else None
        if self.source is not None and getattr(self.source, "yields_labels", False) and null_label is None:
            raise ValueError("class-conditional training needs null_label (the unconditional "
                             "label used by label dropout and guidance)")
        self.draw = batch_sampler(data, self.generator, self.device)
        if labels is not None:
            labels = labels.to(self.device)  # indexed by the generator's draws without a host copy
        self.labels, self.label_dropout, self.null_label = labels, float(label_dropout), null_label
        self.augment = augment
        self.batch_size, self.grad_clip, self.grad_accum = batch_size, grad_clip, grad_accum
        self.precision, self.tf32 = precision, tf32
        self.loss_fn: nn.Module = _ObjectiveLoss(model, objective)
        self.ddp = None
        if use_ddp:
            from torch.nn.parallel import DistributedDataParallel

            # Broadcasts rank 0's parameters and buffers, so every replica starts identical.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = self.loss_fn = DistributedDataParallel(self.loss_fn, device_ids=ids)
        if fused is None:
            fused = self.device.type == "cuda" and optimizer in FUSED
        if fused and optimizer not in FUSED:
            raise ValueError(f"fused: torch has no fused {optimizer}; use one of {FUSED}")
        # foreach on the CPU gives the single-tensor loop's results bit for bit (adam, adamw; radam
        # within round-off: torch's multi-tensor RAdam orders the rectified step's products otherwise)
        kernel = {"fused": True} if fused else (
            {"foreach": True} if self.device.type in ("cpu", "cuda") else {})
        self.optimizer = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay, betas=betas,
                                               **kernel)
        self._kernel = {"foreach": kernel.get("foreach"), "fused": kernel.get("fused")}
        self.device_guard = bool(fused)
        schedule = learning_rate_schedule(lr_schedule, lr_decay_start, warmup_steps, total_steps,
                                          lr_final)
        if total_steps is not None and hasattr(objective, "plan"):
            objective.plan(int(total_steps))  # a schedule over the run (AlphaFlow's curriculum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.ema_decay, self.ema_warmup = ema_decay, bool(ema_warmup)
        self.classic_ema = None
        if ema_decay is not None:
            self.classic_ema = copy.deepcopy(model).eval()
            self.classic_ema.requires_grad_(False)
            self._ema_pairs = (list(self.classic_ema.parameters()),
                               [p.detach() for p in model.parameters()],
                               list(self.classic_ema.buffers()), list(model.buffers()))
        self.power_ema = PowerEMA(model, ema_std) if ema_std is not None else None
        self.step_count = 0
        self.bad_steps, self.max_bad_steps = 0, max_bad_steps
        self._grad_norm: Tensor | None = None

    @property
    def averages(self) -> dict[str, nn.Module]:
        """Every averaged model kept, by name: ``"ema"`` (the classic EMA) and ``"std0.050"`` … (the
        power-function profiles of ``ema_std``), in that order."""
        out = {} if self.classic_ema is None else {"ema": self.classic_ema}
        if self.power_ema is not None:
            out.update(self.power_ema.models)
        return out

    @property
    def ema_default(self) -> str | None:
        """The name of the default average: the first power profile, else ``"ema"``, else ``None``."""
        if self.power_ema is not None:
            return self.power_ema.names[0]
        return "ema" if self.classic_ema is not None else None

    @property
    def ema(self) -> nn.Module | None:
        """The default averaged model (:attr:`ema_default`), or ``None`` when no average is kept."""
        name = self.ema_default
        return None if name is None else self.averages[name]

    def ema_metadata(self) -> dict:
        """What a model checkpoint records of the power profiles (``{}`` without them, so a classic
        run's checkpoints are unchanged): ``ema_profiles`` (name, σ_rel, γ, weight group of each) and
        ``ema_default``."""
        if self.power_ema is None:
            return {}
        return {"ema_profiles": self.power_ema.profiles(), "ema_default": self.ema_default}

    @property
    def last_grad_norm(self) -> float:
        """The gradient norm (before clipping) of the last step, read from the device."""
        return float("nan") if self._grad_norm is None else float(self._grad_norm)

    def step(self) -> LossOutput:
        """One optimisation step; returns the objective's output (loss and logged terms, averaged over
        micro-batches and ranks, still on the device).

        With the host guard a non-finite step is reported at once (``out.skipped``; the limit of
        ``max_bad_steps`` raises :class:`FloatingPointError` here); with the device guard it is skipped
        on the device, ``out.finite`` holds its two flags (loss, gradient) and :meth:`settle` reports
        it. The step runs under the TF32 flags of ``tf32`` (CUDA), its forwards under ``precision``."""
        with tf32_scope(self.tf32, self.device.type):
            return self._step()

    def _step(self) -> LossOutput:
        self.model.train()
        self.objective.begin_step(self.model, self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.batch_size // self.grad_accum
        outs = []
        for i in range(self.grad_accum):
            batch, cond = self._draw_batch(micro)
            last = i == self.grad_accum - 1
            with (contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()):
                with autocast(self.device.type, self.precision):
                    loss, out = self.loss_fn(batch, cond, self.generator)
                # Backward even when the loss is non-finite: under DDP every rank must join the
                # gradient all-reduce; the step is then skipped on every rank alike (below).
                (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()
            outs.append(out)
        out = self._reduce(outs)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.grad_clip if self.grad_clip is not None else float("inf")
        # Gradients are identical on every rank after DDP's all-reduce, so is their norm.
        out.grad_norm = self._grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).detach()
        finite = torch.stack([torch.isfinite(out.loss.detach()), torch.isfinite(out.grad_norm)])
        if self.device_guard:
            out.finite = finite
            keep = finite.all()
            self.optimizer.found_inf = (~keep).float()  # the fused kernel skips a non-finite update
            self.optimizer.step()
            self._update_ema(keep)
        else:
            loss_ok, grad_ok = finite.tolist()  # the host guard's one read (a CPU tensor on the CPU)
            if not (loss_ok and grad_ok):
                return self._skip(out, "loss" if not loss_ok else "gradient")
            self.optimizer.step()
            self._update_ema()
            self.bad_steps = 0
        self.scheduler.step()
        self.step_count += 1
        return out

    def _draw_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        """A batch (and its labels, with label dropout) from the trainer's generator."""
        g = self.generator
        if self.source is not None:
            x, cond = self.source.draw_labeled(n, g)
            x, cond = x.to(self.device), None if cond is None else cond.to(self.device)
        elif self.labels is None:
            x, cond = self.draw(n), None
        else:
            idx = torch.randint(self.labels.shape[0], (n,), generator=g, device=g.device)
            x = (self.draw(n) if self.data_free  # the placeholder: the points come from the teacher's paths
                 else self.draw.data[idx.to(self.draw.data.device)].to(self.device))
            cond = self.labels[idx.to(self.labels.device)].to(self.device)
        if cond is not None and self.label_dropout > 0:
            drop = torch.rand(n, generator=g, device=g.device).to(self.device) < self.label_dropout
            cond = torch.where(drop, torch.full_like(cond, self.null_label), cond)
        if self.augment is not None:
            x = self.augment(x, self.generator)
        return x, cond

    def _reduce(self, outs: list[LossOutput]) -> LossOutput:
        """Average loss, terms and stats over micro-batches and (one all-reduce) over ranks, in fp32 on
        the device (no host read)."""
        from . import distributed as dist_

        keys_t, keys_s = list(outs[0].terms), list(outs[0].stats)

        def scalar(v) -> Tensor:
            if isinstance(v, Tensor):
                return v.detach().reshape(()).to(self.device, torch.float32)
            return torch.tensor(float(v), dtype=torch.float32, device=self.device)

        rows = [[o.loss.detach().float()] + [scalar(o.terms[k]) for k in keys_t]
                + [scalar(o.stats[k]) for k in keys_s] for o in outs]
        values = torch.stack([torch.stack([v.to(self.device) for v in row]) for row in rows]).mean(0)
        if self.dist.enabled:
            values = dist_.all_reduce_sum(values) / self.dist.world_size
        loss = outs[0].loss if len(outs) == 1 and not self.dist.enabled else values[0]
        return LossOutput(loss, dict(zip(keys_t, values[1:1 + len(keys_t)].unbind())),
                          dict(zip(keys_s, values[1 + len(keys_t):].unbind())))

    def _skip(self, out: LossOutput, what: str) -> LossOutput:
        """Host guard: no update; the step and the schedule advance (as under the device guard). The
        power profiles average the unchanged weights in (θ(t) = θ(t − 1): they stay exact averages)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.power_ema is not None:
            self.power_ema.update(self.step_count + 1)
        with warnings.catch_warnings():  # on purpose when the first step is skipped: no update made
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()
        self.step_count += 1
        self._count_bad(out, what)
        return out

    def _count_bad(self, out: LossOutput, what: str) -> None:
        out.skipped = what
        self.bad_steps += 1
        if self.bad_steps >= self.max_bad_steps:
            terms = {k: round(v, 6) for k, v in out.logged().items() if k in out.terms}
            err = FloatingPointError(f"non-finite {what} for {self.bad_steps} consecutive steps "
                                     f"(last at step {self.step_count}, terms {terms}); stopping")
            err.output = out
            raise err

    def settle(self, pending: list[tuple[int, LossOutput]]) -> list[tuple[int, LossOutput, float]]:
        """Read steps ``[(step, output)]`` of :meth:`step` in one host transfer; returns
        ``[(step, output, loss)]``.

        Under the device guard this is where skipped steps are found (``output.skipped`` set) and
        counted; reaching ``max_bad_steps`` raises :class:`FloatingPointError` whose ``settled``
        attribute lists the steps up to the last bad one (steps after it in the window were taken)."""
        if not pending:
            return []
        columns = [torch.stack([out.loss.detach().reshape(()).double() for _, out in pending])]
        if self.device_guard:
            columns.append(torch.stack([out.finite for _, out in pending]).double().flatten())
        values = torch.cat(columns).tolist()
        losses, flags = values[:len(pending)], values[len(pending):]
        settled = []
        for i, (step, out) in enumerate(pending):
            settled.append((step, out, losses[i]))
            if not self.device_guard:
                continue
            loss_ok, grad_ok = flags[2 * i], flags[2 * i + 1]
            if loss_ok and grad_ok:
                self.bad_steps = 0
                continue
            try:
                self._count_bad(out, "loss" if not loss_ok else "gradient")
            except FloatingPointError as err:
                err.settled = settled
                raise
        return settled

    @torch.no_grad()
    def _update_ema(self, keep: Tensor | None = None) -> None:
        """One multi-tensor lerp of the EMA towards the weights; ``keep`` (device guard, a 0-dim bool)
        zeroes the weight of a skipped step on the device, with no host read (the same lerp, bit for
        bit). The power profiles are updated for every step, skipped or not
        (:class:`~flowmaps.train.power_ema.PowerEMA`), at t = the step's number."""
        if self.power_ema is not None:
            self.power_ema.update(self.step_count + 1)
        if self.classic_ema is None:
            return
        # Warm-up (as in common EMA implementations): early on the average would be dominated by the
        # initialisation, so the decay is capped at (1 + k) / (10 + k) after k updates.
        k = self.step_count
        decay = self.ema_decay
        if self.ema_warmup:
            decay = min(decay, (1.0 + k) / (10.0 + k))
        ema_params, params, ema_buffers, buffers = self._ema_pairs
        weight = 1.0 - decay
        if keep is not None:  # per-tensor device weights: a 0-dim tensor weight would be read (.item())
            weights = {dtype: keep.to(dtype) * weight for dtype in {p.dtype for p in ema_params}}
            weight = [weights[p.dtype] for p in ema_params]
        torch._foreach_lerp_(ema_params, params, weight)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    # --- checkpointing of the whole training state ------------------------------------------------
    def state_dict(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """``({group: {name: tensor}}, metadata)`` of everything a bit-exact resume needs.

        Groups: ``model``, ``ema``, ``optim`` (optimiser state tensors), ``rng`` (every rank's data/time
        generator and global RNG state, gathered: call on every rank), ``objective``. The metadata is
        JSON: step, counters, world size, optimiser hyper-parameters, scheduler, objective state (the
        whole list: :mod:`flowmaps.train.state`).
        """
        return trainer_state(self)

    def load_state_dict(self, tensors: dict[str, dict[str, Tensor]], meta: dict) -> None:
        """Restore :meth:`state_dict` (same world size, model and objective)."""
        load_trainer_state(self, tensors, meta)

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Assert (under torchrun) that every rank holds bit-identical parameters: a SHA-256 of the
        parameter bytes is gathered and compared; a mismatch raises ``RuntimeError`` naming the ranks.
        Cheap enough to run at every checkpoint, where the trainer's caller does."""
        import hashlib

        from . import distributed as dist_

        if not self.dist.enabled:
            return
        digest = hashlib.sha256()
        for p in self.model.parameters():
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
        hashes = dist_.all_gather_bytes(mine)
        bad = [r for r, h in enumerate(hashes) if not torch.equal(h, hashes[0])]
        if bad:
            raise RuntimeError(f"ranks {bad} hold different parameters than rank 0 at step "
                               f"{self.step_count}: gradient synchronisation failed")

    @torch.no_grad()
    def validation_loss(self, x1: Tensor, seed: int = 0, cond: Tensor | None = None) -> float:
        """The objective on fixed held-out data with a fixed generator, on the EMA weights when kept:
        comparable across steps (used to keep the best checkpoint). Leaves the training RNG alone."""
        model = self.ema if self.ema is not None else self.model
        g = torch.Generator(device=self.device).manual_seed(seed)
        cond = None if cond is None else cond.to(self.device)
        return float(self.objective(model, x1.to(self.device), cond, generator=g).loss)

    def run(self, steps: int, progress: bool = True,
            callback: Callable[[int, LossOutput], None] | None = None,
            should_stop: Callable[[], bool] | None = None, sync_every: int = 50) -> list[float]:
        """Run ``steps`` more steps with a progress bar (loss, steps/s, ETA); returns the loss history.

        The steps are read on the host every ``sync_every`` steps and at the end (:meth:`settle`):
        ``callback(step, output)`` is then called for each of them in order, so a callback that
        checkpoints must be called at a multiple of ``sync_every`` (the state is then that step's).
        ``should_stop`` is polled after every step (under torchrun at the reads only, agreed by an
        all-reduce): when it returns true the loop ends after that step and ``self.stopped`` is set.
        """
        from tqdm.auto import tqdm

        from . import distributed as dist_

        if steps < 0:
            raise ValueError("steps must be >= 0")
        if sync_every < 1:
            raise ValueError("sync_every must be >= 1")
        history: list[float] = []
        self.stopped = False
        name = getattr(self.objective, "name", "train")
        end = self.step_count + steps

        pending: list[tuple[int, LossOutput]] = []

        def report(settled) -> None:
            for step, out, loss in settled:
                history.append(loss)
                if callback is not None:
                    callback(step, out)
            if history:
                bar.set_postfix(loss=f"{history[-1]:.4g}")

        def settle() -> None:
            steps, pending[:] = list(pending), []
            try:
                settled = self.settle(steps)
            except FloatingPointError as err:
                report(err.settled)
                raise
            report(settled)

        with tqdm(total=end, initial=self.step_count, desc=name, unit="step", dynamic_ncols=True,
                  disable=not progress or not self.dist.is_main) as bar:
            while self.step_count < end:
                try:
                    pending.append((self.step_count + 1, self.step()))
                except FloatingPointError as err:  # host guard: the last skipped step is logged too
                    pending.append((self.step_count, err.output))
                    settle()
                    raise
                bar.update(1)
                read = self.step_count % sync_every == 0 or self.step_count == end
                stop = False
                if should_stop is not None and (read or not self.dist.enabled):
                    stop = dist_.broadcast_flag(should_stop(), self.device)
                if read or stop:
                    settle()
                if stop:
                    self.stopped = True
                    break
        return history

