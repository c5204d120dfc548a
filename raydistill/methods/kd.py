"""Knowledge distillation into a one-step generator (Luhman & Luhman 2021).

Notation: z ~ N(0, I) the noise at t = 1; x_ode = Solve_{1 -> 0}(z; teacher, c, w), the teacher's
ODE solution under guidance w, precomputed by `raydistill pairs --mode ode`; the generator
G(z, c) = x_hat_G(z, t = 1, c), its network's x-prediction at the highest noise level (so it
starts as the teacher's one-step DDIM when initialised from the teacher).

    L_KD = E d(G(z, c), x_ode)

with the job's `distance` d (mse, pseudo_huber or a local LPIPS file): the generator's pair
regression of raydistill.methods.generator, which DMD's regression term is too.
"""

from __future__ import annotations

from torch import Tensor, nn

from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.base import PAIRS, Method, MethodSpec, Phase, Trainable
from raydistill.methods.generator import (
    Distance,
    RegressionConfig,
    check_generator_job,
    check_ode_pairs,
    generator_meta,
    make_distance,
    pair_regression,
)
from raydistill.models.checkpoint import Checkpoint


class KnowledgeDistillation(Method):
    student_module = "generator"

    def __init__(self, *, generator: nn.Module, config: ModelConfig, schedule: Schedule,
                 distance: Distance, w: float, steps: int):
        self.generator, self.config, self.schedule = Trainable(generator), config, schedule
        self.distance, self.w, self.steps = distance, w, steps

    def trainables(self) -> dict[str, Trainable]:
        return {"generator": self.generator}

    def phases(self) -> list[Phase]:
        return [Phase("generator", "generator", reads=(PAIRS,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        return {"loss": pair_regression(self.generator, self.config, self.schedule, batch[PAIRS],
                                        self.distance)}


# ------------------------------------------------------------------------- registry entry


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_generator_job(job, teacher, student)
    if not job.pairs:
        raise ConfigError("pairs", "kd trains on ODE pairs: make them with `raydistill pairs "
                                   "--mode ode` and give their directory")


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> KnowledgeDistillation:
    return KnowledgeDistillation(generator=student, config=student_config,
                                 schedule=teacher.denoiser.schedule,
                                 distance=make_distance(job.settings.distance, job.settings.lpips,
                                                        next(student.parameters()).device),
                                 w=job.guidance.w_min, steps=job.optim.steps)


SPEC = MethodSpec(name="kd", pairs_mode="ode",
                  round_length=lambda job: ("optim.steps", job.optim.steps),
                  student=lambda config: config, check=_check, check_pairs=check_ode_pairs,
                  record=lambda job, index: generator_meta("kd", job.guidance.w_min, steps=1),
                  build=_build, modules=("generator",), streams=lambda job: (PAIRS,),
                  section="kd", settings=RegressionConfig)
