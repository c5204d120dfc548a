"""The loop each training worker runs. It knows engines, rounds, checkpoints and metrics, never the
method's math: it asks the method for its modules, phases, rounds and `loss(batch, phase)`.

A checkpoint directory (every `checkpoint_every` steps; Ray Train merges the ranks' files):

    engines/<module>/     DeepSpeed checkpoint per engine (every rank writes its partition)
    state.json            step, round, skipped micro-batches and updates, resumes, method
    streams/rank-<r>.json rank r's data positions (epoch, rows consumed in it), by stream name
    round_weights.safetensors   from the second round on, the weights it started from (progressive:
                          the round's frozen teacher), so a resumed run rebuilds the same round
    ema.safetensors       the student's EMA, when optim.ema_decay > 0
    train_log.jsonl       one JSON line per logged step: step, round, loss (the mean finite loss
                          of the window's micro-batches of the student's phase, all ranks) and,
                          for a method with several phases or values, <phase>/<value> (e.g.
                          generator/loss_dm, fake_score/loss), nan_skipped (micro-batches whose
                          loss was not finite, so far), grad_skipped (updates skipped),
                          samples/s, lr (the student's; <module>/lr for the others), data_wait
                          (the fraction of the window rank 0 spent waiting for data: near 0
                          unless input-bound), teacher_evaluations (samples the frozen teacher
                          evaluated so far, all ranks; a resumed run counts the path it replays
                          once), bytes/<name> (rank 0's weights and optimizer state per module,
                          and each frozen network), ...
    rounds/<N>-steps/     the student after each finished progressive round (a model checkpoint)
    student/              the consolidated student (the run's last checkpoint only: at the end,
                          or at `until`)

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

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raydistill.config import ModelConfig, TrainJob
from raydistill.events import EventWriter
from raydistill.methods import Method, Phase
from raydistill.models.checkpoint import Checkpoint, build_network, save_checkpoint
from raydistill.seeds import METHOD_STREAM, derive_seed
from raydistill.train.build import student_record
from raydistill.train.engine import (
    StudentEMA,
    build_engine,
    evaluated_in_fp32,
    full_state_dict,
    load_full_weights,
    state_bytes,
    tensor_bytes,
)
from raydistill.train.errors import FatalTrainingError
from raydistill.train.stream import Position, Stream

STATE, ROUND_WEIGHTS, EMA_FILE, LOG = "state.json", "round_weights.safetensors", "ema.safetensors", \
    "train_log.jsonl"
STREAMS = "streams"


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
    #: rank 0 hands it each logged step's metrics, with "total" and "start" (the step this
    #: attempt started from) added; the driver shows them (raydistill.train.progress)
    logged: Callable[[dict], None] | None = None
    #: wall-clock times (time.time()) the worker reached before the loop, reported with every
    #: step as <name>_at (the driver's start-up breakdown)
    reached: dict[str, float] = field(default_factory=dict)
    #: where rank 0 writes each logged step's numbers as TensorBoard events (raydistill.events)
    events: str | None = None


@dataclass
class Progress:
    step: int = 0                    # optimizer steps done
    round: int = 0
    nan_skipped: int = 0             # micro-batches skipped for a non-finite loss
    grad_skipped: int = 0            # updates skipped for non-finite gradients
    resumes: int = 0                 # times the run restarted from a checkpoint
    method: str = ""
    teacher_evaluations: int = 0     # samples the frozen teacher evaluated, over all ranks


def run_worker(job: TrainJob, method: Method, streams: dict[str, Stream], ctx: WorkerContext,
               student_config: ModelConfig, teacher: Checkpoint) -> None:
    """Train `method` to the end of its rounds, reading `streams` by name, checkpointing and
    reporting through `ctx`. Each student saved records `teacher`'s fingerprint (and what it is
    sampled with: a text teacher's prompt table, a latent teacher's autoencoder)."""
    rounds = method.rounds()
    ends = [sum(r.steps for r in rounds[:i + 1]) for i in range(len(rounds))]
    total, on_cuda = ends[-1], ctx.device.type == "cuda"
    stop = min(job.until, total) if job.until else total      # this run's last step
    modules, phases = method.modules(), method.phases()
    updates = updates_per_step(phases, modules, streams)
    method.micro_batch = job.micro_batch(ctx.world_size)
    round_weights: dict[str, dict[str, Tensor]] = {}      # set at each round boundary
    engines = {name: build_engine(m, job, job.optim.for_module(name), ctx.world_size,
                                  rounds[0].steps * updates[name], on_cuda)
               for name, m in modules.items()}
    method.use_modules(engines)
    method.precise = precise_evaluations(method, engines, job, ctx.rank)
    scope = GradientScope(method, engines)
    student = engines[method.student_module].module
    ema = StudentEMA(student, job.optim.ema_decay) if job.optim.ema_decay > 0 else None
    progress = Progress(method=job.method)
    workdir = tempfile.mkdtemp(prefix="raydistill-train-")
    if ctx.restored:
        progress, round_weights = _restore(ctx.restored, engines, ema, streams, ctx.rank, workdir)
        progress.resumes += 1
    method.start_round(progress.round, round_weights)
    events = EventWriter(ctx.events, purge_step=progress.step if ctx.restored else None) \
        if ctx.rank == 0 and ctx.events else None

    def final_weights() -> dict[str, dict[str, Tensor]]:
        weights = {name: full_state_dict(e.module) for name, e in engines.items()}
        if ema is not None:
            weights[method.student_module] = ema.state_dict()
        return weights

    def save_student(directory: str, weights: dict[str, Tensor], index: int) -> None:
        network = build_network(student_config)
        network.load_state_dict(weights)
        extra = {**student_record(job, teacher, index), "train_steps": progress.step}
        save_checkpoint(directory, network, student_config, extra=extra)

    def checkpoint(final: bool, metrics: dict) -> None:
        directory = tempfile.mkdtemp(prefix="raydistill-ckpt-")
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(os.path.join(directory, "engines", name), tag="state")
            weights = final_weights() if final else None
            averages = ema.state_dict() if ema is not None else None
            os.makedirs(os.path.join(directory, STREAMS))
            with open(os.path.join(directory, STREAMS, f"rank-{ctx.rank}.json"), "w") as f:
                json.dump({name: asdict(s.position) for name, s in streams.items()}, f)
            if ctx.rank == 0:
                with open(os.path.join(directory, STATE), "w") as f:
                    json.dump(asdict(progress), f)
                if round_weights:
                    save_file(_flatten(round_weights), os.path.join(directory, ROUND_WEIGHTS))
                if averages is not None:
                    save_file(averages, os.path.join(directory, EMA_FILE))
                shutil.copytree(workdir, directory, dirs_exist_ok=True)
                if final:
                    save_student(os.path.join(directory, "student"),
                                 weights[method.student_module], progress.round)
                    if method.keep_round_students:
                        shutil.copytree(os.path.join(directory, "student"), os.path.join(
                            directory, "rounds", rounds[progress.round].name))
            ctx.report(metrics, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    for stream in streams.values():
        stream.on(ctx.device)
    window = LossWindow(ctx.device)
    student_phase = next(p.name for p in phases if p.module == method.student_module)
    skip_streak, started, window_start, window_steps, waited = 0, time.time(), time.time(), 0, 0.0
    first_step, memory = progress.step, {}
    while progress.step < stop:
        index = next(i for i, end in enumerate(ends) if progress.step < end)
        if index != progress.round:
            round_weights = final_weights()
            if ctx.rank == 0 and method.keep_round_students:
                save_student(os.path.join(workdir, "rounds", rounds[progress.round].name),
                             round_weights[method.student_module], progress.round)
            progress.round = index
            method.start_round(index, round_weights)
            if ema is not None:     # the new round starts from the weights its teacher holds
                load_full_weights(engines[method.student_module].module,
                                  round_weights[method.student_module])
                ema.reset()
        # The method's draws (t, noise, w) for this step: stream METHOD_STREAM of (seed, rank,
        # step), so a restored run draws what the uninterrupted one would have.
        method.seed(derive_seed(job.seed, ctx.rank, METHOD_STREAM, progress.step), ctx.device)
        for phase in phases:
            engine = engines[phase.module]
            scope.enter(phase.module)
            for _ in range(phase.updates):
                skipped = engine.skipped_steps
                for _ in range(job.deepspeed.grad_accum):
                    wait_start = time.perf_counter()
                    batch = {name: next(streams[name]) for name in phase.reads}
                    waited += time.perf_counter() - wait_start
                    values = method.loss(batch, phase)
                    engine.backward(values["loss"] * window.add(phase.name, values))
                    engine.step()
                # The one host sync of an update, DeepSpeed's or FiniteAdamW's overflow check,
                # says whether it was skipped: on every rank alike, the gradients being
                # all-reduced.
                if engine.skipped_steps > skipped:
                    progress.grad_skipped += 1
                    skip_streak = _count_streak(skip_streak, job, progress.step)
                else:
                    skip_streak = 0
        progress.step += 1
        window_steps += 1
        if ema is not None:             # its updates count from the start of the round
            ema.update(progress.step - 1 - (ends[progress.round - 1] if progress.round else 0))
        if not memory:          # optimizers allocate their state at the first update
            memory = {f"bytes/{name}": state_bytes(engine) for name, engine in engines.items()}
            memory.update({f"bytes/{name}": tensor_bytes(module)
                           for name, module in method.frozen_modules().items()})
        is_log = progress.step % job.log_every == 0 or progress.step == stop
        is_checkpoint = progress.step % job.checkpoint_every == 0 or progress.step == stop
        if not (is_log or is_checkpoint):
            continue
        now = time.time()
        rate = window_steps * job.optim.batch_size / max(now - window_start, 1e-9)
        means, non_finite, (evaluations,) = window.read(method.take_teacher_evaluations())
        progress.nan_skipped += non_finite
        progress.teacher_evaluations += int(evaluations)
        metrics = {"step": progress.step, "round": rounds[progress.round].name,
                   "loss": means[f"{student_phase}/loss"],
                   **(means if len(means) > 1 else {}),
                   "samples_per_s": rate,
                   "lr": engines[method.student_module].get_lr()[0],
                   **{f"{name}/lr": engine.get_lr()[0] for name, engine in engines.items()
                      if name != method.student_module},
                   "data_wait": waited / max(now - window_start, 1e-9),
                   "nan_skipped": progress.nan_skipped, "grad_skipped": progress.grad_skipped,
                   "resumes": progress.resumes, "elapsed_s": now - started,
                   "run_samples_per_s": (progress.step - first_step) * job.optim.batch_size
                   / max(now - started, 1e-9),
                   "teacher_evaluations": progress.teacher_evaluations, **memory,
                   **{f"{name}_at": at for name, at in ctx.reached.items()},
                   "loop_at": started, "logged_at": now}
        window_start, window_steps, waited = now, 0, 0.0
        if ctx.rank == 0:
            with open(os.path.join(workdir, LOG), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if events is not None:
                events.write(metrics, progress.step)
        if ctx.rank == 0 and ctx.logged is not None:
            ctx.logged({**metrics, "total": stop, "start": first_step})
        if is_checkpoint:
            checkpoint(progress.step == stop, metrics)
    method.use_modules(engines)
    shutil.rmtree(workdir, ignore_errors=True)
    if events is not None:
        events.close()


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
    """Which module a phase trains. `enter(name)`: the method calls that module's engine (whose
    backward DeepSpeed runs) and every other module as its plain network (an engine's forward
    would enrol it in a backward it does not run: DeepSpeed refuses that at ZeRO-0), and only that
    module's trainable parameters require gradients, so a backward through another module
    computes none of its parameters' gradients and fires none of DeepSpeed's hooks on them
    (ZeRO 1-2 gradient reduction, ZeRO-3 partitioning)."""

    def __init__(self, method: Method, engines: dict):
        self.method, self.engines = method, engines
        self.params = {name: [p for p in engine.module.parameters() if p.requires_grad]
                       for name, engine in engines.items()}
        self.current: str | None = None

    def enter(self, name: str) -> None:
        if name == self.current or len(self.engines) == 1:
            return
        self.method.use_modules({other: engine if other == name else engine.module
                                 for other, engine in self.engines.items()})
        for module, params in self.params.items():
            for param in params:
                param.requires_grad_(module == name)
        self.current = name


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


def _count_streak(streak: int, job: TrainJob, step: int) -> int:
    """One more skipped update in a row; `max_nan_steps` of them stop the run."""
    streak += 1
    if streak >= job.max_nan_steps:
        raise NonFiniteLoss(
            f"step {step + 1}: {streak} updates in a row were skipped for a non-finite loss or "
            f"gradients (max_nan_steps={job.max_nan_steps}); stopping before a broken checkpoint "
            "is written")
    return streak


def _restore(directory: str, engines: dict, ema: StudentEMA | None, streams: dict[str, Stream],
             rank: int, workdir: str) -> tuple[Progress, dict[str, dict[str, Tensor]]]:
    with open(os.path.join(directory, STATE)) as f:
        progress = Progress(**json.load(f))
    for name, engine in engines.items():
        saved = os.path.join(directory, "engines", name)
        if not os.path.isdir(os.path.join(saved, "state")):
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint for module {name}")
        engine.load_checkpoint(saved, tag="state")
    if ema is not None:
        ema.load(load_file(os.path.join(directory, EMA_FILE)))
    position = os.path.join(directory, STREAMS, f"rank-{rank}.json")
    if not os.path.isfile(position):
        raise FileNotFoundError(f"{directory}: no data position for rank {rank}")
    with open(position) as f:
        positions = json.load(f)
    for name, stream in streams.items():
        if name not in positions:
            raise FileNotFoundError(f"{directory}: no position of stream {name} for rank {rank}")
        stream.restore(Position(**positions[name]))
    for item in (LOG, "rounds"):
        source = os.path.join(directory, item)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(workdir, item))
        elif os.path.isfile(source):
            shutil.copy(source, workdir)
    saved = os.path.join(directory, ROUND_WEIGHTS)
    return progress, _unflatten(load_file(saved)) if os.path.isfile(saved) else {}


def _flatten(weights: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{module}/{name}": value.contiguous() for module, state in weights.items()
            for name, value in state.items()}


def _unflatten(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    weights: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        module, _, name = key.partition("/")
        weights.setdefault(module, {})[name] = value
    return weights
