"""Typed configuration: one dataclass per component, YAML files that compose them, `key=value`
overrides, and invariants checked at load time so bad input fails before any work starts.

Every error is a ConfigError whose message starts with the dotted key (or file) at fault; the CLI
prints it on one line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value, tagged with the dotted key (or the file) it came from."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)

    def __reduce__(self):
        """Copied and pickled with its key and message (Ray copies a worker's exceptions)."""
        return ConfigError, (self.key, self.message)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


#: the directories that the earlier stages of a pipeline being checked will write
#: (raydistill.pipeline.plan): while it checks the later stages' jobs, they count as present
_PLANNED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("planned",
                                                                        default=frozenset())


@contextlib.contextmanager
def planned_outputs(directories: Iterable[str]) -> Iterator[None]:
    """Inside, `directories` pass the checks that a file or directory exists."""
    token = _PLANNED.set(frozenset(os.path.abspath(d) for d in directories))
    try:
        yield
    finally:
        _PLANNED.reset(token)


def _planned(path: str) -> bool:
    return bool(path) and os.path.abspath(path) in _PLANNED.get()


def require_file(path: str, key: str) -> None:
    require(bool(path), key, "is required")
    require(os.path.exists(path) or _planned(path), key, f"no such file or directory: {path}")


def require_dir(path: str, key: str) -> None:
    require(os.path.isdir(path) or _planned(path), key, f"no such directory: {path}")


# ----------------------------------------------------------------------------------- components


@dataclass
class ScheduleConfig:
    """cosine: continuous, log-SNR clipped; linear, scaled_linear, squaredcos_cap_v2: a discrete
    DDPM teacher's betas (diffusers' beta_schedule names), t = (n + 1) / num_timesteps."""

    kind: Literal["cosine", "linear", "scaled_linear", "squaredcos_cap_v2"] = "cosine"
    logsnr_min: float = -20.0        # cosine only: log-SNR clipping at t = 1
    logsnr_max: float = 20.0         # cosine only: log-SNR clipping at t = 0
    num_timesteps: int = 1000        # discrete teachers only
    beta_start: float | None = None  # linear / scaled_linear: None is the kind's usual value
    beta_end: float | None = None

    @property
    def discrete(self) -> bool:
        return self.kind != "cosine"

    def validate(self) -> None:
        require(self.logsnr_min < self.logsnr_max, "logsnr_min", "must be below logsnr_max")
        require(self.num_timesteps >= 2, "num_timesteps", "must be at least 2")
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            require(value is None or self.kind in ("linear", "scaled_linear"), key,
                    f"applies to the linear and scaled_linear kinds, not {self.kind}")
            require(value is None or 0 < value < 1, key, "must be in (0, 1)")


@dataclass
class UNetConfig:
    in_channels: int = 1
    resolution: int = 16
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    num_classes: int = 10            # the null class for CFG is added on top
    w_embedding: bool = False        # guided students (Meng et al.) take w as an input
    dropout: float = 0.0

    def validate(self) -> None:
        for key in ("in_channels", "resolution", "base_channels", "num_res_blocks", "num_classes"):
            require(getattr(self, key) > 0, key, "must be positive")
        require(bool(self.channel_mult) and min(self.channel_mult) > 0, "channel_mult",
                "must be a non-empty list of positive integers")
        levels = len(self.channel_mult) - 1
        require(self.resolution % (2**levels) == 0, "resolution",
                f"must be divisible by 2^{levels} for {len(self.channel_mult)} levels")
        require(self.base_channels % 8 == 0, "base_channels", "must be a multiple of 8")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass
class MixtureConfig:
    num_classes: int = 4
    components_per_class: int = 2
    dim: int = 2
    seed: int = 0
    spread: float = 2.0
    shape: list[int] = field(default_factory=list)   # optional image shape, e.g. [1, 4, 4]

    def validate(self) -> None:
        for key in ("num_classes", "components_per_class", "dim"):
            require(getattr(self, key) > 0, key, "must be positive")
        if self.shape:
            size = 1
            for n in self.shape:
                size *= n
            require(size == self.dim, "shape", f"{self.shape} does not hold dim={self.dim} values")


@dataclass
class MLPConfig:
    """A small conditional MLP (students of the analytic mixture teacher)."""

    dim: int = 2
    width: int = 128
    depth: int = 3
    num_classes: int = 4             # the null class for CFG is added on top
    w_embedding: bool = False
    shape: list[int] = field(default_factory=list)   # optional sample shape, e.g. [1, 4, 4]

    def validate(self) -> None:
        for key in ("dim", "width", "depth", "num_classes"):
            require(getattr(self, key) > 0, key, "must be positive")
        require(self.width % 2 == 0, "width", "must be even (Fourier features)")
        require(not self.shape or math.prod(self.shape) == self.dim, "shape",
                f"{self.shape} does not hold dim={self.dim} values")


@dataclass
class DiffusersConfig:
    """A diffusers UNet as the network: its class and its diffusers config (what `from_config`
    rebuilds it from), and how raydistill's condition maps onto its inputs.

    Class labels: the model's class embedding holds the classes and one null label for CFG,
    `null_class` (-1: the last embedding). Text: cond["encoder_hidden_states"] [B, L, D], the
    null condition being the empty prompt's embedding, a [text_length, D] buffer of the network.
    A w-conditioned student takes w through a projection of guidance_embedding(w) added to the
    time embedding's input (diffusers' `time_cond_proj_dim`, as LCM does), starting at zero.
    """

    model_class: Literal["UNet2DModel", "UNet2DConditionModel"] = "UNet2DModel"
    unet: dict[str, Any] = field(default_factory=dict)   # the model's diffusers config
    null_class: int = -1
    text_length: int = 0             # tokens of encoder_hidden_states (text-conditioned models)
    w_embedding: bool = False
    w_embedding_dim: int = 256

    def validate(self) -> None:
        require(bool(self.unet), "unet", "is required (the model's diffusers config)")
        conditioned = self.model_class == "UNet2DConditionModel"
        require(conditioned == (self.text_length > 0), "text_length",
                "must be positive for a UNet2DConditionModel (its encoder_hidden_states tokens) "
                "and 0 for a UNet2DModel")
        require(self.w_embedding_dim > 0 and self.w_embedding_dim % 2 == 0, "w_embedding_dim",
                "must be a positive even number")


@dataclass
class ModelConfig:
    """A denoiser: a network (or the analytic mixture), its parameterization and its schedule."""

    kind: Literal["unet", "mlp", "gmm", "diffusers"] = "unet"
    prediction: Literal["eps", "x", "v"] = "v"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    gmm: MixtureConfig = field(default_factory=MixtureConfig)
    diffusers: DiffusersConfig | None = None

    @property
    def w_conditioned(self) -> bool:
        """Whether the network takes the guidance strength w as an input."""
        if self.kind in ("unet", "mlp", "diffusers"):
            return bool(getattr(self, self.kind).w_embedding)
        return False

    def validate(self) -> None:
        require((self.kind == "diffusers") == (self.diffusers is not None), "diffusers",
                "is required with kind diffusers, and only then")
        if self.kind == "diffusers":
            require(self.schedule.discrete, "schedule.kind",
                    "a diffusers network needs a discrete schedule (its native timesteps)")
            for key in ("beta_start", "beta_end"):
                require(self.schedule.kind == "squaredcos_cap_v2"
                        or getattr(self.schedule, key) is not None, f"schedule.{key}",
                        "is required for a diffusers network (its scheduler's value)")


@dataclass
class DataConfig:
    """Real images x in [-1, 1] (and class labels) for teachers, guided targets and classifiers.

    digits: scikit-learn's 8x8 digits; npz: arrays `images` ([N,H,W] or [N,C,H,W], uint8 in
    0..255 or float in [0, 1] / [-1, 1]) and optional integer `labels`; folder: PNG/JPEG files,
    one subdirectory per class (ImageFolder layout) or a flat folder without labels; webdataset:
    tar shards of jpg/png with cls/json labels under a directory or URI; mixture: exact draws
    from an analytic teacher (pairs only).
    """

    source: Literal["digits", "npz", "folder", "webdataset", "mixture"] = "digits"
    path: str = ""                   # npz: the file; folder: the directory; webdataset: dir / URI
    resolution: int = 16             # images are center-cropped to square and resized to this
    resize: bool = True              # false: every image must already be resolution^2
    channels: int = 0                # 0: as stored; 1 or 3: convert (grayscale <-> RGB)
    holdout_fraction: float = 0.15   # held-out split (stratified by class when labelled)
    seed: int = 0

    def validate(self) -> None:
        require(self.resolution >= 8, "resolution", "must be at least 8")
        require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "must be in (0, 1)")
        require(self.channels in (0, 1, 3), "channels", "must be 0 (as stored), 1 or 3")
        if self.source == "npz":
            require(bool(self.path), "path", "is required for source npz")
            require(os.path.isfile(self.path), "path", f"no such file: {self.path}")
        if self.source == "webdataset":
            require(bool(self.path), "path", "is required for source webdataset")
        if self.source == "folder":
            require(bool(self.path), "path", "is required for source folder")
            require(os.path.isdir(self.path), "path", f"no such directory: {self.path}")


