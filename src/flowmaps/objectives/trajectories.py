"""Points on the teacher's own paths, for distillation without a dataset (spec E.8).

A map distilled with LMD (or EMD) needs, at each drawn time ``s``, points ``x_s`` where the residual is
trained; with data they are the interpolant's ``I_s = α_s x0 + β_s x1``. Without data they are points on
the teacher's probability-flow paths from the base (time convention: ``t = 0`` base, ``t = 1`` data):

    x_s = X^b_{0,s}(x0),    x0 ~ N(0, σ0² I),    d/dt X^b_{0,t}(x0) = b_t(X^b_{0,t}(x0)),

whose law at time ``s`` is the teacher's own time-``s`` marginal (the one its sampler, and the
distilled map, visit). :class:`TeacherPaths` keeps a cache of ``paths`` such trajectories, solved with
RK4 on a uniform grid of ``steps`` intervals, storing each path's state ``x_i`` and velocity
``b_{t_i}(x_i)`` at the grid times ``t_i = i / steps`` (the velocity at ``t_i`` is RK4's first stage, so
storing it costs one extra evaluation per path, at ``t = 1``). A point at any ``s`` is the cubic Hermite
interpolant of the two neighbouring grid states and velocities, whose error ``O(h⁴)`` is that of RK4.

Refresh. The cache is ``paths / refresh_paths`` chunks; every ``refresh_every`` training steps the next
chunk (round robin) is re-solved from fresh base points, so a run of ``K`` steps sees
``paths + (K / refresh_every) · refresh_paths`` distinct paths. Each chunk's base points come from a
generator seeded by ``(seed, chunk, refresh event)``, so the cache at step ``k`` is a function of the
seed and ``k`` alone: a resumed run rebuilds it exactly (bit for bit: every chunk is solved alone, with
the same shapes as in the uninterrupted run) instead of storing it in the checkpoint.

Class labels. For a class-conditional teacher (``labels = L > 0``) path ``i`` carries the label
``i mod L`` and is solved with the teacher's velocity given that label, ``b_t(x | i mod L)`` (guided, if
the teacher is): a label is a function of the path's index, so the cache and a resume need nothing more.
Points are then drawn for given labels ``c`` (the trainer draws them as it draws a labelled batch, label
dropout included): path ``c + L·j`` with ``j`` uniform, a point of the teacher's time-``s`` marginal given
``c``. ``L`` counts the null label (the last) when the student is trained with label dropout, whose paths
follow the unconditional velocity, as data-based distillation pairs a dropped label with ``b_t(x | ∅)``.

Cost. Every teacher evaluation is counted (``nfe``: point evaluations) and timed (``seconds``, CPU time of
this process in the solves), so a comparison with data-based distillation at equal CPU includes it.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .._tensor import expand_as_data

__all__ = ["TeacherPaths"]


class TeacherPaths:
    """A refreshed cache of the teacher's ODE paths from the base (module docstring).

    Args:
        teacher: the velocity ``b(x, t[, cond])`` (per-sample ``t``), or an object with ``.velocity``.
        interpolant: gives the base ``N(0, σ0² I)`` (``sample_base``).
        shape: the shape of one sample.
        paths: cached paths (rounded up to a multiple of ``refresh_paths``).
        steps: RK4 intervals on ``[0, 1]`` (NFE per path: ``4 · steps + 1``).
        refresh_every: training steps between refreshes (0: never refresh).
        refresh_paths: paths re-solved at each refresh (the chunk size; also the solve's batch).
        seed: seeds the base points of every chunk.
        device, dtype: where the cache lives (the model's device).
        labels: ``L > 0`` for a class-conditional teacher: path ``i`` follows ``b(x, t | i mod L)``
            (module docstring); ``0`` (default) for an unconditional one.
        progress: a progress bar while the whole cache is solved.
    """

    def __init__(self, teacher, interpolant, shape, paths: int = 4096, steps: int = 32,
                 refresh_every: int = 100, refresh_paths: int = 256, seed: int = 0,
                 device="cpu", dtype=torch.float32, labels: int = 0, progress: bool = False):
        from .base import as_velocity

        if paths < 1 or steps < 1 or refresh_paths < 1 or refresh_every < 0:
            raise ValueError("teacher paths: paths, steps and refresh_paths must be >= 1 and "
                             f"refresh_every >= 0, got {paths}, {steps}, {refresh_paths}, {refresh_every}")
        if labels < 0 or (labels and labels > paths):
            raise ValueError(f"teacher paths: labels must be in [0, paths = {paths}], got {labels}")
        self.velocity = as_velocity(teacher)
        self.labels = int(labels)
        self.interpolant, self.shape = interpolant, tuple(int(v) for v in shape)
        self.chunk = min(int(refresh_paths), int(paths))
        self.n_chunks = math.ceil(int(paths) / self.chunk)
        self.paths, self.steps = self.n_chunks * self.chunk, int(steps)
        self.refresh_every, self.seed = int(refresh_every), int(seed)
        self.device, self.dtype, self.progress = torch.device(device), dtype, progress
        self.states: Tensor | None = None  # (steps + 1, paths, *shape)
        self.velocities: Tensor | None = None
        self.nfe, self.seconds, self.solved = 0, 0.0, 0
        self._step = None

    # --- the cache ---------------------------------------------------------------------------------
    def _events(self, step: int) -> int:
        return step // self.refresh_every if self.refresh_every else 0

    def _last_event(self, chunk: int, events: int) -> int:
        """The refresh event that last re-solved ``chunk`` after ``events`` events (0: the first fill);
        event ``e >= 1`` re-solves chunk ``(e − 1) mod n_chunks``."""
        version = events // self.n_chunks + (1 if chunk < events % self.n_chunks else 0)
        return 0 if version == 0 else (version - 1) * self.n_chunks + chunk + 1

    def base_points(self, chunk: int, event: int) -> Tensor:
        """The base points ``x0`` of ``chunk`` solved at refresh ``event`` (CPU generator: the same on
        every device)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + chunk) * 1_000_033 + event)
        like = torch.empty(self.chunk, *self.shape, dtype=self.dtype)
        return self.interpolant.sample_base(like, g).to(self.device)

    def path_labels(self, rows: Tensor) -> Tensor | None:
        """The class labels of the paths ``rows`` (``rows mod L``), or ``None`` (unconditional)."""
        return rows % self.labels if self.labels else None

    @torch.no_grad()
    def solve(self, x0: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(states, velocities)`` of the paths from ``x0`` (given labels ``cond``, for a conditional
        teacher) at the grid times, ``(steps + 1, n, *shape)``: RK4 (the velocity at each grid time is its
        first stage)."""
        from .base import call_teacher

        start = time.process_time()
        h = 1.0 / self.steps
        n = x0.shape[0]

        def b(x, t):
            return call_teacher(self.velocity, x,
                                torch.full((n,), float(t), dtype=x.dtype, device=x.device), cond)

        xs, vs, x = [x0], [], x0
        for i in range(self.steps):
            t = i * h
            k1 = b(x, t)
            k2 = b(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = b(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = b(x + h * k3, t + h)
            x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
            vs.append(k1)
            xs.append(x)
        vs.append(b(x, 1.0))
        self.nfe += n * (4 * self.steps + 1)
        self.seconds += time.process_time() - start
        self.solved += n
        return torch.stack(xs), torch.stack(vs)

    def _solve_chunk(self, chunk: int, event: int) -> None:
        first = chunk * self.chunk
        cond = self.path_labels(torch.arange(first, first + self.chunk, device=self.device))
        states, velocities = self.solve(self.base_points(chunk, event), cond)
        rows = slice(first, first + self.chunk)
        self.states[:, rows] = states.to(self.dtype)
        self.velocities[:, rows] = velocities.to(self.dtype)

    def fill(self, step: int = 0) -> None:
        """Solve the whole cache as it stands at training step ``step`` (start, or resume)."""
        from tqdm.auto import tqdm

        size = (self.steps + 1, self.paths, *self.shape)
        self.states = torch.empty(size, dtype=self.dtype, device=self.device)
        self.velocities = torch.empty(size, dtype=self.dtype, device=self.device)
        events = self._events(step)
        for c in tqdm(range(self.n_chunks), desc="teacher paths", unit="chunk",
                      disable=not self.progress, leave=False):
            self._solve_chunk(c, self._last_event(c, events))
        self._step = step

    def begin_step(self, step: int) -> None:
        """Called before training step ``step``: the first call solves the cache (as it stands at
        ``step``), later ones re-solve the chunk a refresh event names."""
        step = int(step)
        if self.states is None or self._step is None or step < self._step:
            self.fill(step)
            return
        for k in range(self._step + 1, step + 1):  # normally exactly one step later
            if self.refresh_every and k % self.refresh_every == 0:
                e = k // self.refresh_every
                self._solve_chunk((e - 1) % self.n_chunks, e)
        self._step = step

    # --- points at time s --------------------------------------------------------------------------
    def at(self, s: Tensor, generator: torch.Generator | None = None,
           index: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Points ``x_s`` on cached paths at per-sample times ``s`` (paths drawn uniformly with
        ``generator`` unless ``index`` names them; with labels, among the paths of each sample's label
        ``cond``): cubic Hermite interpolation of the grid states."""
        if self.states is None:
            self.fill(0)
        if index is None:
            dev = generator.device if generator is not None else self.device
            if self.labels:
                if cond is None:
                    raise ValueError("teacher paths of a class-conditional teacher: give the labels "
                                     "(cond) of the points")
                per_label = self.paths // self.labels
                index = (cond.to(dev) + self.labels
                         * torch.randint(per_label, (s.shape[0],), generator=generator, device=dev))
            else:
                index = torch.randint(self.paths, (s.shape[0],), generator=generator, device=dev)
        index = index.to(self.device)
        u = s.to(self.device, torch.float64).clamp(0.0, 1.0) * self.steps
        i = u.floor().clamp(max=self.steps - 1).long()
        tau = (u - i).to(self.dtype)
        h = 1.0 / self.steps
        x_a, x_b = self.states[i, index], self.states[i + 1, index]
        v_a, v_b = self.velocities[i, index], self.velocities[i + 1, index]
        t2, t3 = tau * tau, tau * tau * tau
        w = [2 * t3 - 3 * t2 + 1, (t3 - 2 * t2 + tau) * h, -2 * t3 + 3 * t2, (t3 - t2) * h]
        w = [expand_as_data(c, x_a) for c in w]
        return (w[0] * x_a + w[1] * v_a + w[2] * x_b + w[3] * v_b).to(s.dtype)

    def placeholder(self, n: int) -> Tensor:
        """A batch of zeros of the sample shape: what the trainer passes as ``x1`` when there is no
        data (the objective draws its points here; ``x1`` only gives shape, dtype and device)."""
        return torch.zeros(n, *self.shape, dtype=self.dtype, device=self.device)

    def endpoints(self) -> Tensor:
        """The cached paths' states at ``t = 1``: samples of the teacher (path ``i`` given label
        ``i mod L`` for a conditional teacher, :meth:`path_labels`)."""
        if self.states is None:
            self.fill(0)
        return self.states[-1]

    def cost(self) -> dict:
        return {"teacher_nfe": self.nfe, "teacher_seconds": round(self.seconds, 3),
                "teacher_paths_solved": self.solved}

    def config(self) -> dict:
        return {"paths": self.paths, "steps": self.steps, "refresh_every": self.refresh_every,
                "refresh_paths": self.chunk, "seed": self.seed, "labels": self.labels}
