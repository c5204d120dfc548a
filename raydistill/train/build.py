"""From a TrainJob to a teacher, a student and a method; and every check that can fail before any
worker starts (the driver runs `prepare`, workers rebuild the same objects with `build_method`).
What differs between methods comes from their registry entry (raydistill.methods.registry)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.data.units import require_shards_per_worker
from raydistill.methods import Method
from raydistill.methods.base import DATA, PAIRS, eps_distillable, require_distillable
from raydistill.methods.registry import method_spec
from raydistill.models.checkpoint import Checkpoint, build_network, load_teacher, network_holding
from raydistill.models.conditioning import model_data_shape
from raydistill.models.lora import add_adapters
from raydistill.models.memory import checkpoint_activations
from raydistill.pairs.manifest import PairSet
from raydistill.seeds import STUDENT_STREAM, derive_seed


@dataclass
class Plan:
    """What the driver checked: the teacher, the student's config and the pair set, if any."""

    teacher: Checkpoint
    student_config: ModelConfig
    pairs_rows: int = 0


def student_config(job: TrainJob, teacher: Checkpoint) -> ModelConfig:
    """The configured student, or the method's default from the teacher's own network. An
    eps-prediction teacher's network stays eps (and starts from the teacher's weights) where its
    schedule allows an eps student (see require_distillable: Stable Diffusion's does); otherwise
    it predicts v, and then starts from its own initialisation (see starts_from_teacher)."""
    if job.student is not None:
        return job.student
    if teacher.config.kind == "gmm":
        raise ConfigError("student", "is required with an analytic teacher (e.g. kind: mlp)")
    config = copy.deepcopy(teacher.config)
    if config.prediction == "eps" and not eps_distillable(config):
        config.prediction = "v"
    return method_spec(job.method).student(config)


def starts_from_teacher(config: ModelConfig, teacher: Checkpoint) -> bool:
    """Whether the student starts as a copy of the teacher: same network kind and the same
    parameterization. The teacher's weights in a student that reads its output as another
    prediction (eps as v) would start it as another function, so it starts fresh instead."""
    return teacher.config.kind == config.kind and teacher.config.prediction == config.prediction


def build_student(config: ModelConfig, teacher: Checkpoint, seed: int) -> nn.Module:
    """A fresh student, initialised from the teacher's weights when `starts_from_teacher` (a new w
    embedding stays zero-initialised, so the student starts as the w = 0 teacher); what is not
    copied is drawn from its own stream of `seed` (the same on every rank), not torch's global
    generator. A student that is all teacher is built straight from copies of its weights (which
    must fit it: check_job's check_fits)."""
    if starts_from_teacher(config, teacher) and not config.w_conditioned:
        return network_holding(config, {name: value.detach().clone() for name, value in
                                        teacher.network.state_dict().items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, STUDENT_STREAM))
        student = build_network(config)
    if starts_from_teacher(config, teacher):
        check_fits(student, teacher)
        student.load_state_dict(teacher.network.state_dict(), strict=False)
    return student


def check_fits(student: nn.Module, teacher: Checkpoint) -> None:
    """A student that starts from the teacher's weights must hold every one of them, in its shape,
    and nothing else but its w inputs (works on networks built on the meta device)."""
    mine = {name: tuple(value.shape) for name, value in student.state_dict().items()}
    theirs = {name: tuple(value.shape) for name, value in teacher.network.state_dict().items()}
    extra = [name for name in mine.keys() - theirs.keys() if not name.startswith(student.W_INPUTS)]
    other = [name for name in mine.keys() & theirs.keys() if mine[name] != theirs[name]]
    if extra or theirs.keys() - mine.keys() or other:
        raise ConfigError("student", "does not match the teacher's network, so it cannot start "
                                     "from the teacher's weights (leave `student` unset to copy it)")