@dataclass
class ModuleOptim:
    """One trainable module's departures from `optim` (unset keys: optim's value); e.g. DMD2 trains
    its fake score with another learning rate than its generator. warmup_steps counts the module's
    own updates."""

    lr: float | None = None
    betas: list[float] | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None


@dataclass
class OptimConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])     # AdamW
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    #: per trainable module (its name, e.g. fake_score), the keys of ModuleOptim it sets
    modules: dict[str, ModuleOptim] = field(default_factory=dict)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "lr"):
            require(getattr(self, key) > 0, key, "must be positive")
        _check_adamw(self, "")
        for name in self.modules:
            _check_adamw(self.for_module(name), f"modules.{name}.")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")

    def for_module(self, name: str) -> OptimConfig:
        """The settings module `name` trains with: these, with its `modules` entry applied."""
        given = self.modules.get(name)
        if given is None:
            return self
        changes = {k: v for k, v in dataclasses.asdict(given).items() if v is not None}
        return dataclasses.replace(self, **changes, modules={})


def _check_adamw(optim: OptimConfig, prefix: str) -> None:
    require(optim.lr > 0, f"{prefix}lr", "must be positive")
    require(len(optim.betas) == 2 and all(0.0 <= b < 1.0 for b in optim.betas),
            f"{prefix}betas", f"must be two numbers in [0, 1), got {optim.betas}")
    require(optim.warmup_steps >= 0, f"{prefix}warmup_steps", "must be non-negative")
    require(optim.weight_decay >= 0, f"{prefix}weight_decay", "must be non-negative")
    require(optim.grad_clip >= 0, f"{prefix}grad_clip",
            "must be non-negative (0 disables clipping)")


@dataclass
class SolverConfig:
    steps: int = 64
    solver: Literal["ddim", "heun", "dpmpp_2m"] = "ddim"
    spacing: Literal["uniform_t", "uniform_logsnr"] = "uniform_t"

    def validate(self) -> None:
        require(self.steps > 0, "steps", f"must be positive, got {self.steps}")


