"""The exact-resume tests' harness: train a job in this process (a world of one) keeping every
checkpoint, then train it again from one of them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from raydistill.config import TrainJob
from raydistill.train.build import Plan
from raydistill.train.driver import setup_worker
from raydistill.train.loop import WorkerContext, run_worker


def train_in_process(job: TrainJob, plan: Plan, report: Callable[[dict, str], None],
                     restored: str | None = None,
                     logged: Callable[[dict], None] | None = None) -> None:
    setup = setup_worker(job, plan.student_config, 0, 1)
    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, report, restored, logged=logged),
               plan.student_config, setup.teacher)


@dataclass
class Resumed:
    losses: dict[int, object]           # what the uninterrupted run logged, by step
    resumed_losses: dict[int, object]   # what the run restored from `checkpoints[at]` logged
    checkpoints: dict[int, str]         # the uninterrupted run's checkpoints, by step
    resumed: str                        # the restored run's last checkpoint


def run_and_resume(job: TrainJob, plan: Plan, directory: str, at: int,
                   losses: Callable[[dict], object]) -> Resumed:
    """Train `job` to the end, then again from its step-`at` checkpoint; `losses(metrics)` is
    what each logged step keeps."""
    logs: tuple[dict, dict] = ({}, {})
    checkpoints: dict[int, str] = {}

    def keep(metrics: dict, checkpoint: str) -> None:
        checkpoints[metrics["step"]] = os.path.join(directory, f"step{metrics['step']}")
        shutil.copytree(checkpoint, checkpoints[metrics["step"]], dirs_exist_ok=True)

    def keep_last(metrics: dict, checkpoint: str) -> None:
        if checkpoint:
            shutil.copytree(checkpoint, resumed, dirs_exist_ok=True)

    train_in_process(job, plan, keep, logged=lambda m: logs[0].update({m["step"]: losses(m)}))
    resumed = os.path.join(directory, "resumed")
    train_in_process(job, plan, keep_last, checkpoints[at],
                     logged=lambda m: logs[1].update({m["step"]: losses(m)}))
    return Resumed(logs[0], logs[1], checkpoints, resumed)
