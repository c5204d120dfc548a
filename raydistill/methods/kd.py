"""Knowledge distillation into a one-step generator (Luhman & Luhman 2021).

Notation: z ~ N(0, I) the noise at t = 1; x_ode = Solve_{1 -> 0}(z; teacher, c, w), the teacher's
ODE solution under guidance w, precomputed by `raydistill pairs --mode ode`; the generator
G(z, c) = x_hat_G(z, t = 1, c), its network's x-prediction at the highest noise level (so it
starts as the teacher's one-step DDIM when initialised from the teacher).

    L_KD = E d(G(z, c), x_ode),    d = mean squared error, or the pseudo-Huber distance
           sqrt(||G - x_ode||^2 + c_H^2) - c_H with c_H = 0.00054 sqrt(dim) (Song & Dhariwal 2023)

`one_step` and `pair_regression` are the one implementation of the generator's evaluation and of
this loss: DMD's regression term (raydistill.methods.dmd) calls them too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.base import PAIRS, Method, MethodSpec, Phase
from raydistill.methods.guided import check_continuous_teacher
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.denoiser import denoise


def one_step(generator: nn.Module, config: ModelConfig, schedule: Schedule, z: Tensor,
             c: Tensor) -> Tensor:
    """G(z, c): the generator's x_hat from pure noise z at t = 1."""
    t = torch.ones(len(z), device=z.device, dtype=z.dtype)
    return denoise(generator, schedule, config.prediction, z, t, {"c": c})


def distance(x: Tensor, y: Tensor, kind: str) -> Tensor:
    """Per-sample d(x, y): "mse" (mean over elements) or "pseudo_huber" (see the docstring)."""
    squared = (x - y).pow(2).flatten(1)
    if kind == "mse":
        return squared.mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(squared.shape[1])
        return (squared.sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown distance {kind!r} (expected mse or pseudo_huber)")


def pair_regression(generator: nn.Module, config: ModelConfig, schedule: Schedule,
                    pairs: dict[str, Tensor], kind: str) -> Tensor:
    """E d(G(noise, c), image) over a batch of ODE pairs."""
    x = one_step(generator, config, schedule, pairs["noise"], pairs["c"])
    return distance(x, pairs["image"], kind).mean()


class KnowledgeDistillation(Method):
    student_module = "generator"

    def __init__(self, *, generator: nn.Module, config: ModelConfig, schedule: Schedule,
                 distance: str, w: float, steps: int):
        self.generator, self.config, self.schedule = generator, config, schedule
        self.distance, self.w, self.steps = distance, w, steps

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def phases(self) -> list[Phase]:
        return [Phase("generator", "generator", reads=(PAIRS,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        return {"loss": pair_regression(self.generator, self.config, self.schedule, batch[PAIRS],
                                        self.distance)}

    def round_meta(self, index: int) -> dict:
        return generator_meta("kd", self.w, steps=1)


# ------------------------------------------------------------------------- registry entry


def generator_meta(method: str, w: float, steps: int) -> dict:
    """What a generator's checkpoint records: sampled by the re-noising sampler of
    raydistill.diffusion.multistep in `steps` steps (one step: its x_hat at t = 1), with guidance
    w built in."""
    return {"method": method, "steps": steps, "stochastic": True, "sampler": "renoise",
            "w_min": w, "w_max": w}


def check_generator_job(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    """A generator (kd, dmd) takes (z, c) and has its teacher's one guidance strength built in."""
    check_continuous_teacher(teacher, "teacher.checkpoint")
    if student.w_conditioned:
        raise ConfigError("student", "a generator takes no w input (its guidance "
                                     "strength is built in)")
    if job.guidance.w_min != job.guidance.w_max:
        raise ConfigError("guidance", "a generator distils one guidance strength: set "
                                      "w_min = w_max")


def check_ode_pairs(job: TrainJob, identity: dict) -> None:
    """ODE pairs from the deterministic solver: a stochastic sampler's image is not a function of
    the noise."""
    if identity.get("stochastic"):
        raise ConfigError("pairs", f"{job.pairs} was sampled with the stochastic sampler; "
                                   "regression needs ODE pairs (pairs --mode ode, stochastic false)")


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_generator_job(job, teacher, student)
    if not job.pairs:
        raise ConfigError("pairs", "kd trains on ODE pairs: make them with `raydistill pairs "
                                   "--mode ode` and give their directory")


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> KnowledgeDistillation:
    return KnowledgeDistillation(generator=student, config=student_config,
                                 schedule=teacher.denoiser.schedule, distance=job.distance,
                                 w=job.guidance.w_min, steps=job.optim.steps)


SPEC = MethodSpec(name="kd", pairs_mode="ode",
                  round_length=lambda job: ("optim.steps", job.optim.steps),
                  student=lambda config: config, check=_check, check_pairs=check_ode_pairs,
                  build=_build, modules=("generator",), streams=lambda job: (PAIRS,))
