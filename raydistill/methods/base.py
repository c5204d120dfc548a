"""What the training loop asks of a distillation method (pure torch; no Ray, no DeepSpeed).

A method owns its trainable modules (the loop wraps each in its own DeepSpeed engine), names the
phases of one training step (each phase updates one module, `updates` times; guided and
progressive have a single "student" phase, DMD a fake-score phase and a generator phase), lists its
rounds (progressive: one per halving; one round for the others) and computes `loss(batch, phase)`.
The loop never knows which method it runs.

A phase names the data streams it reads; `batch` maps each to one micro-batch of it:
- DATA: real data `{"x", "c"}` (or exact draws of an analytic mixture), from which the method draws
  t, noise and w and evaluates the teacher inline;
- PAIRS: the pair shards of the method's mode: precomputed targets `{"z_t", "target", "c", "w",
  "t"}`, or ODE pairs `{"noise", "image", "c", "w"}`, plus a text model's "encoder_hidden_states".
A data batch's c means what the teacher's `conditions` say (raydistill.conditions: a class, or a
text model's prompt); a pair batch carries its whole condition (`batch_cond`).
A phase that reads nothing draws its own inputs (`micro_batch` of them) and consumes no data.
While a phase runs, only its module's parameters take gradients (the loop sees to it), so a loss
may pass through another module (DMD2's GAN loss through the fake score) without updating it.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.diffusion.parameterization import (
    broadcast_like,
    output_weight,
    prediction_from_x,
)
from raydistill.diffusion.schedule import Schedule
from raydistill.models.denoiser import EvaluationCounter

if TYPE_CHECKING:
    from raydistill.models.checkpoint import Checkpoint


DATA, PAIRS = "data", "pairs"         # the data streams (see the module docstring)


@dataclass(frozen=True)
class Phase:
    name: str
    module: str                      # the trainable module this phase updates
    reads: tuple[str, ...] = ()      # the streams each micro-batch reads one batch of
    updates: int = 1                 # optimizer updates of `module` per training step


@dataclass(frozen=True)
class Round:
    name: str
    steps: int                       # optimizer steps of this round


class Trainable:
    """A method's handle on one of its trainable networks. Calling it evaluates the network as the
    loop routes it: through the network's DeepSpeed `engine` while it `trains` (in the phase that
    updates it, so DeepSpeed runs that backward), else as the plain `network` (in other phases,
    and before the loop has built the engine)."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.engine: nn.Module | None = None
        self.trains = False

    def attach(self, engine: nn.Module) -> None:
        """Call the network through `engine` from now on (until a phase that does not train it)."""
        self.engine, self.trains = engine, True

    def __call__(self, *args, **kwargs):
        if self.trains and self.engine is not None:
            return self.engine(*args, **kwargs)
        return self.network(*args, **kwargs)


class Method(ABC):
    """A distillation method; see the module docstring."""

    #: the module saved as the consolidated student
    student_module: str = "student"
    #: whether the student after each round is kept (progressive: one student per halving)
    keep_round_students: bool = False
    #: where the method draws t, noise and w (None: torch's global generator); see `seed`
    rng: torch.Generator | None = None
    #: counts what its frozen teachers evaluate (see `count_evaluations`)
    _teacher_counter: EvaluationCounter | None = None
    _frozen_modules: dict[str, nn.Module] | None = None
    #: samples per micro-batch on this rank (the loop sets it): what a phase that reads no data
    #: draws
    micro_batch: int = 0
    #: trainable modules the method evaluates in full precision somewhere even when they train in
    #: bf16 (DMD2's fake score in the DM gradient); the loop puts an fp32 evaluation of each in
    #: `precise` (see `precisely`)
    precise_modules: tuple[str, ...] = ()
    precise: dict[str, Callable[..., Tensor]] | None = None
    #: per trainable module, learning rates of its submodules as multiples of the module's own
    #: (raydistill.train.engine.param_groups)
    lr_scales: dict[str, dict[str, float]] = {}

    def precisely(self, name: str) -> Callable[..., Tensor]:
        """Trainable module `name` evaluated in fp32: the loop's evaluation of its bf16 weights
        at full precision, or the module itself where it trains in fp32."""
        return (self.precise or {}).get(name) or self.trainables()[name]

    def count_evaluations(self, teacher: nn.Module, name: str = "teacher") -> None:
        """Count every sample a frozen teacher (its Denoiser or network module) evaluates, and
        list it among the `frozen_modules` as `name`."""
        if self._teacher_counter is None:
            self._teacher_counter, self._frozen_modules = EvaluationCounter(), {}
        self._teacher_counter.watch(teacher)
        self._frozen_modules[name] = teacher

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The networks it evaluates but does not train (its teachers), by name."""
        return dict(self._frozen_modules or {})

    def take_teacher_evaluations(self) -> int:
        """The teacher evaluations counted since the last call, and restart the count."""
        return self._teacher_counter.take() if self._teacher_counter is not None else 0

    def seed(self, seed: int, device: torch.device) -> None:
        """Draw the method's randomness from its own generator on `device`, seeded with `seed`
        (the loop reseeds it every step)."""
        if self.rng is None or self.rng.device != torch.device(device):
            self.rng = torch.Generator(device=device)
        self.rng.manual_seed(seed)

    @abstractmethod
    def trainables(self) -> dict[str, Trainable]:
        """Its handles on its trainable networks, by name (each network gets its own optimizer and
        DeepSpeed engine)."""

    def modules(self) -> dict[str, nn.Module]:
        """Its trainable networks, by name."""
        return {name: handle.network for name, handle in self.trainables().items()}

    @abstractmethod
    def phases(self) -> list[Phase]:
        """The phases of one training step, in order."""

    def rounds(self) -> list[Round]:
        return [Round("train", self.total_steps)]

    def start_round(self, index: int, weights: dict[str, dict[str, Tensor]]) -> None:  # noqa: B027
        """Called before round `index` > 0 with the full (gathered) weights every module ended the
        previous round with (before round 0 with none); methods with a single round need nothing
        here."""

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Optimizer steps over all rounds."""

    @abstractmethod
    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        """Scalars by name; "loss" is the one the phase's module minimises, the others are
        detached metrics."""