@dataclass
class SamplerConfig(SolverConfig):
    w: float = 1.0                   # classifier-free guidance strength (0 = conditional)
    per_class: int = 8

    def validate(self) -> None:
        super().validate()
        require(self.per_class > 0, "per_class", "must be positive")
        require(self.w >= -1.0, "w", "must be at least -1 (the unconditional model)")


@dataclass
class GuidanceRange:
    """Guidance strengths w ~ U[w_min, w_max] a w-conditioned student is trained on (Meng et al.)."""

    w_min: float = 0.0
    w_max: float = 4.0

    def validate(self) -> None:
        require(self.w_min >= -1.0, "w_min", "must be at least -1")
        require(self.w_min <= self.w_max, "w_min",
                f"must not exceed w_max ({self.w_min} > {self.w_max})")


# ------------------------------------------------------------------------------- verb configs


@dataclass
class TeacherJob:
    """`raydistill teacher`: train a class-conditional teacher with label dropout for CFG. In a
    pipeline, `pretrained` names an existing teacher to distil instead (a diffusers directory or a
    checkpoint): nothing is trained, and `data` stays the real images (stage-1 targets, DMD2's
    GAN batch and the evaluation's reference)."""

    pretrained: TeacherRef | None = None
    seed: int = 0
    device: str = "auto"             # auto (cuda if present, else cpu) | cpu | cuda | cuda:N
    threads: int = 0                 # torch intra-op threads; 0 = all cores
    label_dropout: float = 0.1       # probability of training on the null class
    loss_weighting: Literal["snr", "truncated_snr", "snr_plus_one", "constant"] = "snr_plus_one"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preview: SamplerConfig = field(default_factory=SamplerConfig)

    def validate(self) -> None:
        require(self.pretrained is None or self.pretrained.analytic is None, "pretrained",
                "must be a diffusers directory or a checkpoint (a pipeline evaluates images)")
        require(0.0 <= self.label_dropout < 1.0, "label_dropout", "must be in [0, 1)")
        require(self.model.kind == "unet", "model.kind", "a trained teacher must be a unet")
        require(self.data.source != "mixture", "data.source",
                "a teacher trains on images, not on an analytic mixture")
        require(not self.model.unet.w_embedding, "model.unet.w_embedding",
                "a teacher is guided by CFG, not conditioned on w")
        require(self.threads >= 0, "threads", "must be non-negative")


@dataclass
class ClassifierJob:
    """The digit classifier whose features score samples (accuracy) and FID."""

    seed: int = 0
    device: str = "auto"
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "lr", "width"):
            require(getattr(self, key) > 0, key, "must be positive")
        require(self.width % 8 == 0, "width", "must be a multiple of 8 (group norm)")


@dataclass
class DiffusersTeacher:
    """A diffusers model directory: a pipeline's (unet/, scheduler/) or one model's
    `save_pretrained` output with its scheduler_config.json beside config.json."""

    path: str = ""
    null_class: int = -1             # class-conditional: the label trained as "no class" (-1: last)
    null_embedding: str = ""         # text-conditioned: the empty prompt's encoder_hidden_states
                                     # [L, D] (.npy or .safetensors, key "encoder_hidden_states")
    vae: str = ""                    # a latent model's AutoencoderKL directory (default: the
                                     # pipeline's vae/, when there is one)

    def validate(self) -> None:
        require(bool(self.path), "path", "is required (a diffusers model or pipeline directory)")
        require(os.path.isdir(self.path), "path", f"no such directory: {self.path}")
        if self.null_embedding:
            require(os.path.isfile(self.null_embedding), "null_embedding",
                    f"no such file: {self.null_embedding}")
        if self.vae:
            require(os.path.isdir(self.vae), "vae", f"no such directory: {self.vae}")


@dataclass
class TeacherRef:
    """A teacher checkpoint, a diffusers model directory, or an analytic mixture teacher
    described inline (exactly one)."""

    checkpoint: str = ""             # teacher checkpoint directory
    analytic: MixtureConfig | None = None
    diffusers: DiffusersTeacher | None = None
    fingerprint: str = ""            # optional pin: refuse a teacher with another fingerprint
    build: str = ""                  # a teacher YAML to train into `checkpoint` when it is missing
    prompts: str = ""                # a text model's prompt table: encoder_hidden_states [P, L, D]
                                     # (.safetensors or .npy; raydistill.conditions); a text
                                     # student's default is the one it was distilled with

    def validate(self) -> None:
        if self.prompts:
            require_file(self.prompts, "prompts")
        if self.diffusers is not None:
            require(not self.checkpoint and self.analytic is None, "diffusers",
                    "give one of checkpoint, analytic and diffusers")
            require(not self.build, "build", "a diffusers teacher is loaded, not trained")
        elif self.analytic is not None:
            require(not self.checkpoint, "analytic", "give either checkpoint or analytic, not both")
            require(not self.build, "build", "an analytic teacher needs no training")
        elif self.build:
            require(bool(self.checkpoint), "checkpoint", "is required (where `build` trains to)")
            require_file(self.build, "build")
        else:
            require_file(self.checkpoint, "checkpoint")


@dataclass
class WorkersConfig:
    """The elastic actor pool: it grows with the cluster up to `max` (0 = no bound)."""

    min: int = 1
    max: int = 0
    cpus: float = 1.0                # CPUs reserved per worker
    gpus: float = 0.0                # GPUs per worker; > 0 runs the teacher on CUDA
    threads: int = 1                 # torch threads per worker

    def validate(self) -> None:
        require(self.min >= 1, "min", "must be at least 1")
        require(self.max == 0 or self.max >= self.min, "max", "must be 0 (unbounded) or >= min")
        require(self.cpus > 0, "cpus", "must be positive")
        require(self.gpus >= 0, "gpus", "must be non-negative")
        require(self.threads >= 1, "threads", "must be at least 1")


