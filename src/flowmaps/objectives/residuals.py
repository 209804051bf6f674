"""The three off-diagonal residuals of a flow map ``X̂_{s,t}(x) = x + (t − s) v̂_{s,t}(x)`` (spec §2.3,
§3.4, §3.6), each against a velocity source ``b`` (see :mod:`flowmaps.objectives.sources`).

Every function returns the residual vector ``r`` (shape of ``I_s``) whose squared norm is the loss; where
the gradient flows is set by ``stopgrad`` and ``form``:

* **Lagrangian** ``∂_t X̂_{s,t}(I_s) = b_t(X̂_{s,t}(I_s))``:
  ``form="map"``: ``r = ∂_t X̂ − b_t(X̂)`` with ``stopgrad="target"`` (LSD, LMD eq. 27: ``b_t(sg X̂)`` under
  sg, the gradient through the time-JVP tangent), ``"source"`` (eq. 26: the source's parameters frozen, the
  gradient also through ``X̂`` into ``b``) or ``"none"`` (own diagonal, nothing frozen).
  ``form="v"`` (§3.4): ``r = v̂_{s,t} − sg(b_t(X̂) − (t − s) ∂_t v̂_{s,t})`` — the same value, the gradient
  through the primal ``v̂`` only (no reverse-over-forward).
* **Eulerian** ``∂_s X̂_{s,t}(I_s) + ∇X̂_{s,t}(I_s) b_s(I_s) = 0``:
  ``form="map"``: ``r = ∂_s X̂ + ∇X̂ b`` with ``stopgrad="target"`` (ESD, EMD eq. 29, CT eq. 41: the advective
  term under sg), ``"source"`` (EMD eq. 28: one augmented JVP, gradient through both) or ``"none"``.
  ``form="v"`` (eq. 39/42: EMD-v, AYF-EMD, MeanFlow): ``r = v̂_{s,t} − sg(b + (t − s)[∂_s v̂ + ∇v̂ b])``,
  which equals ``−(∂_s X̂ + ∇X̂ b)``.
* **Semigroup** (progressive; PSD, shortcut): with ``u = γ s + (1 − γ) t``,
  ``r = v̂_{s,t}(I_s) − sg((1 − γ) v̂_{s,u}(I_s) + γ v̂_{u,t}(X̂_{s,u}(I_s)))`` (eq. 22/92: the X-space
  residual divided by ``(t − s)²``).

``warmup`` (AYF's tangent warm-up, v-forms only) scales the ``(t − s)`` term of the target.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._tensor import expand_as_data
from .sources import VelocitySource

__all__ = ["lagrangian", "eulerian", "semigroup_target", "progressive", "STOPGRADS", "FORMS"]

STOPGRADS = ("target", "source", "none")
FORMS = ("map", "v")

Record = Callable[[str, Tensor], None]


def _grad_mode(stopgrad: str) -> str:
    return {"target": "none", "source": "input", "none": "all"}[stopgrad]


def lagrangian(model, i_s: Tensor, s: Tensor, t: Tensor, cond: Tensor | None, source: VelocitySource,
               stopgrad: str = "target", form: str = "map", warmup: float = 1.0,
               record: Record | None = None) -> Tensor:
    """Lagrangian residual at ``(I_s; s, t)``; one forward-mode JVP in ``t`` plus one source pass."""
    gap = expand_as_data(t - s, i_s)
    if form == "v":
        v, (dt_v,) = model.v_jvps(i_s, s, t, [(None, None, 1.0)], cond=cond, detach=(True,))
        x_st = i_s + gap * v.detach()
        if record:
            record("jvp_norm", v.detach() + gap * dt_v)
        b = source.at(model, x_st, t, cond)
        return v - (b - warmup * gap * dt_v).detach()
    x_st, dt_x = model.jvp(i_s, s, t, dt=1.0, cond=cond)
    if record:
        record("jvp_norm", dt_x)
    if stopgrad == "target":
        return dt_x - source.at(model, x_st.detach(), t, cond)
    return dt_x - source.at(model, x_st, t, cond, grad=_grad_mode(stopgrad))


def eulerian(model, i_s: Tensor, b: Tensor, s: Tensor, t: Tensor, cond: Tensor | None,
             stopgrad: str = "target", form: str = "map", warmup: float = 1.0,
             record: Record | None = None, tangent: Tensor | None = None) -> Tensor:
    """Eulerian residual at ``(I_s; s, t)`` along the source velocity ``b = b_s(I_s)`` (computed by the
    caller: under sg unless ``stopgrad="none"``). ``tangent`` (v-form only): transport along another
    velocity than the additive ``b``, ``r = v̂ − sg(b + (t − s)[∂_s v̂ + ∇v̂ tangent])`` — improved
    MeanFlow's split, the network's own velocity in the JVP and the conditional ``İ`` beside it."""
    if tangent is not None and form != "v":
        raise ValueError("a separate transport velocity applies to the v-form Eulerian residual")
    if form == "v":
        along = (b if tangent is None else tangent).detach()
        v, (dv,) = model.v_jvps(i_s, s, t, [(along, 1.0, None)], cond=cond, detach=(True,))
        if record:
            record("jvp_norm", dv)
        return v - (b + warmup * expand_as_data(t - s, v) * dv).detach()
    if stopgrad == "target" and hasattr(model, "jvps"):
        # One primal pass carrying both tangents; the spatial one under stop-gradient.
        _, (ds_x, advection) = model.jvps(i_s, s, t, [(None, 1.0, None), (b.detach(), None, None)],
                                          cond=cond, detach=(False, True))
        if record:
            record("jvp_norm", ds_x)
        return ds_x + advection
    if stopgrad == "target":  # a model object with jvp only: two passes
        with torch.no_grad():
            _, advection = model.jvp(i_s, s, t, dx=b.detach(), cond=cond)
        _, ds_x = model.jvp(i_s, s, t, ds=1.0, cond=cond)
        if record:
            record("jvp_norm", ds_x)
        return ds_x + advection
    _, residual = model.jvp(i_s, s, t, dx=b, ds=1.0, cond=cond)
    if record:
        record("jvp_norm", residual)
    return residual


def semigroup_target(slope: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, s: Tensor,
                     t: Tensor, gamma: Tensor | float) -> Tensor:
    """``(1 − γ) v_{s,u}(x) + γ v_{u,t}(X_{s,u}(x))``, ``u = γ s + (1 − γ) t``: the chord slope of two
    jumps, from ``slope(x, a, b) = v_{a,b}(x)``. Equals ``v_{s,t}(x)`` for an exact map (semigroup)."""
    gamma = (torch.full_like(s, gamma) if isinstance(gamma, (int, float))
             else torch.as_tensor(gamma, dtype=s.dtype, device=s.device).expand_as(s))
    u = gamma * s + (1.0 - gamma) * t
    v_su = slope(x, s, u)
    x_su = x + expand_as_data(u - s, x) * v_su
    g = expand_as_data(gamma, x)
    return (1.0 - g) * v_su + g * slope(x_su, u, t)


def progressive(model, i_s: Tensor, s: Tensor, t: Tensor, cond: Tensor | None, teacher,
                gamma: Tensor | float) -> Tensor:
    """Semigroup residual ``v̂_{s,t}(I_s) − sg(two jumps of the teacher map)``; ``teacher`` is the model
    itself (current parameters, [P2]) or its EMA (shortcut models)."""
    with torch.no_grad():
        target = semigroup_target(lambda x, a, b: teacher.v(x, a, b, cond), i_s.detach(), s, t, gamma)
    return model.v(i_s, s, t, cond) - target
