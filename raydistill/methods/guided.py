"""Guided distillation (Meng et al., CVPR 2023, Sec. 3.1).

Notation: x real data with class c; w the guidance strength; t ~ U(0, 1]; z_t = alpha_t x + sigma_t xi;
teacher x_hat_theta; student x_hat_eta(z_t, c, w), one network evaluation instead of two.

    x_tilde = (1 + w) x_hat_theta(z_t, c) - w x_hat_theta(z_t, null)      (the CFG teacher)
    L_eta   = weight(lambda_t) || x_tilde - x_hat_eta(z_t, c, w) ||^2,  w ~ U[w_min, w_max]

The student is initialised from the teacher, its w embedding zero-initialised (so it starts as the
w = 0 conditional teacher). `guided_target` is the one implementation of the target: the training
loop (teacher inline) and the pair workers (`raydistill pairs --mode guided`, whose shards carry z_t,
t, w and x_tilde) both call it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from raydistill.conditions import Conditions, batch_cond
from raydistill.config import ConfigError, GuidanceRange, ModelConfig, TrainJob
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.methods.base import (
    DATA,
    PAIRS,
    Method,
    MethodSpec,
    Phase,
    Trainable,
    draw_w,
    regression_loss,
    require_distillable,
)
from raydistill.models.checkpoint import Checkpoint


@torch.no_grad()
def guided_target(teacher: Denoiser, *, x: Tensor, eps: Tensor, t: Tensor, cond: dict[str, Tensor],
                  schedule: Schedule) -> tuple[Tensor, Tensor]:
    """(z_t, x_tilde): z_t = alpha_t x + sigma_t eps and the guided teacher's x_hat_w(z_t, c)
    (`teacher` reads c and w from cond, e.g. Checkpoint.w_denoiser)."""
    alpha, sigma = (broadcast_like(v, x) for v in schedule.alpha_sigma(t))
    z_t = alpha * x + sigma * eps
    return z_t, teacher(z_t, t, cond)


class GuidedDistillation(Method):
    def __init__(self, *, teacher: Denoiser | None, student: nn.Module, student_config: ModelConfig,
                 schedule: Schedule, guidance: GuidanceRange, weighting: str, steps: int,
                 conditions: Conditions, reads: str = DATA):
        """`reads`: DATA (targets inline) or PAIRS (precomputed targets); `conditions`: what a
        data batch's c means (the teacher's)."""
        require_distillable(student_config)
        self.teacher, self.student, self.config = teacher, Trainable(student), student_config
        self.conditions = conditions
        self.schedule, self.guidance, self.weighting, self.steps = schedule, guidance, weighting, steps
        self.reads = reads

    def trainables(self) -> dict[str, Trainable]:
        return {"student": self.student}

    def phases(self) -> list[Phase]:
        return [Phase("student", "student", reads=(self.reads,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        if PAIRS in batch:
            z_t, t, x_tilde = (batch[PAIRS][k] for k in ("z_t", "t", "target"))
            cond = batch_cond(batch[PAIRS])
        else:
            x, c = batch[DATA]["x"], batch[DATA]["c"]
            n, device, g = len(x), x.device, self.rng
            t = uniform_t(n, generator=g, device=device, dtype=x.dtype)
            w = draw_w(n, self.guidance.w_min, self.guidance.w_max, g, device).to(x.dtype)
            eps = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
            cond = self.conditions.cond(c, w)
            z_t, x_tilde = guided_target(self.teacher, x=x, eps=eps, t=t, cond=cond,
                                         schedule=self.schedule)
        per_sample = regression_loss(self.student, self.config, self.schedule, self.weighting,
                                     z_t, t, cond, x_tilde)
        return {"loss": per_sample.mean()}


# ------------------------------------------------------------------------- registry entry


def _student(teacher: ModelConfig) -> ModelConfig:
    """The teacher's network with a w input."""
    config = copy.deepcopy(teacher)
    getattr(config, config.kind).w_embedding = True
    return config


def check_continuous_teacher(teacher: Checkpoint, key: str) -> None:
    """Guided targets evaluate the teacher at any t in (0, 1]: a progressive student was distilled
    for its own time grid only."""
    if teacher.sampling.distilled_sampler is not None:
        raise ConfigError(key, f"is a {teacher.extra['method']} student distilled for "
                               f"{teacher.sampling.distilled_sampler}; this method needs a teacher "
                               "trained at every t")


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_continuous_teacher(teacher, "teacher.checkpoint")
    if not student.w_conditioned:
        raise ConfigError("student", "a guided student must take w as an input (w_embedding: true)")


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> GuidedDistillation:
    return GuidedDistillation(teacher=teacher.w_denoiser, student=student,
                              student_config=student_config, schedule=teacher.denoiser.schedule,
                              guidance=job.guidance, weighting=job.loss_weighting,
                              steps=job.optim.steps, conditions=teacher.conditioning.conditions,
                              reads=PAIRS if job.pairs else DATA)


SPEC = MethodSpec(name="guided", pairs_mode="guided",
                  round_length=lambda job: ("optim.steps", job.optim.steps),
                  student=_student, check=_check, check_pairs=lambda job, identity: None,
                  record=lambda job, index: {"method": "guided", "w_min": job.guidance.w_min,
                                             "w_max": job.guidance.w_max},
                  build=_build)
