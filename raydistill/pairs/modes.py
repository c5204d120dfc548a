"""The pair modes (`raydistill pairs --mode`): what a pair set of each holds, how the teacher
makes its samples, what identifies it and what a teacher must allow. The one place that knows the
modes: the shard maker, the pool, the manifest and the pipeline's plan ask the table.

  ode          (noise, image): the teacher's ODE solution from noise under guidance w (or its
               stochastic sampler's, with re-noise draws xi), for KD and DMD's regression
  guided       (z_t, target, t): the guided teacher's prediction x_hat_w(z_t, c) at a real x
               noised to t (raydistill.methods.guided.guided_target), for Meng et al.'s stage 1
  progressive  (z_t, target, t, N): the x_hat one student DDIM step must predict to land where
               the teacher's own steps do (raydistill.methods.progressive.halving_target)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from raydistill.config import PairsJob, is_power_of_two, require
from raydistill.diffusion.guidance import Cond, Denoiser
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.diffusion.solvers import sample
from raydistill.methods.guided import check_continuous_teacher, guided_target
from raydistill.methods.progressive import check_halving_teacher, halving_target
from raydistill.models.checkpoint import Checkpoint


@dataclass(frozen=True)
class Teacher:
    """What a shard maker evaluates: the teacher as a denoiser of (z_t, t, cond), its schedule,
    whether it is a stochastic-sampler student, and the stochastic sampler it is sampled with."""

    denoiser: Denoiser
    schedule: Schedule
    is_stochastic: bool
    stochastic_sample: Callable[..., Tensor]


class PairMode(ABC):
    """One mode's entry. `draw` gives a sample's random inputs from its generator (`x`: a real
    image drawn with the same generator, for modes `from_data`); `compute` a batch's columns."""

    name: str
    arrays: tuple[str, ...]          # its arrays per sample (raydistill.pairs.format)
    fields: tuple[str, ...]          # its JSON scalars per sample
    from_data: bool                  # its targets start from real images (noised), not noise

    def validate(self, job: PairsJob) -> None:  # noqa: B027
        """Refuse settings the mode does not take, naming the key (at load: PairsJob.validate);
        a mode with no rules of its own takes every setting."""

    @abstractmethod
    def identity(self, job: PairsJob) -> dict:
        """The job's settings that make two runs' shards interchangeable, beyond the common ones."""

    @abstractmethod
    def teacher_work(self, job: PairsJob, teacher_is_stochastic: bool) -> tuple[str, int]:
        """(solver, teacher steps) behind each target, for the manifest."""

    @abstractmethod
    def check_teacher(self, job: PairsJob, teacher: Checkpoint) -> None:
        """Refuse a teacher (a distilled student) that may not be sampled as this mode samples."""

    @abstractmethod
    def draw(self, job: PairsJob, g: torch.Generator, shape: tuple[int, ...],
             x: Callable[[], Tensor]) -> dict[str, Tensor]:
        """A sample's random inputs, drawn in order from `g`."""

    @abstractmethod
    def compute(self, job: PairsJob, teacher: Teacher, batch: dict[str, Tensor],
                cond: Cond) -> dict[str, Tensor]:
        """A batch's columns, from its inputs and their condition."""

    @abstractmethod
    def describe(self, job: PairsJob) -> str:
        """What its samples are, in a few words (the pipeline's plan)."""


class OdePairs(PairMode):
    name, arrays, fields, from_data = "ode", ("noise", "image"), ("c", "w", "seed"), False

    def identity(self, job: PairsJob) -> dict:
        return {"solver": asdict(job.solver), "stochastic": job.stochastic}

    def teacher_work(self, job: PairsJob, teacher_is_stochastic: bool) -> tuple[str, int]:
        return "stochastic" if job.stochastic else job.solver.solver, job.solver.steps

    def check_teacher(self, job: PairsJob, teacher: Checkpoint) -> None:
        solver = job.solver
        teacher.sampling.check_sampler(
            steps=solver.steps, solver=solver.solver, spacing=solver.spacing,
            stochastic=job.stochastic, force=job.force_sampler, force_key="force_sampler=true",
            keys={"steps": "solver.steps", "solver": "solver.solver", "spacing": "solver.spacing",
                  "stochastic": "stochastic"})

    def draw(self, job: PairsJob, g: torch.Generator, shape: tuple[int, ...],
             x: Callable[[], Tensor]) -> dict[str, Tensor]:
        row = {"noise": torch.randn(shape, generator=g)}
        if job.stochastic:
            row["xi"] = torch.randn(job.solver.steps - 1, *shape, generator=g)
        return row

    def compute(self, job: PairsJob, teacher: Teacher, batch: dict[str, Tensor],
                cond: Cond) -> dict[str, Tensor]:
        if job.stochastic:
            image = teacher.stochastic_sample(teacher.denoiser, batch["noise"], cond,
                                              teacher.schedule, steps=job.solver.steps,
                                              xi=batch["xi"])
        else:
            image = sample(teacher.denoiser, batch["noise"], cond, teacher.schedule,
                           steps=job.solver.steps, solver=job.solver.solver,
                           spacing=job.solver.spacing)
        return {"noise": batch["noise"], "image": image}

    def describe(self, job: PairsJob) -> str:
        return f"{job.solver.solver} {job.solver.steps} steps"


