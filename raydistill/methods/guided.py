"""Guided distillation, stage 1 (Meng et al., CVPR 2023, Sec. 3.1).

Notation: x real data with class c; w the guidance strength; t ~ U[0, 1]; z_t = alpha_t x + sigma_t xi;
teacher x_hat_theta; student x_hat_eta(z_t, c, w), one network evaluation instead of two.

    x_tilde = (1 + w) x_hat_theta(z_t, c) - w x_hat_theta(z_t, null)      (the CFG teacher)
    L_eta   = w(lambda_t) || x_tilde - x_hat_eta(z_t, c, w) ||^2,  w ~ U[w_min, w_max]

The student is initialised from the teacher, its w embedding zero-initialised (so it starts as the
w = 0 conditional teacher). Precomputed stage-1 targets (pairs mode `guided`) carry z_t, t, w and
x_tilde, and skip the teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.config import GuidanceRange, ModelConfig
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.methods.base import Method, Phase, draw_w, regression_loss


class GuidedDistillation(Method):
    def __init__(self, *, teacher: Denoiser | None, student: nn.Module, student_config: ModelConfig,
                 schedule: Schedule, guidance: GuidanceRange, weighting: str, steps: int):
        self.teacher, self.student, self.config = teacher, student, student_config
        self.schedule, self.guidance, self.weighting, self.steps = schedule, guidance, weighting, steps

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, Tensor], phase: Phase) -> dict[str, Tensor]:
        if "target" in batch:
            z_t, t, c, w, x_tilde = (batch[k] for k in ("z_t", "t", "c", "w", "target"))
        else:
            x, c = batch["x"], batch["c"]
            n, device = len(x), x.device
            g = self.generator
            t = uniform_t(n, generator=g, device=device, dtype=x.dtype)
            w = draw_w(n, self.guidance.w_min, self.guidance.w_max, g, device).to(x.dtype)
            alpha, sigma = (broadcast_like(v, x) for v in self.schedule.alpha_sigma(t))
            z_t = alpha * x + sigma * torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
            with torch.no_grad():
                x_tilde = self.teacher(z_t, t, {"c": c, "w": w})
        per_sample = regression_loss(self.student, self.config, self.schedule, self.weighting,
                                     z_t, t, {"c": c, "w": w}, x_tilde)
        return {"loss": per_sample.mean()}

    def round_meta(self, index: int) -> dict:
        return {"method": "guided", "w_min": self.guidance.w_min, "w_max": self.guidance.w_max}
