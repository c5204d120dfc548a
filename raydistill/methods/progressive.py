"""Progressive distillation (Salimans & Ho, ICLR 2022, Alg. 2), also Meng et al.'s Sec. 3.2 on a
w-conditioned (guided) student, with their stochastic-sampler variant.

Notation: a round distils a 2N-step teacher x_hat_eta1 into an N-step student x_hat_eta2 (initialised
from the teacher). t = i/N with i ~ U{1..N}; z_t = alpha_t x + sigma_t xi; the teacher takes two DDIM
steps t -> t' = t - 1/(2N) -> t'' = t - 1/N, and x_tilde is the x_hat for which one student DDIM step
from z_t lands on z_t'':

    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L       = weight(lambda_t) || x_tilde - x_hat_eta2(z_t, c, w) ||^2   (weight = max(SNR, 1))

Rounds run from halving.start_steps / 2 down to halving.end_steps student steps; the converged student
becomes the next round's (frozen) teacher. A student without a w input distils guidance at the one
fixed w = w_min = w_max.

Stochastic variant (Meng et al. Sec. 4): the N-step student is sampled by a deterministic 2/N step
followed by a 1/N re-noising, so for i > 1 it is trained to jump t -> t - 2/N, and for i = 1 to jump
1/N to 0. The targets come from the teacher's own jumps: 1/(2N) DDIM steps of an ordinary teacher, or
1/N jumps of a teacher that is itself a stochastic student.

`halving_target` is the one implementation of the target: the training loop (teacher inline) and
the pair workers (`raydistill pairs --mode progressive`) both call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raydistill.conditions import Conditions, batch_cond
from raydistill.config import (
    ConfigError,
    GuidanceRange,
    ModelConfig,
    TrainJob,
    is_power_of_two,
    require,
)
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.progressive import jump_target
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.base import (
    DATA,
    PAIRS,
    Method,
    MethodSpec,
    Phase,
    Round,
    Trainable,
    draw_w,
    regression_loss,
    require_distillable,
)
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.denoiser import ModelDenoiser


@dataclass
class HalvingConfig:
    """Progressive distillation: rounds N -> N/2 from a start_steps teacher down to an end_steps
    student (the first round's student has start_steps / 2 steps)."""

    start_steps: int = 64
    end_steps: int = 1
    steps_per_round: int = 500       # optimizer steps of each round
    stochastic: bool = False         # train for Meng et al.'s stochastic sampler (2/N jumps)

    def validate(self) -> None:
        for key in ("start_steps", "end_steps"):
            value = getattr(self, key)
            require(value > 0, key, f"must be positive, got {value}")
            require(is_power_of_two(value), key, f"must be a power of two for halving, got {value}")
        require(self.end_steps < self.start_steps, "end_steps",
                f"must be below start_steps ({self.end_steps} >= {self.start_steps}): no round")
        require(self.steps_per_round > 0, "steps_per_round", "must be positive")


def round_steps(halving: HalvingConfig) -> list[int]:
    """Student step counts of the rounds: start/2, start/4, ..., end."""
    steps, n = [], halving.start_steps // 2
    while n >= halving.end_steps:
        steps.append(n)
        n //= 2
    return steps


@torch.no_grad()
def halving_target(
    teacher: Denoiser, *, x: Tensor, eps: Tensor, i: Tensor, cond: dict[str, Tensor],
    schedule: Schedule, student_steps: int, stochastic: bool, teacher_is_stochastic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(z_t, t, x_tilde) for an N-step student at t = i/N [B] and z_t = alpha_t x + sigma_t eps.

    x_tilde is the x_hat for which one student DDIM step from z_t lands where the frozen teacher's
    own DDIM steps land after the student's jump: 1/N, or for Meng et al.'s stochastic sampler 2/N
    (1/N from t = 1/N). The teacher steps 1/(2N), or 1/N if it is itself a stochastic student (it
    was distilled to jump 2/(2N)). A stochastic batch makes one teacher call per jump length.
    """
    n = student_steps
    t = i.to(x.dtype) / n
    alpha, sigma = (broadcast_like(v, x) for v in schedule.alpha_sigma(t))
    z_t = alpha * x + sigma * eps
    teacher_step = (1.0 if teacher_is_stochastic else 0.5) / n

    def target(rows: Tensor | slice, jump: float) -> Tensor:
        part = {key: value[rows] for key, value in cond.items()}
        return jump_target(teacher, z_t[rows], t[rows], t[rows] - jump, part, schedule,
                           teacher_steps=round(jump / teacher_step))

    if not stochastic:
        return z_t, t, target(slice(None), 1.0 / n)
    x_tilde = torch.empty_like(x)
    for rows, jump in ((i > 1, 2.0 / n), (i == 1, 1.0 / n)):
        if rows.any():
            x_tilde[rows] = target(rows, jump)
    return z_t, t, x_tilde


class ProgressiveDistillation(Method):
    keep_round_students = True

    def __init__(self, *, teacher: Denoiser | None, student: nn.Module, student_config: ModelConfig,
                 schedule: Schedule, guidance: GuidanceRange, halving: HalvingConfig,
                 conditions: Conditions, weighting: str = "truncated_snr",
                 teacher_is_stochastic: bool = False, reads: str = DATA):
        """`teacher_is_stochastic`: the original teacher is itself a stochastic-sampler student,
        whose own 1/N jumps make the targets of the first round. `reads`: DATA (targets inline)
        or PAIRS (precomputed targets); `conditions`: what a data batch's c means."""
        require_distillable(student_config)
        self.conditions = conditions
        self.original_teacher, self.teacher = teacher, teacher
        self.original_is_stochastic = teacher_is_stochastic
        self.student, self.config, self.schedule = Trainable(student), student_config, schedule
        self.guidance, self.weighting, self.stochastic = guidance, weighting, halving.stochastic
        self.round_steps, self.steps_per_round = round_steps(halving), halving.steps_per_round
        self.round, self.teacher_is_stochastic = 0, teacher_is_stochastic
        self._frozen = copy.deepcopy(student).requires_grad_(False).eval()
        self.count_evaluations(self._frozen, "round_teacher")   # the teacher from round 2 on
        self.reads = reads

    def trainables(self) -> dict[str, Trainable]:
        return {"student": self.student}

    def phases(self) -> list[Phase]:
        return [Phase("student", "student", reads=(self.reads,))]

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

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        if PAIRS in batch:
            batch = batch[PAIRS]
            if int(batch["N"][0]) != self.student_steps:
                raise ValueError(f"pair targets are for {int(batch['N'][0])}-step students, this "
                                 f"round trains {self.student_steps} steps")
            z_t, t, x_tilde = (batch[k] for k in ("z_t", "t", "target"))
            cond = batch_cond(batch)
        else:
            z_t, t, cond, x_tilde = self.inline_targets(batch[DATA]["x"], batch[DATA]["c"])
        per_sample = regression_loss(self.student, self.config, self.schedule, self.weighting,
                                     z_t, t, cond, x_tilde)
        return {"loss": per_sample.mean()}

    def inline_targets(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, dict, Tensor]:
        """(z_t, t, cond, x_tilde): draws i, w and the noise from the method's generator, then
        `halving_target`."""
        n, device, g = len(x), x.device, self.rng
        i = torch.randint(1, self.student_steps + 1, (n,), generator=g, device=device)
        w = draw_w(n, self.guidance.w_min, self.guidance.w_max, g, device).to(x.dtype)
        eps = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
        cond = self.conditions.cond(c, w)
        z_t, t, x_tilde = halving_target(
            self.teacher, x=x, eps=eps, i=i, cond=cond, schedule=self.schedule,
            student_steps=self.student_steps, stochastic=self.stochastic,
            teacher_is_stochastic=self.teacher_is_stochastic)
        return z_t, t, cond, x_tilde


# ------------------------------------------------------------------------- registry entry


def check_halving_teacher(teacher: Checkpoint, *, teacher_steps: int, stochastic: bool,
                          keys: tuple[str, str], value: int) -> None:
    """A teacher that is itself a progressive student must have the `teacher_steps` the job
    halves (its targets are for students of half its steps), and stochastic rounds if it is a
    stochastic student: `halving_target` steps it as it was distilled. `keys` name the step count
    (whose value is `value`) and the stochastic switch in the caller's config."""
    distilled = teacher.sampling.distilled_sampler
    if distilled is None:
        return
    if distilled.renoise:
        raise ConfigError(keys[0], f"cannot be halved from a teacher distilled for {distilled} "
                                   "(a generator, not a progressive student)")
    if distilled.steps != teacher_steps:
        raise ConfigError(keys[0], f"is {value}, but the teacher is a {distilled.steps}-step "
                                   f"progressive student (its targets are for "
                                   f"{distilled.steps // 2}-step students)")
    if distilled.stochastic and not stochastic:
        raise ConfigError(keys[1], "is false, but the teacher is a student of the stochastic "
                                   "sampler (its jumps are 1/N, not 1/(2N))")


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_halving_teacher(teacher, teacher_steps=job.settings.start_steps,
                          stochastic=job.settings.stochastic,
                          keys=("halving.start_steps", "halving.stochastic"),
                          value=job.settings.start_steps)
    if not student.w_conditioned and job.guidance.w_min != job.guidance.w_max:
        raise ConfigError("guidance", "a student without a w input distils one guidance strength: "
                                      "set w_min = w_max")


def _check_pairs(job: TrainJob, identity: dict) -> None:
    made_for, stochastic = identity["student_steps"], identity["stochastic"]
    if round_steps(job.settings) != [made_for]:
        raise ConfigError("pairs", f"{job.pairs} holds targets for {made_for}-step students: "
                                   f"train that one round (halving.start_steps={2 * made_for} "
                                   f"halving.end_steps={made_for})")
    if stochastic != job.settings.stochastic:
        kind = "stochastic-sampler (2/N jumps)" if stochastic else "deterministic (1/N jumps)"
        raise ConfigError("halving.stochastic", f"is {str(job.settings.stochastic).lower()}, but "
                                                f"{job.pairs} holds {kind} targets")


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> ProgressiveDistillation:
    return ProgressiveDistillation(
        teacher=teacher.w_denoiser, student=student, student_config=student_config,
        schedule=teacher.denoiser.schedule, guidance=job.guidance, halving=job.settings,
        conditions=teacher.conditioning.conditions, weighting=job.loss_weighting,
        teacher_is_stochastic=teacher.sampling.is_stochastic_student,
        reads=PAIRS if job.pairs else DATA)


SPEC = MethodSpec(
    name="progressive", pairs_mode="progressive",
    round_length=lambda job: ("halving.steps_per_round", job.settings.steps_per_round),
    student=lambda config: config, check=_check, check_pairs=_check_pairs, build=_build,
    section="halving", settings=HalvingConfig,
    shortest={"start_steps": 2, "end_steps": 1, "steps_per_round": 1},
    total_steps=lambda job: job.settings.steps_per_round * len(round_steps(job.settings)),
    record=lambda job, index: {"method": "progressive", "steps": round_steps(job.settings)[index],
                               "stochastic": job.settings.stochastic,
                               "w_min": job.guidance.w_min, "w_max": job.guidance.w_max},
    pairs_keys=lambda job: {"student_steps": job.settings.start_steps // 2,
                            "stochastic": job.settings.stochastic})
