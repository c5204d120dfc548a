"""A method that raises a chosen error at a chosen step in every worker, as an out-of-memory
GPU or host would (tests/test_train_ray.py: such errors stop the run with one line instead of
being retried). Registered by the test that uses it, from this one module."""

from __future__ import annotations

from dataclasses import dataclass

import ray.exceptions
import torch
from torch import Tensor, nn

from raydistill.config import ModelConfig, TrainJob, require
from raydistill.methods.base import DATA, Method, MethodSpec, Phase, Trainable
from raydistill.models.checkpoint import Checkpoint

ERRORS = {
    "cuda_oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "host_oom": lambda: ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory."),
}


@dataclass
class FailingConfig:
    """Its section, `failing:`."""

    error: str = "cuda_oom"
    at_step: int = 3

    def validate(self) -> None:
        require(self.error in ERRORS, "error", f"must be one of {sorted(ERRORS)}")


class Failing(Method):
    """The student's squared output on real data, until step `at_step`."""

    def __init__(self, student: nn.Module, settings: FailingConfig, steps: int):
        self.student, self.settings, self.steps, self.calls = Trainable(student), settings, steps, 0

    def trainables(self) -> dict[str, Trainable]:
        return {"student": self.student}

    def phases(self) -> list[Phase]:
        return [Phase("student", "student", reads=(DATA,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.settings.at_step:
            raise ERRORS[self.settings.error]()
        x = batch[DATA]["x"]
        t = torch.full((len(x),), 0.5, device=x.device)
        cond = {"c": batch[DATA]["c"], "w": torch.zeros(len(x), device=x.device)}
        return {"loss": self.student(x, t, cond).pow(2).mean()}


def _build(job: TrainJob, teacher: Checkpoint, config: ModelConfig, student: nn.Module) -> Failing:
    return Failing(student, job.settings, job.optim.steps)


SPEC = MethodSpec(
    name="toy-failing", pairs_mode="", student=lambda config: config,
    check=lambda job, teacher, student: None, check_pairs=lambda job, identity: None,
    build=_build, section="failing", settings=FailingConfig,
    round_length=lambda job: ("optim.steps", job.optim.steps),
    record=lambda job, index: {"method": "toy-failing"})