@dataclass(frozen=True)
class MethodSpec:
    """A method's registry entry (raydistill.methods.registry): what the training driver needs to
    know about it besides the Method itself. Every callable raises ConfigError naming the key."""

    name: str
    pairs_mode: str              # the pair sets (`raydistill pairs --mode`) it can train from
    #: the config key and the optimizer steps of one round (warm-up must end inside it)
    round_length: Callable[[TrainJob], tuple[str, int]]
    #: the default student, from the teacher's network config
    student: Callable[[ModelConfig], ModelConfig]
    #: method-specific checks of the job, its teacher and its student config, before any work
    check: Callable[[TrainJob, Checkpoint, ModelConfig], None]
    #: method-specific checks of a pair set's identity (mode, teacher and w range already match)
    check_pairs: Callable[[TrainJob, dict], None]
    #: what the checkpoint of the student after round i (-1: the last) records: the method and
    #: what it is sampled with (e.g. its steps), which later stages read
    record: Callable[[TrainJob, int], dict]
    #: the Method, given the job, its teacher, the student's config and network
    build: Callable[[TrainJob, Checkpoint, ModelConfig, nn.Module], Method]
    #: the PairsJob keys a pair set for this job needs besides mode, teacher, data and guidance
    pairs_keys: Callable[[TrainJob], dict] = lambda job: {}
    #: the optimizer steps of the whole run (all rounds)
    total_steps: Callable[[TrainJob], int] = lambda job: job.optim.steps
    #: its section of a train config (e.g. progressive's `halving:`), if it has settings of its
    #: own, and their dataclass (TrainJob.settings; checked by its `validate`)
    section: str = ""
    settings: type | None = None
    #: its trainable modules' names (what `optim.modules` may name)
    modules: tuple[str, ...] = ("student",)
    #: the optimizer updates a module makes per training step, where not 1 (DMD2's fake score:
    #: dmd.fake_updates): what its warm-up and learning-rate schedule count
    updates: Callable[[TrainJob], dict[str, int]] = lambda job: {}
    #: the data streams its phases read for this job (DATA, PAIRS): what the driver checks
    streams: Callable[[TrainJob], tuple[str, ...]] = lambda job: (PAIRS if job.pairs else DATA,)
    #: settings of its section that make its shortest run, one round of one step (what
    #: `raydistill train --dry-run` trains), beside optim.steps = 1
    shortest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.section) != (self.settings is not None):
            raise ValueError(f"method {self.name}: a section needs its settings' dataclass, and "
                             "settings need a section")
        if self.section in {f.name for f in dataclasses.fields(TrainJob)}:
            raise ValueError(f"method {self.name}: section {self.section!r} is a key of every "
                             "train config")

    def updates_per_step(self, job: TrainJob) -> dict[str, int]:
        """Each trainable module's optimizer updates per training step."""
        return {name: 1 for name in self.modules} | self.updates(job)


