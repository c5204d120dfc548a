"""The loop each training worker runs. It knows engines, rounds, checkpoints and metrics, never the
method's math: it asks the method for its modules, phases, rounds and `loss(batch, phase)`.
`Trainer` hands the work to its parts: the engines (raydistill.train.engine), a `RoundSchedule`,
a `Checkpointer` (raydistill.train.checkpointer: what a checkpoint holds, save, restore, the
student's export) and a `MetricsSink` (raydistill.train.metrics: the loss window, the run's log,
TensorBoard, the progress bar); `Trainer.train_step` is one step of the algorithm.

A restored run continues exactly where the checkpoint was taken: the engines' states, the EMA,
each rank's data positions, and the method's draws (seeded per step from (seed, rank, step)).

A step runs the method's phases in order; a phase makes `updates` optimizer updates of its module,
each of grad_accum micro-batches reading one batch from each stream the phase names (a phase that
reads none consumes no data). Each module's LR schedule follows its own updates, and while a phase
runs only its module's parameters take gradients and only its module is called through its
engine (`GradientScope`): a loss that passes through another module (DMD2's GAN loss through the
fake score) neither updates it nor fires its DeepSpeed hooks.

Per step the loop waits on the host for nothing but the optimizer's overflow check: losses and
non-finite counts are summed on the device and read once per logging window (`LossWindow`). A
non-finite loss is multiplied into NaN gradients, so the update it belongs to (with its
accumulation siblings) is skipped by the optimizer's check, which sees the all-reduced gradients
and so skips on every rank alike (DeepSpeed's own check at ZeRO 1-3 and under bf16, FiniteAdamW
at ZeRO-0 in fp32: raydistill.train.engine); gradients non-finite behind a finite loss are skipped
the same way. That check is one host sync per update, which DeepSpeed's optimizers make in any
case. `max_nan_steps` skipped updates in a row stop the run with an error naming the step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from raydistill.config import ModelConfig, TrainJob
from raydistill.methods import Method, Phase
from raydistill.methods.base import Round
from raydistill.models.checkpoint import Checkpoint
from raydistill.seeds import METHOD_STREAM, derive_seed
from raydistill.train.checkpointer import Checkpointer, Progress, directory_bytes
from raydistill.train.engine import StudentEMA, build_engine, evaluated_in_fp32, load_full_weights
from raydistill.train.errors import FatalTrainingError
from raydistill.train.metrics import MetricsSink
from raydistill.train.stream import Stream


class NonFiniteLoss(FatalTrainingError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    #: every rank hands it each checkpoint: the metrics of its step and the directory (Ray Train
    #: blocks a report until its controller has taken the previous one, so only checkpoints are
    #: reported: per logging window that wait would cost up to a controller poll per window)
    report: Callable[[dict, str], None]
    restored: str | None = None                    # checkpoint directory to resume from
    #: where every rank writes the checkpoint of a step, which `report` then owns (the run's
    #: storage, so it is written once); None: a temporary directory, removed after `report`
    place: Callable[[int], str] | None = None
    #: a reported checkpoint's bytes in storage, every rank's files (`report` may have moved a
    #: directory away: an upload deletes its local copy); default: the directory's files
    measure: Callable[[str], int] = directory_bytes
    #: rank 0 hands it each logged step's metrics, with "total" and "start" (the step this
    #: attempt started from) added; the driver shows them (raydistill.train.progress)
    logged: Callable[[dict], None] | None = None
    #: wall-clock times (time.time()) the worker reached before the loop, reported with every
    #: step as <name>_at (the driver's start-up breakdown)
    reached: dict[str, float] = field(default_factory=dict)
    #: where rank 0 writes each logged step's numbers as TensorBoard events (raydistill.events)
    events: str | None = None


@dataclass
class RoundSchedule:
    """The method's rounds laid end to end in steps, and the step this run stops at (`until`,
    or the end of the last round)."""

    rounds: list[Round]
    stop: int

    @classmethod
    def of(cls, method: Method, until: int | None) -> RoundSchedule:
        rounds = method.rounds()
        total = sum(r.steps for r in rounds)
        return cls(rounds, min(until, total) if until else total)

    def index_at(self, step: int) -> int:
        """The round step `step` (counted from 0) belongs to."""
        ends = itertools.accumulate(r.steps for r in self.rounds)
        return next(i for i, end in enumerate(ends) if step < end)

    def start(self, index: int) -> int:
        """The first step of round `index`."""
        return sum(r.steps for r in self.rounds[:index])


def run_worker(job: TrainJob, method: Method, streams: dict[str, Stream], ctx: WorkerContext,
               student_config: ModelConfig, teacher: Checkpoint) -> None:
    """Train `method` to the end of its rounds, reading `streams` by name, checkpointing and
    reporting through `ctx`. Each student saved records `teacher`'s fingerprint (and what it is
    sampled with: a text teacher's prompt table, a latent teacher's autoencoder)."""
    Trainer(job, method, streams, ctx, student_config, teacher).run()


class Trainer:
    """One worker's training run, built from its parts (see the module docstring)."""

    def __init__(self, job: TrainJob, method: Method, streams: dict[str, Stream],
                 ctx: WorkerContext, student_config: ModelConfig, teacher: Checkpoint):
        self.job, self.method, self.streams, self.ctx = job, method, streams, ctx
        self.schedule = RoundSchedule.of(method, job.until)
        self.phases = method.phases()
        updates = updates_per_step(self.phases, method.modules(), streams)
        method.micro_batch = job.micro_batch(ctx.world_size)
        first_round = self.schedule.rounds[0].steps
        self.engines = {name: build_engine(module, job, job.optim.for_module(name),
                                           ctx.world_size, first_round * updates[name],
                                           ctx.device.type == "cuda", method.lr_scales.get(name))
                        for name, module in method.modules().items()}
        self.scope = GradientScope(method, self.engines)
        method.precise = precise_evaluations(method, self.engines, job, ctx.rank)
        self.student = method.student_module
        self.ema = StudentEMA(self.engines[self.student].module, job.optim.ema_decay) \
            if job.optim.ema_decay > 0 else None
        self.checkpointer = Checkpointer(
            job=job, rank=ctx.rank, engines=self.engines, student=self.student, ema=self.ema,
            streams=streams, student_config=student_config, teacher=teacher, report=ctx.report,
            place=ctx.place, measure=ctx.measure)
        self.progress, self.round_weights = Progress(method=job.method), {}
        if ctx.restored:
            self.progress, self.round_weights = self.checkpointer.restore(ctx.restored)
        method.start_round(self.progress.round, self.round_weights)
        for stream in streams.values():
            stream.on(ctx.device)
        self.skip_streak = 0
        self.sink = MetricsSink(job=job, method=method, engines=self.engines, rank=ctx.rank,
                                device=ctx.device, log_path=self.checkpointer.log_path,
                                first_step=self.progress.step, stop=self.schedule.stop,
                                logged=ctx.logged, events=ctx.events, reached=ctx.reached,
                                resumed=bool(ctx.restored))

    def run(self) -> None:
        job, progress, stop = self.job, self.progress, self.schedule.stop
        try:
            while progress.step < stop:
                self.enter_round(self.schedule.index_at(progress.step))
                self.train_step()
                self.sink.stepped()
                is_checkpoint = progress.step % job.checkpoint_every == 0 or progress.step == stop
                if progress.step % job.log_every == 0 or progress.step == stop or is_checkpoint:
                    metrics = self.sink.collect(progress, self.round_name)
                    if is_checkpoint:
                        self.checkpoint(metrics)
        finally:
            self.checkpointer.close()
            self.sink.close()

    def train_step(self) -> None:
        """One optimizer step: the method's phases in order, each `updates` updates of its
        module, then the student's EMA. The method's draws (t, noise, w) come from stream
        METHOD_STREAM of (seed, rank, step), so a restored run draws what the uninterrupted one
        would have."""
        progress = self.progress
        self.method.seed(derive_seed(self.job.seed, self.ctx.rank, METHOD_STREAM, progress.step),
                         self.ctx.device)
        for phase in self.phases:
            self.scope.enter(phase.module)
            for _ in range(phase.updates):
                self.update(phase)
        progress.step += 1
        if self.ema is not None:             # its updates count from the start of the round
            self.ema.update(progress.step - 1 - self.schedule.start(progress.round))

    def update(self, phase: Phase) -> None:
        """One optimizer update of the phase's module, over grad_accum micro-batches."""
        engine = self.engines[phase.module]
        skipped = engine.skipped_steps
        for _ in range(self.job.deepspeed.grad_accum):
            with self.sink.waiting():
                batch = {name: next(self.streams[name]) for name in phase.reads}
            values = self.method.loss(batch, phase)
            engine.backward(values["loss"] * self.sink.window.add(phase.name, values))
            engine.step()
        # The one host sync of an update, DeepSpeed's or FiniteAdamW's overflow check, says
        # whether it was skipped: on every rank alike, the gradients being all-reduced.
        self.count_skipped(engine.skipped_steps > skipped)

    def count_skipped(self, skipped: bool) -> None:
        """Count a skipped update; `max_nan_steps` of them in a row stop the run."""
        if not skipped:
            self.skip_streak = 0
            return
        self.progress.grad_skipped += 1
        self.skip_streak += 1
        if self.skip_streak >= self.job.max_nan_steps:
            raise NonFiniteLoss(
                f"step {self.progress.step + 1}: {self.skip_streak} updates in a row were skipped "
                f"for a non-finite loss or gradients (max_nan_steps={self.job.max_nan_steps}); "
                "stopping before a broken checkpoint is written")

    @property
    def round_name(self) -> str:
        return self.schedule.rounds[self.progress.round].name

    def enter_round(self, index: int) -> None:
        """Start round `index` if the run is not in it: the weights every module ended the last
        round with start the next (progressive: its teacher), and the EMA restarts from them."""
        progress = self.progress
        if index == progress.round:
            return
        self.round_weights = self.checkpointer.weights()
        student = self.round_weights[self.student]
        if self.method.keep_round_students:
            self.checkpointer.keep_round_student(self.round_name, student, progress.round,
                                                 progress.step)
        progress.round = index
        self.method.start_round(index, self.round_weights)
        if self.ema is not None:     # the new round starts from the weights its teacher holds
            load_full_weights(self.engines[self.student].module, student)
            self.ema.reset()

    def checkpoint(self, metrics: dict) -> None:
        """A checkpoint of this step; the run's last also holds the student (and, for a method
        that keeps its rounds' students, that round's copy)."""
        final = self.progress.step == self.schedule.stop
        start = time.perf_counter()
        size = self.checkpointer.save(
            self.progress, self.round_weights, metrics, final=final,
            round_name=self.round_name if final and self.method.keep_round_students else None)
        self.sink.checkpointed(time.perf_counter() - start, size)