class GuidedTargets(PairMode):
    name, arrays, fields, from_data = "guided", ("z_t", "target"), ("c", "w", "t", "seed"), True

    def validate(self, job: PairsJob) -> None:
        require(not job.stochastic, "stochastic",
                "applies to ode pairs and progressive targets, not to mode guided")

    def identity(self, job: PairsJob) -> dict:
        return {"data": asdict(job.data)}

    def teacher_work(self, job: PairsJob, teacher_is_stochastic: bool) -> tuple[str, int]:
        return "x_hat", 1                           # one guided teacher prediction

    def check_teacher(self, job: PairsJob, teacher: Checkpoint) -> None:
        check_continuous_teacher(teacher, "teacher.checkpoint")    # evaluated at every t

    def draw(self, job: PairsJob, g: torch.Generator, shape: tuple[int, ...],
             x: Callable[[], Tensor]) -> dict[str, Tensor]:
        return {"x": x(), "eps": torch.randn(shape, generator=g), "t": uniform_t(1, generator=g)[0]}

    def compute(self, job: PairsJob, teacher: Teacher, batch: dict[str, Tensor],
                cond: Cond) -> dict[str, Tensor]:
        z_t, target = guided_target(teacher.denoiser, x=batch["x"], eps=batch["eps"],
                                    t=batch["t"], cond=cond, schedule=teacher.schedule)
        return {"z_t": z_t, "target": target, "t": batch["t"]}

    def describe(self, job: PairsJob) -> str:
        return "targets"


class ProgressiveTargets(PairMode):
    name, arrays, fields, from_data = ("progressive", ("z_t", "target"),
                                       ("c", "w", "t", "N", "seed"), True)

    def validate(self, job: PairsJob) -> None:
        require(job.student_steps > 0, "student_steps",
                f"must be positive in progressive mode, got {job.student_steps}")
        require(is_power_of_two(job.student_steps), "student_steps",
                f"must be a power of two for halving, got {job.student_steps}")

    def identity(self, job: PairsJob) -> dict:
        return {"data": asdict(job.data), "student_steps": job.student_steps,
                "stochastic": job.stochastic}

    def teacher_work(self, job: PairsJob, teacher_is_stochastic: bool) -> tuple[str, int]:
        """The teacher's DDIM steps per 1/N of the student's time (a stochastic student's 2/N
        jumps take twice as many)."""
        return "ddim", 1 if teacher_is_stochastic else 2

    def check_teacher(self, job: PairsJob, teacher: Checkpoint) -> None:
        check_halving_teacher(teacher, teacher_steps=2 * job.student_steps,
                              stochastic=job.stochastic, keys=("student_steps", "stochastic"),
                              value=job.student_steps)

    def draw(self, job: PairsJob, g: torch.Generator, shape: tuple[int, ...],
             x: Callable[[], Tensor]) -> dict[str, Tensor]:
        return {"x": x(), "eps": torch.randn(shape, generator=g),
                "i": torch.randint(1, job.student_steps + 1, (), generator=g)}

    def compute(self, job: PairsJob, teacher: Teacher, batch: dict[str, Tensor],
                cond: Cond) -> dict[str, Tensor]:
        z_t, t, target = halving_target(
            teacher.denoiser, x=batch["x"], eps=batch["eps"], i=batch["i"], cond=cond,
            schedule=teacher.schedule, student_steps=job.student_steps,
            stochastic=job.stochastic, teacher_is_stochastic=teacher.is_stochastic)
        return {"z_t": z_t, "target": target, "t": t,
                "N": torch.full((len(t),), job.student_steps)}

    def describe(self, job: PairsJob) -> str:
        return f"targets for {job.student_steps}-step students"


MODES: dict[str, PairMode] = {mode.name: mode
                              for mode in (OdePairs(), GuidedTargets(), ProgressiveTargets())}
