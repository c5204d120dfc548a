"""Metrics where people look: TensorBoard event files (tensorboardX, no TensorFlow).

A training run writes every logged step's numbers to DIR/tensorboard/ as they are logged, beside
DIR/train_log.jsonl (the same numbers); the pipeline writes its evaluation there too. Point
TensorBoard at a run, or at a pipeline directory to see all its stages:

    tensorboard --logdir runs/digits
"""

from __future__ import annotations

import math
import os
import shutil
import time
from numbers import Real
from typing import Any

DIRECTORY = "tensorboard"
#: logged values that are bookkeeping (wall-clock stamps, the step itself), not curves
NOT_CURVES = ("step", "round", "total", "start", "loop_at", "logged_at")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite real numbers of a logged row that make curves (not the step, not time stamps)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
            and key not in NOT_CURVES and not key.endswith("_at")}


class EventWriter:
    """Scalars per step into `directory` (created). A run resumed from step S passes
    `purge_step=S`: TensorBoard then drops what an earlier attempt logged from S on, so a curve
    never shows the replayed steps twice."""

    def __init__(self, directory: str, *, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        os.makedirs(directory, exist_ok=True)
        # File names carry the second they were opened in: a nanosecond suffix keeps two writers
        # of one second (a quick retry) from sharing a file, and sorts them in opening order.
        # The queue to tensorboardX's writing thread is unbounded (max_queue 0): that thread dies
        # on a write error it cannot report (a full disk), and a bounded queue would then block
        # the training loop forever at its next logged step, the other ranks waiting on it; this
        # way the run goes on to its own next write, which fails and stops it with one line.
        self._writer = SummaryWriter(directory, purge_step=purge_step, flush_secs=10, max_queue=0,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")

    def write(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(f"{prefix}{key}", value, global_step=step)

    def close(self) -> None:
        self._writer.close()


#: numbers of an evaluation row that are its coordinates or cost, not scores
NOT_SCORES = ("steps", "nfe", "samples", "seconds", "kid_std")


def write_evaluation(rows: list[dict[str, Any]], directory: str) -> None:
    """An evaluation's scores as curves against NFE, one per sampler row name and solver
    (`fid/dmd-renoise`, `fid/ddim-ddim`), replacing the events an earlier write left in
    `directory`."""
    shutil.rmtree(directory, ignore_errors=True)
    writer = EventWriter(directory)
    for row in sorted(rows, key=lambda r: r["nfe"]):
        scores = {key: value for key, value in row.items() if key not in NOT_SCORES}
        for key, value in scalars(scores).items():
            writer.write({f"{key}/{row['name']}-{row['solver']}": value}, row["nfe"])
    writer.close()