@dataclass
class PairsJob:
    """`raydistill pairs`: the teacher's work, written to WebDataset shards with a manifest."""

    mode: str = "ode"                # a pair mode (raydistill.pairs.modes)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    data: DataConfig = field(default_factory=DataConfig)      # real x for guided / progressive
    solver: SolverConfig = field(default_factory=SolverConfig)   # ode mode
    guidance: GuidanceRange = field(default_factory=GuidanceRange)
    student_steps: int = 0           # progressive mode: targets for an N-step student
    stochastic: bool = False         # Meng et al.'s stochastic sampler: ode mode samples with it
                                     # (solver.steps), progressive mode makes its 2/N targets
    force_sampler: bool = False      # ode mode: sample a distilled student off its own sampler
    num_shards: int = 8
    samples_per_shard: int = 256
    batch_size: int = 256            # teacher batch per forward
    seed: int = 0
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self) -> None:
        # imported here: the mode table imports this module
        from raydistill.pairs.modes import MODES

        require(self.mode in MODES, "mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        for key in ("num_shards", "samples_per_shard", "batch_size"):
            require(getattr(self, key) > 0, key, "must be positive")
        MODES[self.mode].validate(self)


@dataclass
class TrainWorkers:
    """Ray Train workers: one per GPU on a cluster; CPU workers (gloo) when gpus is 0."""

    num: int = 2
    gpus: float = 0.0                # GPUs per worker; > 0 trains on CUDA with NCCL
    cpus: float = 1.0
    threads: int = 1                 # torch threads per CPU worker

    def validate(self) -> None:
        require(self.num >= 1, "num", "must be at least 1")
        require(self.gpus >= 0, "gpus", "must be non-negative")
        require(self.cpus > 0, "cpus", "must be positive")
        require(self.threads >= 1, "threads", "must be at least 1")


@dataclass
class DeepSpeedConfig:
    """Each trainable module gets its own DeepSpeed engine built from these keys; `extra` is merged
    into the generated DeepSpeed config as given (e.g. {"zero_optimization": {"overlap_comm": true}})."""

    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = 1              # micro-batches per optimizer step
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0..3, got {self.zero_stage}")
        require(self.grad_accum >= 1, "grad_accum", "must be at least 1")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, through peft) on the trained networks' UNets:
    their weights stay the teacher's, frozen, and each targeted layer W learns W + (alpha/rank) B A
    with B [out, rank] starting at zero, so a student starts as its teacher; the optimizer holds
    the adapters only. The run's student is written with the adapters merged into its weights
    (and kept beside them, for `raydistill export`'s diffusers LoRA file)."""

    rank: int = 0                    # the adapters' rank; 0: no adapters, every weight trains
    alpha: float | None = None       # the adapters' scale is alpha / rank; None: rank (scale 1)
    #: the layers that get adapters, by name as peft matches them (`to_q` matches every
    #: `...attn1.to_q`); None: the network family's (raydistill.models.lora.DEFAULT_TARGETS)
    targets: list[str] | None = None
    #: the method's modules that get adapters (`student`, `generator`, `fake_score`); None: all
    modules: list[str] | None = None

    def validate(self) -> None:
        require(self.rank >= 0, "rank", f"must be non-negative (0: no adapters), got {self.rank}")
        require(self.alpha is None or self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        for key in ("targets", "modules"):
            require(getattr(self, key) is None or bool(getattr(self, key)), key,
                    "must name at least one (or be null: the default)")

    @property
    def lora_alpha(self) -> float:
        """alpha, or rank where it is not given (scale 1)."""
        return self.alpha if self.alpha is not None else float(self.rank)


@dataclass
class MemoryConfig:
    """Levers that trade compute for memory on each rank."""

    #: recompute the trained networks' activations in the backward pass instead of holding them
    #: from the forward (a diffusers UNet's own gradient checkpointing; the built-in UNet's down
    #: and up blocks): activation memory for about one more forward pass per step
    activation_checkpointing: bool = False
    #: keep the optimizer's fp32 master weights and moments in host memory and step them there
    #: (DeepSpeed's ZeRO-Offload with its CPU Adam): the device holds the weights and gradients
    #: only; needs deepspeed.zero_stage 1-3
    offload_optimizer: bool = False
    #: train low-rank adapters on the frozen teacher's weights instead of every weight
    lora: LoraConfig = field(default_factory=LoraConfig)


#: Keys of TrainJob that moved into the sections of the methods that read them (kd's and dmd's
#: regression distance): a config or run written before loads unchanged (TrainJob.resolve)
MOVED_TO_SECTION = ("distance", "lpips")


@dataclass
class TrainJob:
    """`raydistill train`: distill a student with Ray Train + DeepSpeed ZeRO."""

    method: str = "guided"           # a registered method (raydistill.methods.registry)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    student: ModelConfig | None = None   # default: the teacher's network (+ w input for guided)
    data: DataConfig = field(default_factory=DataConfig)   # real x for inline targets
    pairs: str = ""                  # pair shards: targets (guided, progressive), ODE pairs (kd, dmd)
    guidance: GuidanceRange = field(default_factory=GuidanceRange)
    #: the method's own settings, read from its section (`MethodSpec.section`: progressive's
    #: `halving:`, kd's `kd:`, dmd's `dmd:`); None for a method without one
    settings: Any = None
    #: guided and progressive students' x-space loss weighting (dmd's fake score: dmd.fake_weighting)
    loss_weighting: Literal["snr", "truncated_snr", "snr_plus_one", "constant"] = "truncated_snr"
    optim: OptimConfig = field(default_factory=OptimConfig)   # steps: guided only (see halving)
    workers: TrainWorkers = field(default_factory=TrainWorkers)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    checkpoint_every: int = 100      # optimizer steps between checkpoints
    #: where Ray Train keeps the checkpoints: empty, the run directory's ray/ (every worker writes
    #: its part there in place, so the workers must share that file system); a URI (s3://,
    #: gs://, file://...), to which each worker uploads its part in the background while training
    #: goes on, deleting its local copy once uploaded
    storage: str = ""
    #: stop at this optimizer step (0: at the end) with a checkpoint and the student of that
    #: step; `--resume` with a later one (or 0) continues the same run
    until: int = 0
    max_failures: int = 2            # worker failures survived by resuming from a checkpoint
    max_nan_steps: int = 10          # updates skipped in a row (non-finite loss or gradients) to stop at
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.settings is None:        # a job built in code: its method's default settings
            from raydistill.methods.registry import METHODS

            spec = METHODS.get(self.method)
            self.settings = spec.settings() if spec is not None and spec.section else None

    @staticmethod
    def resolve(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """The mapping with the method's section read into `settings`. Another method's section
        is checked as that method would read it, then left out (a config switched to another
        method on the command line keeps its old section, as it always could).

        Migrates a job written before methods owned their sections: a MOVED_TO_SECTION key
        moves into the method's section where that has it, and is left out where not."""
        from raydistill.methods.registry import METHODS

        data = dict(data)
        require("settings" not in data, _join(prefix, "settings"),
                "unknown key (a method's settings are its section, e.g. dmd:)")
        method = data.get("method") or TrainJob.method
        spec = METHODS.get(method)
        section = spec.section if spec is not None else ""
        has = {f.name for f in dataclasses.fields(spec.settings)} if section else set()
        moved = {key: data.pop(key) for key in MOVED_TO_SECTION if key in data}
        for key, value in moved.items():
            if key in has:
                into = dict(data.get(section) or {})
                require(key not in into, _join(prefix, key), f"is also given as {section}.{key}")
                data[section] = {**into, key: value}
        for other in METHODS.values():
            if other.section and other.section != section and other.section in data:
                from_dict(other.settings, data.pop(other.section) or {},
                          _join(prefix, other.section))
        known = {f.name for f in dataclasses.fields(TrainJob)} - {"settings"} | {section} - {""}
        for key in data:
            require(key in known, _join(prefix, key),
                    f"unknown key (expected one of {sorted(known)})")
        if section:
            data["settings"] = from_dict(spec.settings, data.pop(section, None) or {},
                                         _join(prefix, section))
        return data

    def validate(self) -> None:
        # imported here: the registry imports this module
        from raydistill.methods.registry import METHODS

        require(self.method in METHODS, "method",
                f"must be one of {list(METHODS)}, got {self.method!r}")
        settings = METHODS[self.method].settings
        require(settings is None or isinstance(self.settings, settings), "settings",
                f"must be a {getattr(settings, '__name__', None)} for method {self.method}")
        for key in ("checkpoint_every", "log_every", "max_nan_steps"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.until >= 0, "until", "must be non-negative (0: train to the end)")
        require(not self.storage or "://" in self.storage, "storage",
                f"must be a URI (s3://bucket/path, file:///path, ...) or empty (the run "
                f"directory), got {self.storage!r}")
        require(self.max_failures >= 0, "max_failures", "must be non-negative")
        require(not self.memory.offload_optimizer or self.deepspeed.zero_stage > 0,
                "memory.offload_optimizer", "needs deepspeed.zero_stage 1, 2 or 3 (ZeRO-Offload "
                                            "moves the optimizer state ZeRO partitions)")
        if self.deepspeed.zero_stage == 3:
            require(self.optim.ema_decay == 0.0, "optim.ema_decay",
                    "must be 0 with deepspeed.zero_stage 3 (the EMA is a full copy of the student "
                    "on every rank, which ZeRO-3 exists to avoid)")
        if self.teacher.analytic is not None:
            require(self.student is not None, "student", "is required with an analytic teacher "
                                                         "(e.g. kind: mlp)")

    def micro_batch(self, world_size: int) -> int:
        """Samples in each of a worker's deepspeed.grad_accum micro-batches of a step, when
        `world_size` workers share optim.batch_size."""
        return self.optim.batch_size // (world_size * self.deepspeed.grad_accum)


@dataclass
class FeaturesConfig:
    """The feature extractor behind FID / KID (raydistill.eval.features)."""

    kind: Literal["classifier", "inception"] = "classifier"
    path: str = ""                   # classifier directory, or a TorchScript Inception-v3 file
    batch_size: int = 500

    def validate(self) -> None:
        require(bool(self.path), "path", f"is required (the {self.kind} to extract features with)")
        if self.kind == "classifier":
            require_dir(self.path, "path")
        else:
            require(os.path.isfile(self.path), "path", f"no such file: {self.path}")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")


@dataclass
class EvalStudent:
    """A student to score: sampled only as it was distilled (a progressive student at its own
    steps and sampler; any other at `steps` DDIM steps, default the teacher's full count). One
    name may label several checkpoints (a progressive run's rounds): rows are told apart by their
    steps."""

    name: str = ""
    checkpoint: str = ""
    steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        require(bool(self.name), "name", "is required (the row's label)")
        require_dir(self.checkpoint, "checkpoint")
        require(all(n >= 1 for n in self.steps), "steps", "must all be at least 1")


FLOOR_ROW = "floor"                  # the evaluation's row of the teacher at a second seed


@dataclass
class EvalJob:
    """`raydistill eval`: every sampler scored the same way, at one w and the same seeds.

    The teacher at its full step count, plain DDIM and DPM-Solver++(2M) at `baseline_steps`, and
    each student; FID / KID against `data` in the space of `features`, or, for an analytic teacher,
    exact distances to the true class-conditional distribution."""

    teacher: TeacherRef = field(default_factory=TeacherRef)
    teacher_steps: int = 64
    baseline_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    baseline_solvers: list[Literal["ddim", "heun", "dpmpp_2m"]] = field(
        default_factory=lambda: ["ddim", "dpmpp_2m"])
    students: list[EvalStudent] = field(default_factory=list)
    w: float = 1.0
    #: further guidance strengths at which the teacher, plain DDIM at `sweep_steps` and every
    #: w-conditioned student distilled for them are scored too (does a guided student follow w?)
    w_sweep: list[float] = field(default_factory=list)
    sweep_steps: int = 16
    num_samples: int = 2000
    samples_per_shard: int = 250
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)           # the reference images
    features: FeaturesConfig | None = None                         # required for image teachers
    kid_subset_size: int = 1000
    reference_cache: str = ""        # default: DIR/reference next to the sample sets
    #: score the students alone: no teacher or baseline rows, so no FID to the teacher's samples
    #: (a tuning trial's score)
    students_only: bool = False
    #: draw the teacher's samples again at seed + 1, at the evaluation's w and each of the sweep's
    #: (a `floor` row): their FID to the teacher's samples is what two independent draws of the
    #: same distribution score at `num_samples`, the least a sampler whose samples are not paired
    #: with the teacher's by their noise (a stochastic one) can reach; their FID to the data, how
    #: far FID itself moves with the seed
    floor: bool = False
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self) -> None:
        require(self.teacher_steps >= 1, "teacher_steps", "must be at least 1")
        require(self.sweep_steps >= 1, "sweep_steps", "must be at least 1")
        require(self.w not in self.w_sweep and len(set(self.w_sweep)) == len(self.w_sweep),
                "w_sweep", f"must not repeat w = {self.w:g} or any of its values")
        require(all(n >= 1 for n in self.baseline_steps), "baseline_steps",
                "must all be at least 1")
        require(self.num_samples >= 2, "num_samples", "must be at least 2")
        require(self.samples_per_shard >= 1, "samples_per_shard", "must be at least 1")
        require(self.num_samples % self.samples_per_shard == 0, "num_samples",
                f"must be a multiple of samples_per_shard ({self.samples_per_shard}), got "
                f"{self.num_samples}")
        require(self.kid_subset_size >= 2, "kid_subset_size", "must be at least 2")
        entries = [(student.name, student.checkpoint) for student in self.students]
        require(len(set(entries)) == len(entries), "students",
                "lists one checkpoint twice under one name")
        taken = {"teacher", FLOOR_ROW, *self.baseline_solvers} & {s.name for s in self.students}
        require(not taken, "students", f"names a student {', '.join(sorted(taken))}, the name of "
                                       "the evaluation's own row")
        if self.teacher.analytic is None:
            require(self.features is not None, "features",
                    "is required for an image teacher (kind classifier or inception, and path)")
        require(not self.students_only or bool(self.students), "students_only",
                "needs students to score")
        require(not (self.floor and self.students_only), "floor",
                "needs the teacher's rows, which students_only leaves out")
        require(not self.floor or self.teacher.analytic is None, "floor",
                "is for an image teacher (an analytic one is scored by exact distances)")


@dataclass
class Goal:
    """A quality goal the report states as met or not (raydistill.pipeline.report) for the
    evaluation's rows named `row` ("*": every student's), at `steps` steps (0: each of the row's)
    and at the evaluation's w, or at each w of its sweep (`sweep: true`)."""

    row: str = ""
    steps: int = 0
    sweep: bool = False
    fid_vs_teacher: float = 0.0      # FID at most this multiple of the teacher's (at the same w)
    beats_ddim: bool = False         # FID below plain DDIM's with the fewest NFE at or above its
    #: FID to the teacher's samples below plain DDIM's at this many steps (at the same w)
    closer_than_ddim: int = 0

    def validate(self) -> None:
        require(bool(self.row), "row", "is required (a row's name, or * for every student's)")
        require(self.steps >= 0 and self.closer_than_ddim >= 0 and self.fid_vs_teacher >= 0,
                "steps", "steps, closer_than_ddim and fid_vs_teacher must be non-negative")
        require(bool(self.fid_vs_teacher or self.beats_ddim or self.closer_than_ddim),
                "fid_vs_teacher", "sets no goal (give fid_vs_teacher, beats_ddim or "
                                  "closer_than_ddim)")


@dataclass
class StudentStage:
    """One distillation of the pipeline: a `raydistill train` job (its `train` keys) whose teacher is
    the pipeline's teacher or an earlier stage's student; `data` is the teacher's unless given."""

    name: str = ""
    teacher: str = "teacher"         # "teacher", or the name of an earlier stage
    train: dict[str, Any] = field(default_factory=dict)
    #: PairsJob keys: the stage trains from a pair set the pipeline makes first (stage
    #: `<name>-pairs`: its mode from the method, teacher, data, guidance and halving from `train`);
    #: empty: the teacher runs inline
    pairs: dict[str, Any] = field(default_factory=dict)
    #: instead of `pairs`: train from the pair set an earlier stage with the same teacher made
    #: (e.g. dmd's regression on kd's ODE pairs)
    pairs_from: str = ""
    evaluate: bool = True            # a row of the evaluation (at the steps it was distilled for)

    @property
    def pairs_stage(self) -> str | None:
        """The pair-set stage this stage makes, if any."""
        return f"{self.name}-pairs" if self.pairs else None

    @property
    def reads_pairs(self) -> str | None:
        """The pair-set stage this stage trains from, if any."""
        return self.pairs_stage or (f"{self.pairs_from}-pairs" if self.pairs_from else None)

    def validate(self) -> None:
        require(bool(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.name)), "name",
                f"must be a lower-case directory name, got {self.name!r}")
        require(self.name not in ("teacher", "classifier", "eval"), "name",
                f"{self.name!r} is the name of a built-in stage")
        require("teacher" not in self.train, "train.teacher",
                "is set by the pipeline (use the stage's `teacher: NAME`)")
        require(not ((self.pairs or self.pairs_from) and "pairs" in self.train), "train.pairs",
                "is set by the pipeline when the stage has a `pairs:` or `pairs_from:`")
        require(not (self.pairs and self.pairs_from), "pairs_from",
                "give either `pairs:` (a pair set of its own) or `pairs_from:`, not both")
        for key in ("mode", "teacher", "guidance", "student_steps", "stochastic"):
            require(key not in self.pairs, f"pairs.{key}",
                    "follows from the stage's method, teacher and train keys")


