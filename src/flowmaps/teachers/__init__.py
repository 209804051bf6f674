"""Teachers from elsewhere: models of torchcfm, Meta's flow_matching and diffusers as teacher velocities
``b(x, t)`` in this library's convention (``t = 0`` noise, ``t = 1`` data, per-sample ``t`` of shape
``(B,)``, linear interpolant ``I_t = (1 − t) x0 + t x1``, ``x0 ~ N(0, σ0² I)``), and teachers built by the
user's own function (``teacher.factory=package.module:function``).

    import flowmaps as fm
    teacher = fm.teachers.torchcfm(cfm_mlp)                     # [x, t] or (t, x) call orders
    teacher = fm.teachers.flow_matching(wrapper)                # a flow_matching ModelWrapper
    teacher = fm.teachers.diffusers_flow(transformer, scheduler)  # b = −model(x, 1000 (1 − t))
    teacher = fm.teachers.diffusers_vp(unet, ddpm_scheduler)    # ε / v / x prediction, exact
    objective = fm.objectives.LMD(fm.Linear(), teacher)

Layer: after ``nets`` and before ``objectives``; it imports only from the mathematics layer
(``_tensor``, ``checkpoint``) and never the libraries it adapts.

* :mod:`~flowmaps.teachers.conversion` — any Gaussian path to our linear interpolant, exactly (derivation);
  the continuous-time DDPM schedule.
* :mod:`~flowmaps.teachers.adapters` — the four adapters and :class:`TeacherVelocity`.
* :mod:`~flowmaps.teachers.factory` — ``module:function`` + safetensors weights + kwargs (+ adapter).
* :mod:`~flowmaps.teachers.samplers` — DDIM and DPM-Solver++(2M) of any teacher in our convention, on
  diffusers' spacings, and a diffusers teacher's own scheduler as a sampler.
* :mod:`~flowmaps.teachers.warm_start` — :func:`two_time`: a two-time student made from the teacher's own
  network, exactly the teacher at initialisation (``v_{s,t} = b_s``).
"""

from . import samplers
from .adapters import ADAPTERS, TeacherVelocity, diffusers_flow, diffusers_vp, flow_matching, torchcfm
from .conversion import VPSchedule
from .factory import TeacherError, check_teacher, from_factory
from .warm_start import WarmStartError, two_time

__all__ = ["torchcfm", "flow_matching", "diffusers_flow", "diffusers_vp", "ADAPTERS", "TeacherVelocity",
           "VPSchedule", "from_factory", "check_teacher", "TeacherError", "samplers", "two_time",
           "WarmStartError"]