#: The lowest log-SNR at t = 1 at which an eps-prediction student is distilled: sigma / alpha
#: <= 100 there, so x_hat = (z_t - sigma eps_hat) / alpha amplifies the output's error at most
#: 100-fold. Stable Diffusion's scaled_linear betas end at log-SNR -5.4 (sigma / alpha = 14.6; its
#: one-step generators convert eps to x there, as DMD2's do); a cosine schedule's -20 (or a
#: beta-capped one's) is where Salimans & Ho (Sec. 4) find eps unusable.
EPS_LOGSNR_FLOOR = -2 * math.log(100.0)


def eps_distillable(config: ModelConfig) -> bool:
    """Whether an eps-prediction network on `config`'s schedule can be a student."""
    from raydistill.models.denoiser import make_schedule

    return float(make_schedule(config.schedule).logsnr(torch.ones(1))) >= EPS_LOGSNR_FLOOR


def require_distillable(config: ModelConfig, key: str = "student.prediction") -> None:
    """Refuse an eps-prediction student where x_hat = (z_t - sigma_t eps_hat) / alpha_t is
    ill-conditioned at t = 1 (see EPS_LOGSNR_FLOOR): there the x-space loss weight becomes SNR^-1
    (~5e8 at t = 1 of the cosine schedule). An eps-prediction teacher is always fine."""
    if config.prediction == "eps" and not eps_distillable(config):
        raise ConfigError(key, f"an eps-prediction student cannot be distilled on a "
                               f"{config.schedule.kind} schedule: x_hat = (z_t - sigma eps_hat) / "
                               f"alpha is ill-conditioned at t = 1, where log-SNR is below "
                               f"{EPS_LOGSNR_FLOOR:.1f} (Salimans & Ho, Sec. 4); use v or x")


#: The widest spread (largest over smallest) of a loss's weight on a network's own output over
#: t in (0, 1] that a method accepts: the square of the sigma / alpha bound behind
#: EPS_LOGSNR_FLOOR. Past it the loss all but ignores some noise levels, or is dominated by them.
OUTPUT_WEIGHT_SPREAD = 1e4


def require_balanced_weighting(weighting: str, config: ModelConfig, key: str) -> None:
    """Refuse a loss weighting whose weight on `config`'s own output spreads more than
    OUTPUT_WEIGHT_SPREAD over t: e.g. snr_plus_one on an eps network is 1 + 1/SNR, 214 at t = 1 of
    Stable Diffusion's schedule but 4e8 on a cosine one."""
    from raydistill.models.denoiser import make_schedule

    schedule = make_schedule(config.schedule)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)[1:]
    alpha, sigma = schedule.alpha_sigma(t)
    weight = output_weight(weighting, config.prediction, logsnr=schedule.logsnr(t), alpha=alpha,
                           sigma=sigma)
    low, high = float(weight.min()), float(weight.max())
    if not (low > 0 and high / low <= OUTPUT_WEIGHT_SPREAD):
        raise ConfigError(key, f"{weighting} weights a {config.prediction}-prediction network's "
                               f"loss on its own output from {low:.3g} to {high:.3g} over t on its "
                               f"{config.schedule.kind} schedule (a spread above "
                               f"{OUTPUT_WEIGHT_SPREAD:g}); use output (unit weight on its own "
                               "output, as DMD2 trains its fake score)")


def regression_loss(
    net: nn.Module, config: ModelConfig, schedule: Schedule, weighting: str,
    z_t: Tensor, t: Tensor, cond: dict[str, Tensor], x_target: Tensor,
) -> Tensor:
    """Per-sample weight(lambda_t) ||x_hat(z_t) - x_target||^2, computed in the network's own
    parameterization (weight times the squared Jacobian dx_hat/d out, see x_jacobian), so that
    high-SNR x-space differences do not cancel."""
    return output_loss(net(z_t, t, cond), config, schedule, weighting, z_t, t, x_target)


def output_loss(
    out: Tensor, config: ModelConfig, schedule: Schedule, weighting: str, z_t: Tensor, t: Tensor,
    x_target: Tensor,
) -> Tensor:
    """`regression_loss` of a network output `out` = net(z_t, t, cond) already computed
    (`weighting` may also be `output`, unit weight on the network's own output)."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha, sigma = broadcast_like(alpha_t, z_t), broadcast_like(sigma_t, z_t)
    out = out.to(z_t.dtype)
    target = prediction_from_x(config.prediction, z=z_t, x=x_target, alpha=alpha, sigma=sigma)
    weight = output_weight(weighting, config.prediction, logsnr=schedule.logsnr(t),
                           alpha=alpha_t, sigma=sigma_t)
    return weight * (out - target).pow(2).flatten(1).mean(1)


def draw_w(n: int, w_min: float, w_max: float, generator: torch.Generator | None, device) -> Tensor:
    """Guidance strengths w ~ U[w_min, w_max]."""
    return w_min + (w_max - w_min) * torch.rand(n, generator=generator, device=device)
