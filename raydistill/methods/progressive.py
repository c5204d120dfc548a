"""Progressive distillation (Salimans & Ho, ICLR 2022, Alg. 2), also Meng et al.'s stage 2 on a
w-conditioned student, with their stochastic-sampler variant.

Notation: a round distils a 2N-step teacher x_hat_eta1 into an N-step student x_hat_eta2 (initialised
from the teacher). t = i/N with i ~ U{1..N}; z_t = alpha_t x + sigma_t xi; the teacher takes two DDIM
steps t -> t' = t - 1/(2N) -> t'' = t - 1/N, and x_tilde is the x_hat for which one student DDIM step
from z_t lands on z_t'':

    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L       = w(lambda_t) || x_tilde - x_hat_eta2(z_t, c, w) ||^2     (w(lambda) = max(SNR, 1))

Rounds run from halving.start_steps / 2 down to halving.end_steps student steps; the converged student
becomes the next round's (frozen) teacher. A student without a w input distils guidance at the one
fixed w = w_min = w_max.

Stochastic variant (Meng et al. Sec. 4): the N-step student is sampled by a deterministic 2/N step
followed by a 1/N re-noising, so for i > 1 it is trained to jump t -> t - 2/N, and for i = 1 to jump
1/N to 0. The targets come from the teacher's own jumps: 1/(2N) DDIM steps of an ordinary teacher, or
1/N jumps of a teacher that is itself a stochastic student.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from raydistill.config import GuidanceRange, HalvingConfig, ModelConfig
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.progressive import jump_target
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.base import Method, Phase, Round, draw_w, regression_loss
from raydistill.models.denoiser import ModelDenoiser


def round_steps(halving: HalvingConfig) -> list[int]:
    """Student step counts of the rounds: start/2, start/4, ..., end."""
    steps, n = [], halving.start_steps // 2
    while n >= halving.end_steps:
        steps.append(n)
        n //= 2
    return steps


class ProgressiveDistillation(Method):
    keep_round_students = True

    def __init__(self, *, teacher: Denoiser | None, student: nn.Module, student_config: ModelConfig,
                 schedule: Schedule, guidance: GuidanceRange, halving: HalvingConfig,
                 weighting: str = "truncated_snr", teacher_is_stochastic: bool = False):
        """`teacher_is_stochastic`: the original teacher is itself a stochastic-sampler student,
        whose own 1/N jumps make the targets of the first round."""
        self.original_teacher, self.teacher = teacher, teacher
        self.original_is_stochastic = teacher_is_stochastic
        self.student, self.config, self.schedule = student, student_config, schedule
        self.guidance, self.weighting, self.stochastic = guidance, weighting, halving.stochastic
        self.round_steps, self.steps_per_round = round_steps(halving), halving.steps_per_round
        self.round, self.teacher_is_stochastic = 0, teacher_is_stochastic
        self._frozen = copy.deepcopy(student).requires_grad_(False).eval()

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * len(self.round_steps)

    def rounds(self) -> list[Round]:
        return [Round(f"{n}-steps", self.steps_per_round) for n in self.round_steps]

    def start_round(self, index: int, weights: dict[str, dict[str, Tensor]]) -> None:
        """Round `index`: the teacher is the original one, or the previous round's student."""
        self.round = index
        if index == 0:
            self.teacher, self.teacher_is_stochastic = self.original_teacher, self.original_is_stochastic
            return
        self._frozen.load_state_dict(weights["student"])
        # the student's outputs are guided already: w is its input, or built in at w_min = w_max
        self.teacher = ModelDenoiser(self._frozen, self.schedule, self.config.prediction)
        self.teacher_is_stochastic = self.stochastic

    @property
    def student_steps(self) -> int:
        return self.round_steps[self.round]

    def loss(self, batch: dict[str, Tensor], phase: Phase) -> dict[str, Tensor]:
        if "target" in batch:
            if int(batch["N"][0]) != self.student_steps:
                raise ValueError(f"pair targets are for {int(batch['N'][0])}-step students, this "
                                 f"round trains {self.student_steps} steps")
            z_t, t, c, w, x_tilde = (batch[k] for k in ("z_t", "t", "c", "w", "target"))
        else:
            z_t, t, c, w, x_tilde = self.inline_targets(batch["x"], batch["c"])
        per_sample = regression_loss(self.student, self.config, self.schedule, self.weighting,
                                     z_t, t, {"c": c, "w": w}, x_tilde)
        return {"loss": per_sample.mean()}

    def inline_targets(self, x: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        n, device, steps, g = len(x), x.device, self.student_steps, self.generator
        i = torch.randint(1, steps + 1, (n,), generator=g, device=device)
        t = i.to(x.dtype) / steps
        w = draw_w(n, self.guidance.w_min, self.guidance.w_max, g, device).to(x.dtype)
        alpha, sigma = (broadcast_like(v, x) for v in self.schedule.alpha_sigma(t))
        z_t = alpha * x + sigma * torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
        if self.stochastic:
            jump = torch.where(i > 1, 2.0, 1.0).to(x.dtype) / steps
            teacher_step = 1.0 / steps if self.teacher_is_stochastic else 0.5 / steps
        else:
            jump, teacher_step = torch.full_like(t, 1.0 / steps), 0.5 / steps
        with torch.no_grad():
            if self.stochastic:        # per-sample jump lengths: one teacher call per jump length
                x_tilde = torch.empty_like(x)
                for length in jump.unique():
                    rows = jump == length
                    k = int(round(float(length) / teacher_step))
                    x_tilde[rows] = jump_target(
                        self.teacher, z_t[rows], t[rows], t[rows] - length,
                        {"c": c[rows], "w": w[rows]}, self.schedule, teacher_steps=k)
            else:
                x_tilde = jump_target(self.teacher, z_t, t, t - jump, {"c": c, "w": w},
                                      self.schedule, teacher_steps=2)
        return z_t, t, c, w, x_tilde

    def round_meta(self, index: int) -> dict:
        return {"method": "progressive", "steps": self.round_steps[index], "stochastic": self.stochastic,
                "w_min": self.guidance.w_min, "w_max": self.guidance.w_max}