def check_lora(job: TrainJob, teacher: Checkpoint, config: ModelConfig) -> None:
    """Adapters (memory.lora) train on the teacher's weights, in one round, without an EMA."""
    lora = job.memory.lora
    if not lora.rank:
        return
    spec = method_spec(job.method)
    unknown = sorted(set(lora.modules or ()) - set(spec.modules))
    if unknown:
        raise ConfigError("memory.lora.modules", f"{unknown[0]} is not a module of method "
                                                 f"{job.method} (its modules: {list(spec.modules)})")
    if config.kind not in ("unet", "diffusers"):
        raise ConfigError("memory.lora", f"the student is a {config.kind} network; adapters go "
                                         "on the built-in UNet and diffusers UNets")
    if not starts_from_teacher(config, teacher):
        raise ConfigError("memory.lora", "needs a student that starts from the teacher's weights "
                                         "(the adapters train on them, frozen)")
    if spec.total_steps(job) != spec.round_length(job)[1]:
        raise ConfigError("memory.lora", f"trains one round; this {job.method} job has several "
                                         "(each round would start from the last one's student "
                                         "with its adapters merged)")
    if job.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay", "must be 0 with memory.lora (the average would be a "
                                             "full copy of the student, which adapters avoid)")
    add_adapters(build_network(config, meta=True), "student", lora, config.kind)  # targets match


def check_warmup(job: TrainJob) -> None:
    """Each module's warm-up (counted in its own updates) must end inside a round: a round of
    `round_length` steps makes that many times the module's updates per step."""
    spec = method_spec(job.method)
    key, round_length = spec.round_length(job)
    for module, per_step in spec.updates_per_step(job).items():
        given = job.optim.modules.get(module)
        warmup_key = f"optim.modules.{module}.warmup_steps" if given is not None and \
            given.warmup_steps is not None else "optim.warmup_steps"
        warmup, updates = job.optim.for_module(module).warmup_steps, round_length * per_step
        if warmup >= updates:
            count = f"{key} = {round_length}" if per_step == 1 else \
                f"the {updates} updates of {module} in {key} = {round_length} steps " \
                f"({per_step} a step)"
            raise ConfigError(warmup_key, f"is {warmup}, not below {count}: the learning rate "
                                          "would never leave warm-up")


def read_pair_set(path: str) -> PairSet:
    from raydistill.pairs.format import ShardError
    from raydistill.pairs.manifest import read_run
    from raydistill.pairs.reader import open_pairs

    try:
        location, manifest, layout = open_pairs(path)
    except ShardError as err:
        raise ConfigError("pairs", str(err)) from None
    return PairSet(read_run(location)["identity"], layout.mode, layout.text, len(manifest.rows),
                   sum(int(r["count"]) for r in manifest.rows.values()))


def prepare(job: TrainJob) -> Plan:
    """Every check that needs the teacher, the data or the pair set, done on the driver."""
    teacher = load_teacher(job.teacher)
    return check_job(job, teacher, (lambda: read_pair_set(job.pairs)) if job.pairs else None)


def check_job(job: TrainJob, teacher: Checkpoint,
              pairs: Callable[[], PairSet] | None) -> Plan:
    """Every check of `job` against its teacher and the pair set it reads, whether they exist or
    are what earlier stages will make (raydistill.pipeline.plan). `pairs` reads that pair set
    when its turn comes, after the job's own checks; None: it reads none, or none can be there
    yet (their teacher is not trained)."""
    spec = method_spec(job.method)
    check_warmup(job)
    config = student_config(job, teacher)
    require_distillable(config)
    if job.memory.activation_checkpointing and config.kind not in ("unet", "diffusers"):
        raise ConfigError("memory.activation_checkpointing",
                          f"the student is a {config.kind} network, which has no blocks to "
                          "recompute (the built-in UNet and diffusers UNets have)")
    check_lora(job, teacher, config)
    if model_data_shape(config) != teacher.data_shape:
        raise ConfigError("student", f"denoises samples of shape {model_data_shape(config)}, the "
                                     f"teacher {teacher.data_shape}")
    if starts_from_teacher(config, teacher):
        check_fits(build_network(config, meta=True), teacher)
    teacher.sampling.check_guidance(job.guidance.w_min, job.guidance.w_max, "guidance")
    world = job.workers.num * job.deepspeed.grad_accum
    if job.optim.batch_size % world:
        raise ConfigError("optim.batch_size", f"{job.optim.batch_size} is not divisible by "
                                              f"workers.num x deepspeed.grad_accum = {world}")
    unknown = sorted(set(job.optim.modules) - set(spec.modules))
    if unknown:
        raise ConfigError(f"optim.modules.{unknown[0]}", f"is not a module of method {job.method} "
                                                         f"(its modules: {list(spec.modules)})")
    spec.check(job, teacher, config)
    plan = Plan(teacher, config)
    streams = spec.streams(job)
    if PAIRS in streams and pairs is not None:
        pair_set = pairs()
        _check_pairs(job, teacher, pair_set)
        plan.pairs_rows = pair_set.rows
    if DATA not in streams:
        return plan
    if job.data.source == "mixture":
        if teacher.config.kind != "gmm":
            raise ConfigError("data.source", "mixture needs an analytic (gmm) teacher")
    else:
        data = with_teacher_shape(job, teacher).data
        image_shape = teacher.conditioning.image_shape
        if (data.channels, data.resolution, data.resolution) != image_shape:
            raise ConfigError("data", f"{data.channels}x{data.resolution}x{data.resolution} images "
                                      f"do not fit the teacher's {image_shape}")
        if data.source == "webdataset":
            from raydistill.data.ray_source import tar_shards
            require_shards_per_worker(len(tar_shards(data)), job.workers.num, "data.path")
    return plan