def precise_evaluations(method: Method, engines: dict, job: TrainJob,
                        rank: int) -> dict[str, Callable]:
    """fp32 evaluations of the modules the method evaluates in full precision, where they train in
    bf16. ZeRO-3 partitions a module's weights, so there it is evaluated as it trains (bf16), and
    rank 0 says so once."""
    if job.deepspeed.precision != "bf16" or not method.precise_modules:
        return {}
    if job.deepspeed.zero_stage == 3:
        if rank == 0:
            logging.getLogger("raydistill.train").warning(
                "%s: evaluated in bf16 where %s evaluates it in fp32 (ZeRO-3 partitions its "
                "weights)", ", ".join(method.precise_modules), job.method)
        return {}
    return {name: evaluated_in_fp32(engines[name].module) for name in method.precise_modules}


def updates_per_step(phases: list[Phase], modules: dict[str, nn.Module],
                     streams: dict[str, Stream]) -> dict[str, int]:
    """Each module's optimizer updates per training step (what its LR schedule counts); every
    module must have a phase and every stream a phase reads must be there."""
    updates = {name: 0 for name in modules}
    for phase in phases:
        if phase.module not in updates:
            raise ValueError(f"phase {phase.name} updates {phase.module!r}, which is not one of "
                             f"the method's modules {sorted(modules)}")
        missing = [name for name in phase.reads if name not in streams]
        if missing:
            raise ValueError(f"phase {phase.name} reads streams {missing} this worker lacks "
                             f"(it has {sorted(streams)})")
        updates[phase.module] += phase.updates
    idle = [name for name, count in updates.items() if count < 1]
    if idle:
        raise ValueError(f"modules {idle} have no phase that updates them")
    return updates


class GradientScope:
    """Which module a phase trains. It hands each of the method's handles (`Trainable`) its
    engine; `enter(name)`: the method's calls of that module go through its engine (whose
    backward DeepSpeed runs) and of every other module to its plain network (an engine's forward
    would enrol it in a backward it does not run: DeepSpeed refuses that at ZeRO-0), and only that
    module's trainable parameters require gradients, so a backward through another module
    computes none of its parameters' gradients and fires none of DeepSpeed's hooks on them
    (ZeRO 1-2 gradient reduction, ZeRO-3 partitioning)."""

    def __init__(self, method: Method, engines: dict):
        self.handles = method.trainables()
        for name, handle in self.handles.items():
            handle.attach(engines[name])
        self.params = {name: [p for p in engine.module.parameters() if p.requires_grad]
                       for name, engine in engines.items()}
        self.current: str | None = None

    def enter(self, name: str) -> None:
        if name == self.current or len(self.handles) == 1:
            return
        for other, handle in self.handles.items():
            handle.trains = other == name
        for module, params in self.params.items():
            for param in params:
                param.requires_grad_(module == name)
        self.current = name