@dataclass
class PipelineJob:
    """`raydistill run`: teacher -> classifier -> students -> evaluation -> report, resumable by
    lineage (raydistill.pipeline)."""

    teacher: TeacherJob = field(default_factory=TeacherJob)
    classifier: ClassifierJob = field(default_factory=ClassifierJob)
    students: list[StudentStage] = field(default_factory=list)
    #: EvalJob keys; teacher, students and data come from the run, and features from the
    #: pipeline's classifier unless given here
    eval: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)   # what the report states as met or not

    def validate(self) -> None:
        seen, names = {"teacher"}, {"teacher", "classifier", "eval"}
        for i, stage in enumerate(self.students):
            for name in filter(None, (stage.name, stage.pairs_stage)):
                require(name not in names, f"students[{i}].name", f"{name!r} is used twice")
                names.add(name)
            require(stage.teacher in seen, f"students[{i}].teacher",
                    f"must be 'teacher' or an earlier stage, got {stage.teacher!r}")
            if stage.pairs_from:
                source = next((s for s in self.students[:i] if s.name == stage.pairs_from), None)
                require(source is not None and bool(source.pairs), f"students[{i}].pairs_from",
                        f"must name an earlier stage with a `pairs:` section, got "
                        f"{stage.pairs_from!r}")
                require(source.teacher == stage.teacher, f"students[{i}].pairs_from",
                        f"{source.name}'s pairs are made by {source.teacher!r}, this stage's "
                        f"teacher is {stage.teacher!r}")
            seen.add(stage.name)
        for key in ("teacher", "students", "data"):
            require(key not in self.eval, f"eval.{key}", "is set by the pipeline")
        rows = {"teacher", "ddim", "dpmpp_2m", "heun", "*", *(s.name for s in self.students)}
        for i, goal in enumerate(self.goals):
            require(goal.row in rows, f"goals[{i}].row", f"{goal.row!r} is not a row of the "
                                                           f"evaluation ({sorted(rows)})")
        if "features" in self.eval:                 # instead of the classifier stage's
            from_dict(FeaturesConfig, self.eval["features"], "eval.features")

    @property
    def trains_classifier(self) -> bool:
        """Whether the evaluation's features are the pipeline's own classifier (the default)
        rather than the given `eval.features` (e.g. Inception weights for a latent text model)."""
        return "features" not in self.eval


