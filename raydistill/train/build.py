"""From a TrainJob to a teacher, a student and a method; and every check that can fail before any
worker starts (the driver runs `prepare`, workers rebuild the same objects with `build_method`)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.methods import GuidedDistillation, Method, ProgressiveDistillation, round_steps
from raydistill.models.checkpoint import Checkpoint, build_network, load_teacher, model_data_shape

# Pair-shard modes that carry each method's targets.
PAIRS_MODE = {"guided": "guided", "progressive": "progressive"}


@dataclass
class Plan:
    """What the driver checked: the teacher, the student's config and the pair set, if any."""

    teacher: Checkpoint
    student_config: ModelConfig
    pairs_rows: int = 0


def student_config(job: TrainJob, teacher: Checkpoint) -> ModelConfig:
    """The configured student, or the teacher's own network (with a w input for stage 1)."""
    if job.student is not None:
        return job.student
    if teacher.config.kind == "gmm":
        raise ConfigError("student", "is required with an analytic teacher (e.g. kind: mlp)")
    config = copy.deepcopy(teacher.config)
    if job.method == "guided":
        if config.kind == "unet":
            config.unet.w_embedding = True
        else:
            config.mlp.w_embedding = True
    return config


def build_student(config: ModelConfig, teacher: Checkpoint) -> nn.Module:
    """A fresh student, initialised from the teacher's weights when the networks match (a new w
    embedding stays zero-initialised, so the student starts as the w = 0 teacher)."""
    student = build_network(config)
    if teacher.config.kind != config.kind:
        return student
    missing, unexpected = student.load_state_dict(teacher.network.state_dict(), strict=False)
    if unexpected or any(not name.startswith("w_mlp.") for name in missing):
        raise ConfigError("student", "does not match the teacher's network, so it cannot start "
                                     "from the teacher's weights (leave `student` unset to copy it)")
    return student


def prepare(job: TrainJob) -> Plan:
    """Every check that needs the teacher, the data or the pair set, done on the driver."""
    teacher = load_teacher(job.teacher)
    config = student_config(job, teacher)
    if model_data_shape(config) != teacher.data_shape:
        raise ConfigError("student", f"denoises samples of shape {model_data_shape(config)}, the "
                                     f"teacher {teacher.data_shape}")
    build_student(config, teacher)
    teacher.check_guidance(job.guidance.w_min, job.guidance.w_max, "guidance")
    world = job.workers.num * job.deepspeed.grad_accum
    if job.optim.batch_size % world:
        raise ConfigError("optim.batch_size", f"{job.optim.batch_size} is not divisible by "
                                              f"workers.num x deepspeed.grad_accum = {world}")
    if job.method == "guided" and not config.w_conditioned:
        raise ConfigError("student", "a guided (stage-1) student must take w as an input "
                                     "(w_embedding: true)")
    if job.method == "progressive":
        _check_progressive(job, teacher, config)
    plan = Plan(teacher, config)
    if job.pairs:
        plan.pairs_rows = _check_pairs(job, teacher)
    elif job.data.source == "mixture":
        if teacher.config.kind != "gmm":
            raise ConfigError("data.source", "mixture needs an analytic (gmm) teacher")
    else:
        data = with_teacher_shape(job, teacher).data
        if (data.channels, data.resolution, data.resolution) != teacher.data_shape:
            raise ConfigError("data", f"{data.channels}x{data.resolution}x{data.resolution} images "
                                      f"do not fit the teacher's {teacher.data_shape}")
    return plan


def _check_progressive(job: TrainJob, teacher: Checkpoint, config: ModelConfig) -> None:
    made_by = teacher.extra.get("method")
    if made_by == "progressive" and teacher.extra.get("steps") != job.halving.start_steps:
        raise ConfigError("halving.start_steps", f"is {job.halving.start_steps}, but the teacher is "
                                                 f"a {teacher.extra.get('steps')}-step progressive "
                                                 "student")
    if teacher.extra.get("stochastic") and not job.halving.stochastic:
        raise ConfigError("halving.stochastic", "is false, but the teacher is a student of the "
                                                "stochastic sampler (its jumps are 1/N, not 1/(2N))")
    if not config.w_conditioned and job.guidance.w_min != job.guidance.w_max:
        raise ConfigError("guidance", "a student without a w input distils one guidance strength: "
                                      "set w_min = w_max")


def _check_pairs(job: TrainJob, teacher: Checkpoint) -> int:
    """The pair set must hold this method's targets, made by this teacher (pairs.json identity)."""
    from raydistill.pairs.format import ShardError
    from raydistill.pairs.manifest import read_run
    from raydistill.pairs.reader import open_pairs

    try:
        location, manifest, mode = open_pairs(job.pairs)
    except ShardError as err:
        raise ConfigError("pairs", str(err)) from None
    identity = read_run(location)["identity"]
    if mode != PAIRS_MODE[job.method]:
        raise ConfigError("pairs", f"{job.pairs} holds {mode} pairs; method {job.method} needs "
                                   f"{PAIRS_MODE[job.method]} pairs")
    if identity["teacher_fingerprint"] != teacher.fingerprint:
        raise ConfigError("pairs", f"{job.pairs} was made by teacher "
                                   f"{identity['teacher_fingerprint'][:16]}, the configured teacher "
                                   f"is {teacher.fingerprint[:16]}")
    if job.method == "progressive":
        rounds, made_for = round_steps(job.halving), identity["student_steps"]
        if rounds != [made_for]:
            raise ConfigError("pairs", f"{job.pairs} holds targets for {made_for}-step students: "
                                       f"train that one round (halving.start_steps={2 * made_for} "
                                       f"halving.end_steps={made_for})")
    return sum(int(r["count"]) for r in manifest.rows.values())


def build_method(job: TrainJob, teacher: Checkpoint, config: ModelConfig,
                 device: torch.device) -> Method:
    """The method with its student (on `device`) and the frozen teacher."""
    teacher.network.to(device).requires_grad_(False).eval()
    student = build_student(config, teacher).to(device)
    schedule = teacher.denoiser.schedule
    if job.method == "guided":
        return GuidedDistillation(teacher=teacher.w_denoiser, student=student, student_config=config,
                                  schedule=schedule, guidance=job.guidance,
                                  weighting=job.loss_weighting, steps=job.optim.steps)
    return ProgressiveDistillation(teacher=teacher.w_denoiser, student=student, student_config=config,
                                   schedule=schedule, guidance=job.guidance, halving=job.halving,
                                   weighting=job.loss_weighting,
                                   teacher_is_stochastic=bool(teacher.extra.get("stochastic")))


def with_teacher_shape(job: TrainJob, teacher: Checkpoint) -> TrainJob:
    """The job with data.channels set from the teacher (Ray Data batches need one channel count)."""
    if teacher.config.kind == "gmm" or job.data.channels:
        return job
    return dataclasses.replace(job, data=dataclasses.replace(job.data,
                                                             channels=teacher.data_shape[0]))
