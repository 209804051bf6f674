"""Worker of tests/test_distributed.py, launched by ``torchrun --nproc_per_node=2``; also the shared
builder of the one-process reference.

Each case trains a tiny flow map (float64, exact GMM teacher) for ``STEPS`` steps through
:class:`flowmaps.train.trainer.Trainer`, which wraps the loss in DistributedDataParallel. After every step
the flattened parameters of all ranks are gathered and compared bit for bit; rank 0 writes the final
parameters and the per-step verdicts to ``OUT/<case>.safetensors`` and ``OUT/verdicts.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flowmaps.runs import experiment as ex
from flowmaps.runs.models import build_interpolant, build_model
from flowmaps.runs.config import load_config
from flowmaps.train import distributed

STEPS = 4
BATCH = 32
# name -> (config overrides, Trainer options)
CASES = {
    "lmd": (["objective.name=lmd"], {}),
    "lmd_accum2": (["objective.name=lmd"], {"grad_accum": 2}),
    "emd_semigradient": (["objective.name=emd", "objective.emd_form=semigradient"], {}),
    "emd_full": (["objective.name=emd", "objective.emd_form=full"], {}),
    "emd_v": (["objective.name=emd", "objective.emd_form=v"], {}),
    "fmm": (["objective.name=fmm"], {}),
    "pfmm": (["objective.name=pfmm", "objective.stage_steps=2"], {}),
    "velocity": (["objective.name=velocity"], {}),
    # self-distillation: the learned loss weight (lsd, psd, esd) is synchronised like the model
    "lsd": (["objective.name=lsd", "objective.weighting=learned"], {}),
    "lsd_v": (["objective.name=lsd", "objective.form=v"], {}),
    "esd": (["objective.name=esd", "objective.weighting=learned"], {}),
    "psd": (["objective.name=psd", "objective.weighting=learned"], {}),
    "meanflow": (["objective.name=meanflow"], {}),
    # α over the 4 steps: 1, 1, 0.5, 0 (target without a pass, the discrete target, MeanFlow's JVP)
    "alphaflow": (["objective.name=alphaflow", "objective.alpha_end=4", "objective.weighting=adaptive"],
                  {}),
    "shortcut": (["objective.name=shortcut"], {}),
    "ct": (["objective.name=ct"], {}),
    "imf": (["objective.name=imf"], {}),
    "sct": (["objective.name=sct", "objective.tangent_warmup=2"], {}),
    # the two-time DiT on 1x8x8 images (its JVPs go through torch.func.jvp and the math attention path;
    # its plain passes through the fused SDPA kernel)
    "dit_lsd": (["objective.name=lsd", "objective.weighting=learned"], {}),
    "dit_meanflow": (["objective.name=meanflow"], {}),
}
TRAIN = dict(batch_size=BATCH, lr=1e-2, grad_clip=1.0, ema_decay=0.9, seed=5, lr_decay_start=2)


def gmm_problem(overrides=(), n_train: int = 512, n_eval: int = 64, init_seed: int = 0):
    """``(model, objective, data)``: a width-16 map on the gmm preset with its exact teacher, the
    objective and options ``overrides`` give (shared by the trainer tests)."""
    cfg = load_config("gmm", None, ["model.width=16", "model.depth=2", f"data.n_train={n_train}",
                                    f"data.n_eval={n_eval}", "teacher.exact=true", *overrides])
    bundle = ex.build_data(cfg)
    scales = ex.resolve_scales(cfg, bundle)
    interpolant = build_interpolant(cfg, scales)
    ex.attach_reference(cfg, bundle, interpolant)
    teacher = ex.build_teacher(cfg, bundle, scales, "cpu") if ex.needs_teacher(cfg) else None
    torch.manual_seed(init_seed)
    model = build_model(cfg, scales)
    return model, ex.build_objective(cfg, interpolant, teacher), bundle.train


def dit_problem(overrides=(), init_seed: int = 0):
    """``(model, objective, data)``: a width-16, one-block DiT on 48 random 1x8x8 images."""
    cfg = load_config("digits", None, ["model.name=dit", "model.dit_width=16", "model.dit_depth=1",
                                       "model.heads=2", *overrides])
    scales = {"sigma0": 1.0, "sigma_data": 0.5, "dim": 64, "shape": [1, 8, 8], "num_classes": 0}
    torch.manual_seed(init_seed)
    model = build_model(cfg, scales)
    data = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(11)) * 2 - 1
    return model, ex.build_objective(cfg, build_interpolant(cfg, scales)), data


def build(case: str):
    """``(model, objective, data)`` of a case, identical on every process (float64)."""
    problem = dit_problem if case.startswith("dit_") else gmm_problem
    model, objective, data = problem(CASES[case][0])
    for module in objective.trainable_modules():  # a learned loss weight, in the model's precision
        module.double()
    return model.double(), objective, data.double()


def trained_parameters(model, objective=None) -> list[torch.Tensor]:
    """The model's parameters, then those the objective trains beside it (a learned loss weight)."""
    extra = [] if objective is None else [p for m in objective.trainable_modules() for p in m.parameters()]
    return [*model.parameters(), *extra]


def flat_parameters(model, objective=None) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trained_parameters(model, objective)])


def main(out: Path) -> int:
    from safetensors.torch import save_file

    from flowmaps.train.trainer import Trainer

    torch.set_num_threads(1)
    info = distributed.init("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    verdicts = {}
    for case, (_, options) in CASES.items():
        model, objective, data = build(case)
        trainer = Trainer(model, objective, data, **TRAIN, **options)
        assert trainer.ddp is not None
        same = []
        for _ in range(STEPS):
            trainer.step()
            gathered = distributed.all_gather_rows(flat_parameters(model, objective)[None])
            same.append(bool(torch.equal(gathered[0], gathered[1])))
        trainer.check_replicas()  # the run-time guard agrees
        verdicts[case] = {"bit_identical_each_step": same, "skipped": trainer.bad_steps}
        if info.is_main:
            save_file({"params": flat_parameters(model, objective).contiguous()},
                      str(out / f"{case}.safetensors"))
    # The run-time guard catches replicas that drifted (as unsynchronised training would make them).
    model, objective, data = build("lmd")
    trainer = Trainer(model, objective, data, **TRAIN)
    if info.rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    try:
        trainer.check_replicas()
        verdicts["drift_detected"] = False
    except RuntimeError as err:
        verdicts["drift_detected"] = "ranks [1]" in str(err)
    if info.is_main:
        (out / "verdicts.json").write_text(json.dumps(verdicts))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