#: the search domains of `raydistill tune`'s space, by name: what each takes
DOMAINS = {"loguniform": "[low, high], low > 0", "uniform": "[low, high]",
           "choice": "a list of values", "grid": "a list of values, each tried"}


@dataclass
class TuneJob:
    """`raydistill tune`: ASHA (Ray Tune) over a training job's keys; each trial is a Ray Train run
    of the job with its sampled values, scored at `rungs` points of its steps by the same FID as
    the evaluation (raydistill.pipeline.tune)."""

    #: the training job: a train config, or a pipeline stage's DIR/<stage>/train.yaml
    train: str = ""
    overrides: list[str] = field(default_factory=list)   # key=value on the job before any trial
    #: dotted train key -> {domain: values}, a domain of DOMAINS, e.g. optim.lr: {loguniform:
    #: [1.0e-5, 1.0e-3]}
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    trials: int = 8                  # samples of the space (a grid counts once per sample)
    rungs: int = 3                   # FID evaluations per trial, at equal shares of its steps
    reduction_factor: int = 2        # ASHA: the best 1/reduction_factor at a rung go on
    concurrent: int = 1              # trials at once (each needs its Ray Train workers)
    #: EvalJob keys for each score (features and data are required for an image teacher; w
    #: defaults to the job's one w when it distils one; with w_sweep, the score is the geometric
    #: mean of FID over w and the sweep's); teacher and students come from the trial
    eval: dict[str, Any] = field(default_factory=dict)
    seed: int = 0                    # the searcher's draws

    def validate(self) -> None:
        require_file(self.train, "train")
        require(bool(self.space), "space", "is required: the train keys to search and their "
                                           f"domains ({', '.join(DOMAINS)})")
        for key, domain in self.space.items():
            require(isinstance(domain, dict) and len(domain) == 1 and next(iter(domain)) in DOMAINS,
                    f"space.{key}", f"must be one domain of {sorted(DOMAINS)}, got {domain!r}")
            (kind, values), = domain.items()
            if kind in ("loguniform", "uniform"):
                require(isinstance(values, list) and len(values) == 2
                        and all(isinstance(v, (int, float)) for v in values)
                        and values[0] < values[1] and (kind == "uniform" or values[0] > 0),
                        f"space.{key}.{kind}", f"must be {DOMAINS[kind]}, got {values!r}")
            else:
                require(isinstance(values, list) and len(values) >= 1, f"space.{key}.{kind}",
                        f"must be {DOMAINS[kind]}, got {values!r}")
        for key in ("trials", "rungs", "concurrent"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.reduction_factor >= 2, "reduction_factor", "must be at least 2")
        for key in ("teacher", "students", "students_only"):
            require(key not in self.eval, f"eval.{key}", "is set by each trial")


