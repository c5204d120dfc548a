"""A distillation method from outside raydistill, in one module with one registry call: the
student (the teacher's network, no w input) learns the teacher's classifier-free-guided x_hat at a
fixed w (its section's `baking.w`) on noised real data, so its guidance is built in (guided
distillation without the w input). tests/test_toy_method.py trains, resumes and samples it through
`raydistill train`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.conditions import Conditions
from raydistill.config import ModelConfig, TrainJob, require
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.methods.base import DATA, Method, MethodSpec, Phase, Trainable
from raydistill.methods.registry import register
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.denoiser import denoise


@dataclass
class BakingConfig:
    """Its section, `baking:`."""

    w: float = 1.0                   # the guidance strength the student builds in

    def validate(self) -> None:
        require(self.w >= 0, "w", f"must be non-negative, got {self.w}")


class GuidanceBaking(Method):
    def __init__(self, *, teacher: Denoiser, student: nn.Module, config: ModelConfig,
                 schedule: Schedule, conditions: Conditions, w: float, steps: int):
        self.teacher, self.config, self.schedule = teacher, config, schedule
        self.student = Trainable(student)
        self.conditions, self.w, self.steps = conditions, w, steps

    def trainables(self) -> dict[str, Trainable]:
        return {"student": self.student}

    def phases(self) -> list[Phase]:
        return [Phase("student", "student", reads=(DATA,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        x, c = batch[DATA]["x"], batch[DATA]["c"]
        t = uniform_t(len(x), generator=self.rng, device=x.device)
        eps = torch.randn(x.shape, generator=self.rng, device=x.device)
        alpha, sigma = (broadcast_like(v, x) for v in self.schedule.alpha_sigma(t))
        z_t = alpha * x + sigma * eps
        cond = self.conditions.cond(c, torch.full(c.shape, self.w, device=x.device))
        with torch.no_grad():
            target = self.teacher(z_t, t, cond)
        out = denoise(self.student, self.schedule, self.config.prediction, z_t, t, cond)
        return {"loss": F.mse_loss(out, target)}


def _build(job: TrainJob, teacher: Checkpoint, config: ModelConfig,
           student: nn.Module) -> GuidanceBaking:
    return GuidanceBaking(teacher=teacher.w_denoiser, student=student, config=config,
                          schedule=teacher.denoiser.schedule, conditions=teacher.conditioning.conditions,
                          w=job.settings.w, steps=job.optim.steps)


SPEC = register(MethodSpec(
    name="toy-baking", pairs_mode="", student=lambda config: config,
    check=lambda job, teacher, student: None, check_pairs=lambda job, identity: None,
    build=_build, section="baking", settings=BakingConfig,
    round_length=lambda job: ("optim.steps", job.optim.steps),
    record=lambda job, index: {"method": "toy-baking", "w_min": job.settings.w,
                               "w_max": job.settings.w}))
