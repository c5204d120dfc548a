"""Errors of a training run, by what a retry would do."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from raydistill.config import ConfigError, TrainJob

#: errno values of a write that found no room (a full file system, a full quota)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class FatalTrainingError(RuntimeError):
    """An error that would happen again on every retry (a non-finite loss streak, too little
    data): the run stops at once with it instead of restarting from its last checkpoint."""


class TrainingFailed(RuntimeError):
    """The run stopped (a fatal error, or worker failures beyond max_failures); its checkpoints
    remain, and `--resume` continues it."""


@dataclass(frozen=True)
class Repeating:
    """Why a retry from the last checkpoint would fail again, in one line, and whether `--resume`
    can continue the run once that is mended (False: the job's own settings must change, which a
    resumed run keeps)."""

    cause: str
    resumable: bool = True


def repeating_cause(err: BaseException, job: TrainJob) -> Repeating | None:
    """Why a worker's error would happen again on a retry from the last checkpoint, or None if
    a retry may succeed (a worker lost with its node, a transient fault).

    Repeating: a FatalTrainingError or ConfigError; a full disk or quota; CUDA out of memory;
    host memory exhausted (Ray's memory monitor stopping a worker)."""
    import ray.exceptions
    import torch

    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        err = err.cause                  # the worker's own exception, with its errno and file
    if isinstance(err, FatalTrainingError):
        return Repeating(str(err))
    if isinstance(err, ConfigError):
        return Repeating(str(err), resumable=False)
    if isinstance(err, OSError) and (err.errno in NO_SPACE or "No space left" in str(err)):
        where = f" writing {err.filename}" if err.filename else ""
        return Repeating(f"no space left on the device{where}: free some space")
    if isinstance(err, torch.OutOfMemoryError):
        micro = job.micro_batch(job.workers.num)
        return Repeating(
            f"CUDA out of memory with {micro} samples per GPU per micro-batch (optim.batch_size "
            f"{job.optim.batch_size} over {job.workers.num} workers and deepspeed.grad_accum "
            f"{job.deepspeed.grad_accum}), ZeRO-{job.deepspeed.zero_stage}, "
            f"{job.deepspeed.precision}: raise deepspeed.grad_accum or deepspeed.zero_stage, "
            "lower optim.batch_size, or train in bf16", resumable=False)
    if isinstance(err, ray.exceptions.OutOfMemoryError) or "memory pressure" in str(err):
        return Repeating(f"a worker ran out of host memory (Ray's memory monitor stopped it): "
                         f"give the nodes more memory, or train with fewer workers per node "
                         f"(workers.num {job.workers.num}) or a lower optim.batch_size "
                         f"({job.optim.batch_size})")
    return None