# ----------------------------------------------------------------------------------- loading


def load(cls: type[T], path: str | None = None, overrides: list[str] = (),
         preset: str | None = None) -> T:
    """Build a `cls` config from a YAML file (optional) and `key=value` overrides (see
    `read_config`), then validate."""
    return from_dict(cls, read_config(path, overrides, preset))


def read_config(path: str | None = None, overrides: list[str] = (),
                preset: str | None = None) -> dict[str, Any]:
    """The mapping of a YAML file (optional) with `key=value` overrides applied, not validated.

    A file may hold `presets:`, a mapping of preset name -> list of overrides; `preset` applies
    one of them (before `overrides`), and a file with presets names its default in
    `default_preset:`."""
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError("--config", f"no such file: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(path, f"not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(path, "must hold a mapping of config keys")
    presets = data.pop("presets", {})
    preset = preset or data.pop("default_preset", None)
    data.pop("default_preset", None)
    if preset is not None:
        if preset not in presets:
            raise ConfigError("--preset", f"{preset!r} is not one of the presets "
                                          f"{sorted(presets)} in {path}")
        overrides = [*presets[preset], *overrides]
    for item in overrides:
        apply_override(data, item)
    return data


def with_absolute_paths(job: T) -> T:
    """The job with its local paths (teacher, data, pairs, features, students) made absolute:
    workers run in another working directory, and a recorded job outlives the one it was started
    in."""
    def absolute(path: str) -> str:
        return os.path.abspath(path) if path and "://" not in path else path

    changes: dict[str, Any] = {}
    if isinstance(getattr(job, "teacher", None), TeacherRef):
        changes["teacher"] = absolute_teacher(job.teacher)
    if hasattr(job, "data"):
        changes["data"] = dataclasses.replace(job.data, path=absolute(job.data.path))
    if hasattr(job, "pairs"):
        changes["pairs"] = absolute(job.pairs)
    if getattr(job, "features", None) is not None:
        changes["features"] = dataclasses.replace(job.features, path=absolute(job.features.path))
    if hasattr(job, "students"):
        changes["students"] = [dataclasses.replace(s, checkpoint=absolute(s.checkpoint))
                               for s in job.students]
    return dataclasses.replace(job, **changes)


def absolute_teacher(ref: TeacherRef) -> TeacherRef:
    """The teacher reference with its local paths made absolute (see with_absolute_paths)."""
    def absolute(path: str) -> str:
        return os.path.abspath(path) if path and "://" not in path else path

    diffusers = ref.diffusers
    if diffusers is not None:
        diffusers = dataclasses.replace(diffusers, path=absolute(diffusers.path),
                                        null_embedding=absolute(diffusers.null_embedding),
                                        vae=absolute(diffusers.vae))
    return dataclasses.replace(ref, checkpoint=absolute(ref.checkpoint),
                               build=absolute(ref.build), prompts=absolute(ref.prompts),
                               diffusers=diffusers)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set a dotted `key=value` (value parsed as YAML) in a nested dict."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(item, "overrides must look like key=value")
    node: Any = data
    *parents, leaf = key.split(".")
    for name in parents:
        if isinstance(node, list):                 # students.1.train...: an item of a list
            if not name.isdigit() or int(name) >= len(node):
                raise ConfigError(key, f"{name} is not an index of a list of {len(node)}")
            node = node[int(name)]
        else:
            node = node.setdefault(name, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(key, f"{name} is not a section")
    if isinstance(node, list):
        raise ConfigError(key, "replace a whole list, not one item")
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise ConfigError(key, f"cannot parse value {raw!r}") from None


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Type-check and build a dataclass from a mapping; unknown keys are errors, and a null value
    (YAML `key: null`, or `key=null` on the command line) means the key's default."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    if hasattr(cls, "resolve"):
        data = cls.resolve(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_join(prefix, key), f"unknown key (expected one of {sorted(fields)})")
    values = {key: _convert(hints[key], value, _join(prefix, key))
              for key, value in data.items() if value is not None}
    config = cls(**values)
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ConfigError as err:
            raise (err.under(prefix) if prefix else err) from None
    return config


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by their dotted keys (`optim.lr`, as overrides name them); an
    empty mapping is a leaf."""
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.update(dotted(value, f"{prefix}{key}."))
        else:
            leaves[prefix + key] = value
    return leaves


def to_dict(config: Any) -> dict[str, Any]:
    """The mapping `from_dict` builds `config` from (a TrainJob's settings under its method's
    section)."""
    data = dataclasses.asdict(config)
    if isinstance(config, TrainJob):
        settings = data.pop("settings")
        if settings is not None:
            from raydistill.methods.registry import method_spec

            data[method_spec(config.method).section] = settings
    return data


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(hint: Any, value: Any, key: str) -> Any:
    if hint is Any:                      # built already (TrainJob.settings, by `resolve`)
        return value
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(key, f"must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _convert(inner, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        _, inner = get_args(hint)
        if inner is Any:
            return value
        return {name: _convert(inner, item, f"{key}.{name}") for name, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        (inner,) = get_args(hint)
        return [_convert(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)         # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {hint}")