def _check_pairs(job: TrainJob, teacher: Checkpoint, pairs: PairSet) -> None:
    """The pair set must hold this method's targets, made by this teacher over this job's w range
    (its pairs.json identity), and pass the method's own checks."""
    spec, identity = method_spec(job.method), pairs.identity
    if pairs.mode != spec.pairs_mode:
        raise ConfigError("pairs", f"{job.pairs} holds {pairs.mode} pairs; method {job.method} "
                                   f"needs {spec.pairs_mode} pairs")
    text = teacher.conditioning.text
    if pairs.text != text:
        raise ConfigError("pairs", f"{job.pairs} holds pairs of a "
                                   f"{'text' if pairs.text else 'class'}-conditioned model; the "
                                   f"teacher is {'text' if text else 'class'}-conditioned")
    if identity["teacher_fingerprint"] != teacher.fingerprint:
        raise ConfigError("pairs", f"{job.pairs} was made by teacher "
                                   f"{identity['teacher_fingerprint'][:16]}, the configured teacher "
                                   f"is {teacher.fingerprint[:16]}")
    made = identity["guidance"]
    if (made["w_min"], made["w_max"]) != (job.guidance.w_min, job.guidance.w_max):
        raise ConfigError("guidance", f"is [{job.guidance.w_min:g}, {job.guidance.w_max:g}], but "
                                      f"{job.pairs} holds targets for w in [{made['w_min']:g}, "
                                      f"{made['w_max']:g}]")
    spec.check_pairs(job, identity)
    require_shards_per_worker(pairs.shards, job.workers.num, "pairs")


def student_record(job: TrainJob, teacher: Checkpoint, index: int) -> dict:
    """What the checkpoint of the student after round `index` (-1: the last) records: the method's
    record, the teacher's fingerprint, and what the student is sampled with (a text teacher's
    prompt table, a latent teacher's autoencoder)."""
    return {**method_spec(job.method).record(job, index),
            "teacher_fingerprint": teacher.fingerprint, **teacher.conditioning.record()}


def build_method(job: TrainJob, teacher: Checkpoint, config: ModelConfig,
                 device: torch.device) -> Method:
    """The method with its student (on `device`) and the frozen teacher, whose evaluations it
    counts; its trained networks get adapters where memory.lora says, and recompute their
    activations if memory.activation_checkpointing says so. The teacher is in no optimizer, and
    held in bf16 when training in bf16 (after the modules that start from its weights have
    copied them in fp32)."""
    teacher.network.to(device).requires_grad_(False).eval()
    student = build_student(config, teacher, job.seed).to(device)
    method = method_spec(job.method).build(job, teacher, config, student)
    lora = job.memory.lora
    if lora.rank:
        for name, network in method.modules().items():
            if lora.modules is None or name in lora.modules:
                add_adapters(network, name, lora, config.kind)
    if job.memory.activation_checkpointing:
        for name, network in method.modules().items():
            checkpoint_activations(network, name)
    method.count_evaluations(teacher.denoiser)
    if job.deepspeed.precision == "bf16" and teacher.config.kind != "gmm":
        teacher.network.to(torch.bfloat16)
    return method


def with_teacher_shape(job: TrainJob, teacher: Checkpoint) -> TrainJob:
    """The job with data.channels set from the teacher (Ray Data batches need one channel count)."""
    if teacher.config.kind == "gmm" or job.data.channels:
        return job
    return dataclasses.replace(job, data=dataclasses.replace(job.data,
                                                             channels=teacher.conditioning.image_shape[0]))
