"""What a training worker measures and where it goes: the loss window summed on the device, and
each logged step's metrics to the run's log, TensorBoard and the driver's progress bar.

train_log.jsonl holds one JSON line per logged step: step, round, loss (the mean finite loss of
the window's micro-batches of the student's phase, all ranks) and, for a method with several phases
or values, <phase>/<value> (e.g. generator/loss_dm, fake_score/loss), nan_skipped (micro-batches
whose loss was not finite, so far), grad_skipped (updates skipped), samples/s, lr (the student's;
<module>/lr for the others), data_wait (the fraction of the window rank 0 spent waiting for data:
near 0 unless input-bound), teacher_evaluations (samples the frozen teacher evaluated so far, all
ranks; a resumed run counts the path it replays once), bytes/<name> (rank 0's weights and optimizer
state per module, and each frozen network; host_bytes/<name>, the part of it ZeRO-Offload keeps in
host memory when training on GPUs), checkpoint_s and checkpoint_bytes (the last checkpoint's
seconds of stopped training and its bytes on disk, from the step after the first), ...
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from raydistill.config import TrainJob
from raydistill.events import EventWriter
from raydistill.methods import Method
from raydistill.train.checkpointer import Progress
from raydistill.train.engine import state_bytes, tensor_bytes


class LossWindow:
    """A logging window's loss values, per phase, summed on the device: no host round trip per
    micro-batch, one all-reduce and one copy to the host per window (`read`). A phase's slot holds
    its non-finite count, its finite count and the sum of each value it returns over its finite
    micro-batches."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(0, dtype=torch.float64, device=device)
        self.slots: dict[str, tuple[int, list[str]]] = {}      # phase -> (offset, value names)

    def add(self, phase: str, values: dict[str, Tensor]) -> Tensor:
        """Count a micro-batch's `values` (its "loss" and metrics); the factor to multiply the loss
        by before backward: 1, or NaN when the loss is not finite, which makes every gradient NaN
        so that the optimizer's overflow check skips the update on every rank (a finite loss's
        gradients are unchanged: x * 1.0 == x)."""
        if phase not in self.slots:
            self.slots[phase] = (len(self.sums), list(values))
            self.sums = torch.cat([self.sums, self.sums.new_zeros(2 + len(values))])
        offset, names = self.slots[phase]
        loss = values["loss"].detach()
        finite = torch.isfinite(loss)
        row = torch.stack([(~finite).double(), finite.double(),
                           *(torch.where(finite, values[name].detach(), 0.0).double()
                             for name in names)])
        self.sums[offset:offset + len(row)] += row
        return torch.where(finite, 1.0, torch.nan).to(loss.dtype)

    def read(self, *counts: float) -> tuple[dict[str, float], int, list[float]]:
        """Each value's mean over the window's finite micro-batches of all ranks, by
        "<phase>/<name>" (NaN if there was none), the number of non-finite losses, and `counts`
        (this rank's) summed over ranks in the same all-reduce; starts a new window."""
        sums = torch.cat([self.sums, torch.tensor(counts, dtype=torch.float64).to(self.sums)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        values, means, non_finite = sums.tolist(), {}, 0
        for phase, (offset, names) in self.slots.items():
            bad, good, *totals = values[offset:offset + 2 + len(names)]
            non_finite += int(bad)
            means.update({f"{phase}/{name}": total / good if good else math.nan
                          for name, total in zip(names, totals)})
        return means, non_finite, values[len(self.sums):]


class MetricsSink:
    """One worker's measurements: the loss window (`window`), time spent waiting for data
    (`waiting`), the state's bytes (`measure_memory`, after the first update), and each logged
    step's metrics (`collect`), which rank 0 appends to `log_path`, writes as TensorBoard events
    under `events` and hands to `logged` (the driver's progress bar)."""

    def __init__(self, *, job: TrainJob, method: Method, engines: dict, rank: int,
                 device: torch.device, log_path: str, first_step: int, stop: int,
                 logged: Callable[[dict], None] | None = None, events: str | None = None,
                 reached: dict[str, float] | None = None, resumed: bool = False):
        self.job, self.method, self.engines, self.rank = job, method, engines, rank
        self.log_path, self.first_step, self.stop, self.logged = log_path, first_step, stop, logged
        self.reached = reached or {}
        self.events = EventWriter(events, purge_step=first_step if resumed else None) \
            if rank == 0 and events else None
        self.window = LossWindow(device)
        self.student_phase = next(p.name for p in method.phases()
                                  if p.module == method.student_module)
        self.started = self.window_start = time.time()
        self.window_steps, self.waited, self.memory = 0, 0.0, {}
        self.last_checkpoint: dict[str, float] = {}

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time spent in the block as waiting for data."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - start

    def stepped(self) -> None:
        """Count a finished step; the first one measures the state's bytes (optimizers allocate
        theirs at their first update)."""
        self.window_steps += 1
        if not self.memory:
            self.memory = {f"bytes/{name}": state_bytes(engine)
                           for name, engine in self.engines.items()}
            for name, engine in self.engines.items():
                host = state_bytes(engine, "cpu") if engine.device.type != "cpu" else 0
                if host:                                   # what ZeRO-Offload keeps on the host
                    self.memory[f"host_bytes/{name}"] = host
            self.memory.update({f"bytes/{name}": tensor_bytes(module)
                                for name, module in self.method.frozen_modules().items()})

    def checkpointed(self, seconds: float, size: int) -> None:
        """The last checkpoint's cost, logged from the next step on: the seconds it stopped
        training for and its bytes on disk."""
        self.last_checkpoint = {"checkpoint_s": seconds, "checkpoint_bytes": size}

    def collect(self, progress: Progress, round_name: str) -> dict:
        """The logged step's metrics (a collective: every rank calls it), counting the window's
        skipped micro-batches and teacher evaluations into `progress`; starts a new window."""
        now, job = time.time(), self.job
        elapsed = max(now - self.window_start, 1e-9)
        means, non_finite, (evaluations,) = self.window.read(
            self.method.take_teacher_evaluations())
        progress.nan_skipped += non_finite
        progress.teacher_evaluations += int(evaluations)
        student = self.method.student_module
        metrics = {"step": progress.step, "round": round_name,
                   "loss": means[f"{self.student_phase}/loss"],
                   **(means if len(means) > 1 else {}),
                   "samples_per_s": self.window_steps * job.optim.batch_size / elapsed,
                   "lr": self.engines[student].get_lr()[0],
                   **{f"{name}/lr": engine.get_lr()[0] for name, engine in self.engines.items()
                      if name != student},
                   "data_wait": self.waited / elapsed,
                   "nan_skipped": progress.nan_skipped, "grad_skipped": progress.grad_skipped,
                   "resumes": progress.resumes, "elapsed_s": now - self.started,
                   "run_samples_per_s": (progress.step - self.first_step) * job.optim.batch_size
                   / max(now - self.started, 1e-9),
                   "teacher_evaluations": progress.teacher_evaluations, **self.memory,
                   **self.last_checkpoint,
                   **{f"{name}_at": at for name, at in self.reached.items()},
                   "loop_at": self.started, "logged_at": now}
        self.window_start, self.window_steps, self.waited = now, 0, 0.0
        if self.rank == 0:
            self._publish(metrics)
        return metrics

    def _publish(self, metrics: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.events is not None:
            self.events.write(metrics, metrics["step"])
        if self.logged is not None:
            self.logged({**metrics, "total": self.stop, "start": self.first_step})

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

