"""Time samplers: where in ``[0, 1]²`` an objective looks at the map.

Time convention: ``t = 0`` base, ``t = 1`` data. A sampler is called as ``sampler(n, like, generator)``
and returns per-sample times ``(s, t)`` of shape ``(n,)`` with the dtype and device of ``like``.

* :class:`TimeSampler` — ``(s, t)`` on the diagonal ``s = t``, the triangle ``s ≤ t`` or the square,
  each time uniform or logit-normal.
* :class:`DyadicPairs` — the grid of shortcut models: gap ``2d``, ``d = 2^{-k}``, ``s`` a multiple of ``2d``.
* :class:`PairStart` — diagonal times ``s = t`` taken as the start of a pair of another sampler
  (MeanFlow's ``r = t`` samples).
* :class:`SelfDistillationTimes` — the batch split of self-distillation ([P2] §3.1): the first
  ``⌊η n⌋`` samples on the diagonal (flow matching), the rest off-diagonal pairs from another sampler,
  optionally under the gap-annealing curriculum of [P2] F.2 (flow matching alone for ``fm_steps``
  steps, then the largest gap ``t − s`` grows linearly to 1 over ``anneal_steps`` steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TimeSampler", "DyadicPairs", "PairStart", "SelfDistillationTimes", "as_time_sampler",
           "DOMAINS"]

DOMAINS = ("diagonal", "triangle", "square")
DISTRIBUTIONS = ("uniform", "logit_normal", "gap")


class TimeSampler:
    """Draws per-sample times ``(s, t)`` on a domain of ``[0, 1]²``.

    Args:
        domain: ``"diagonal"``, ``"triangle"`` (``s ≤ t``) or ``"square"``.
        distribution: ``"uniform"`` (default; uniform on the domain), ``"logit_normal"`` (each time
            ``σ(N(mean, std))``, as in MeanFlow; two i.i.d. draws) or ``"gap"`` (the jump length
            ``|t − s| ~ U[0, 1]``, then ``min(s, t) ~ U[0, 1 − |t − s|]``: every jump length equally
            likely, where the uniform triangle gives a gap ``g`` the density ``2(1 − g)`` and almost
            never trains the one-step jump ``(0, 1)``; on the square the direction is a coin flip).
        mean: mean of the normal of ``"logit_normal"``.
        std: standard deviation of that normal.
        tmin: lower end of the clip range of the times (default 0: the whole interval, as in [C2]).
        tmax: upper end of that range (default 1).

    On the triangle the two i.i.d. draws are sorted (``s = min``, ``t = max``), which is uniform on it.
    MeanFlow's parameters are quoted in its own time (``τ = 1`` noise); in ours (``t = 1 − τ``) the mean
    changes sign: its ImageNet ``(−0.4, 1.0)`` is ``mean=0.4, std=1.0`` here.
    """

    def __init__(self, domain: str = "triangle", distribution: str = "uniform", mean: float = 0.0,
                 std: float = 1.0, tmin: float = 0.0, tmax: float = 1.0):
        if domain not in DOMAINS:
            raise ValueError(f"unknown time domain {domain!r}; choose one of {DOMAINS}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution {distribution!r}; "
                             "choose 'uniform' or 'logit_normal'")
        if not 0.0 <= tmin < tmax <= 1.0:
            raise ValueError(f"need 0 <= tmin < tmax <= 1, got tmin={tmin}, tmax={tmax}")
        if not std > 0:
            raise ValueError(f"the logit-normal std must be > 0, got {std}")
        self.domain, self.distribution = domain, distribution
        self.mean, self.std, self.tmin, self.tmax = float(mean), float(std), tmin, tmax

    def _draw_gap(self, n: int, like: Tensor, generator) -> tuple[Tensor, Tensor]:
        span = self.tmax - self.tmin
        u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        v = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        gap = span * u
        s = self.tmin + (span - gap) * v
        t = s + gap
        if self.domain == "square":
            flip = torch.rand(n, generator=generator, device=like.device) < 0.5
            s, t = torch.where(flip, t, s), torch.where(flip, s, t)
        return s, t

    def _draw(self, n: int, like: Tensor, generator) -> Tensor:
        if self.distribution in ("uniform", "gap"):
            u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        else:
            z = torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)
            u = torch.sigmoid(self.mean + self.std * z)
        return self.tmin + (self.tmax - self.tmin) * u

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        if self.distribution == "gap" and self.domain != "diagonal":
            return self._draw_gap(n, like, generator)
        a = self._draw(n, like, generator)
        if self.domain == "diagonal":
            return a, a
        b = self._draw(n, like, generator)
        if self.domain == "triangle":
            return torch.minimum(a, b), torch.maximum(a, b)
        return a, b

    def diagonal(self) -> "TimeSampler":
        """The same distribution on the diagonal (``s = t``)."""
        return TimeSampler("diagonal", self.distribution, self.mean, self.std, self.tmin, self.tmax)

    def config(self) -> dict:
        return dict(domain=self.domain, distribution=self.distribution, mean=self.mean,
                    std=self.std, tmin=self.tmin, tmax=self.tmax)


def as_time_sampler(times: TimeSampler | str) -> TimeSampler:
    return times if not isinstance(times, str) else TimeSampler(times)


class DyadicPairs:
    """The dyadic grid of shortcut models (Frans et al.; spec App. C), in our time.

    Level ``k ~ U{1, …, levels}`` sets the half-step ``d = 2^{-k}``; the pair is ``(s, s + 2d)`` with ``s``
    a uniform multiple of the jump ``2d`` such that ``s + 2d ≤ 1`` (their ``targets_shortcut.py``:
    ``t = randint(0, 2^j) / 2^j`` for the jump ``2^{-j}``), so the midpoint ``s + d`` is an odd multiple
    of ``d``. With ``levels = 7`` the jumps are ``1, 1/2, …, 1/64`` and the bootstrap half-steps
    ``1/2 … 1/128``, as in their code (which gives the levels equal shares of the batch; here ``k`` is
    drawn uniformly). Used with the midpoint semigroup residual (``γ = ½``, ``u = s + d``), this is their
    self-consistency target.
    """

    domain = "triangle"

    def __init__(self, levels: int = 7):
        if not 1 <= int(levels) <= 20:
            raise ValueError(f"dyadic levels must be in 1..20, got {levels}")
        self.levels = int(levels)

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        k = torch.randint(1, self.levels + 1, (n,), generator=generator, device=like.device)
        jump = torch.pow(2.0, 1 - k.to(like.dtype))  # 2d
        starts = 1.0 / jump  # number of admissible multiples of the jump: 0, 2d, …, 1 − 2d
        u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
        s = torch.floor(u * starts).clamp(max=starts - 1) * jump
        return s, s + jump

    def config(self) -> dict:
        return {"domain": "dyadic", "levels": self.levels}


class PairStart:
    """Diagonal times from a pair sampler: draw ``(s, t)`` from ``pairs`` and return ``(s, s)``.

    MeanFlow's ``sample_tr`` draws two logit-normal times, sorts them and sets ``r = t`` on a fraction of
    the batch, so its flow-matching time is the noisier of two draws: in our time (``t = 1 − τ``) the
    start ``s = min`` of the sorted pair. With a single draw the diagonal times would be noisier-biased
    the other way (median 0.60 against the official 0.46 at MeanFlow's ImageNet setting).
    """

    domain = "diagonal"

    def __init__(self, pairs):
        self.pairs = pairs

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        s, _ = self.pairs(n, like, generator)
        return s, s

    def config(self) -> dict:
        return {"domain": "diagonal", "from_pairs": self.pairs.config()}


class SelfDistillationTimes:
    """Times of a self-distillation batch: ``⌊η n⌋`` diagonal samples first, then off-diagonal pairs.

    Args:
        eta: fraction of the batch on the diagonal, ``0 ≤ η < 1`` ([P2] Table 2: 0.75). ``η = 0`` is pure
            distillation (LMD/EMD, consistency training): every sample off the diagonal.
        pairs: sampler of the off-diagonal pairs (a :class:`TimeSampler` on the triangle or the square,
            or :class:`DyadicPairs`).
        diagonal: sampler of the diagonal times (default: ``pairs``' distribution on the diagonal,
            uniform for the uniform triangle as in [P2]).
        fm_steps: the gap-annealing curriculum ([P2] F.2; off when both this and ``anneal_steps`` are
            0): for the first ``fm_steps`` steps the whole batch is on the diagonal (flow matching alone);
        anneal_steps: then ``t ← min(t, s + δ_k)`` with ``δ_k = min(1, (k − fm_steps) / anneal_steps)``.

    The diagonal samples have ``s = t`` exactly, and :meth:`n_diagonal` tells how many lead the batch;
    call :meth:`begin_step` with the step count before drawing (the objective's ``begin_step`` does).
    """

    def __init__(self, eta: float = 0.75, pairs: TimeSampler | DyadicPairs | None = None,
                 diagonal: TimeSampler | None = None, fm_steps: int = 0, anneal_steps: int = 0):
        if not 0.0 <= float(eta) < 1.0:
            raise ValueError(f"eta (the diagonal fraction) must be in [0, 1), got {eta}")
        if int(fm_steps) < 0 or int(anneal_steps) < 0:
            raise ValueError("fm_steps and anneal_steps must be >= 0")
        self.eta = float(eta)
        self.pairs = pairs if pairs is not None else TimeSampler("triangle")
        if diagonal is None:
            diagonal = self.pairs.diagonal() if hasattr(self.pairs, "diagonal") else TimeSampler("diagonal")
        self.diag = diagonal
        self.fm_steps, self.anneal_steps = int(fm_steps), int(anneal_steps)
        self.step = 0

    @property
    def domain(self) -> str:
        return getattr(self.pairs, "domain", "triangle")

    @property
    def annealing(self) -> bool:
        return self.fm_steps > 0 or self.anneal_steps > 0

    def begin_step(self, step: int) -> None:
        self.step = int(step)

    def max_gap(self) -> float:
        """The curriculum's current largest ``|t − s|`` (1 without a curriculum)."""
        if not self.annealing:
            return 1.0
        k = self.step - self.fm_steps
        if k < 0:
            return 0.0
        return 1.0 if self.anneal_steps == 0 else min(1.0, k / self.anneal_steps)

    def n_diagonal(self, n: int) -> int:
        """How many of ``n`` samples lead the batch on the diagonal (all of them during the
        curriculum's flow-matching phase)."""
        if self.max_gap() == 0.0:
            return n
        return int(self.eta * n)

    def __call__(self, n: int, like: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        n_d = self.n_diagonal(n)
        parts_s, parts_t = [], []
        if n_d:
            t_d, _ = self.diag(n_d, like, generator)
            parts_s.append(t_d)
            parts_t.append(t_d)
        if n_d < n:
            s, t = self.pairs(n - n_d, like, generator)
            gap = self.max_gap()
            if gap < 1.0:  # the curriculum: the largest jump grows with the step count
                t = torch.where(t >= s, torch.minimum(t, s + gap), torch.maximum(t, s - gap))
            parts_s.append(s)
            parts_t.append(t)
        if len(parts_s) == 1:
            return parts_s[0], parts_t[0]
        return torch.cat(parts_s), torch.cat(parts_t)

    def config(self) -> dict:
        out = {"eta": self.eta, "pairs": self.pairs.config(), "diagonal": self.diag.config()}
        if self.annealing:
            out.update(fm_steps=self.fm_steps, anneal_steps=self.anneal_steps)
        return out
