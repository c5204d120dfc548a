"""A training worker's checkpoints: what one holds, how it is written and read back, and the
consolidated students a run exports.

A checkpoint directory (Ray Train merges the ranks' files):

    engines/<module>/     DeepSpeed checkpoint per engine (every rank writes its partition)
    state.json            step, round, skipped micro-batches and updates, resumes, method
    streams/rank-<r>.json rank r's data positions (epoch, rows consumed in it), by stream name
    round_weights.safetensors   from the second round on, the weights it started from (progressive:
                          the round's frozen teacher), so a resumed run rebuilds the same round
    ema.safetensors       the student's EMA, when optim.ema_decay > 0
    train_log.jsonl       the run's logged steps so far (raydistill.train.metrics)
    rounds/<N>-steps/     the student after each finished progressive round (a model checkpoint)
    student/              the consolidated student (the run's last checkpoint only: at the end,
                          or at `until`); with memory.lora, its adapters merged in and kept
                          beside it (lora.safetensors)

Files that outlive one checkpoint (the log, the round students) are kept in the checkpointer's
work directory and copied into each checkpoint rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_tensors
from torch import Tensor

from raydistill.config import ModelConfig, TrainJob
from raydistill.models.checkpoint import Checkpoint, build_network, save_checkpoint
from raydistill.models.lora import ADAPTER_FILE, adapters, lora_record, merged
from raydistill.train.build import student_record
from raydistill.train.engine import StudentEMA, full_state_dict
from raydistill.train.stream import Position, Stream

STATE, ROUND_WEIGHTS, EMA_FILE, LOG = "state.json", "round_weights.safetensors", "ema.safetensors", \
    "train_log.jsonl"
STREAMS, ROUNDS, STUDENT = "streams", "rounds", "student"

Weights = dict[str, dict[str, Tensor]]       # a state dict per module


@dataclass
class Progress:
    step: int = 0                    # optimizer steps done
    round: int = 0
    nan_skipped: int = 0             # micro-batches skipped for a non-finite loss
    grad_skipped: int = 0            # updates skipped for non-finite gradients
    resumes: int = 0                 # times the run restarted from a checkpoint
    method: str = ""
    teacher_evaluations: int = 0     # samples the frozen teacher evaluated, over all ranks


def directory_bytes(directory: str) -> int:
    """Bytes of the files under `directory`."""
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(directory) for name in names)


class Checkpointer:
    """Saves and restores one worker's training state (`engines`, the student's `ema`, the data
    `streams`' positions), and exports the consolidated student (`student`, the engine name of
    the student module), recording `teacher`'s fingerprint and what the student is sampled with.
    `report(metrics, directory)` hands a written checkpoint to Ray Train; every rank calls `save`
    alike. `place(step)` is where a checkpoint is written (the run's storage, which then holds
    it, or a directory an upload takes); without one, a temporary directory removed once
    reported. `measure(directory)` is a reported checkpoint's bytes in storage."""

    def __init__(self, *, job: TrainJob, rank: int, engines: dict, student: str,
                 ema: StudentEMA | None, streams: dict[str, Stream], student_config: ModelConfig,
                 teacher: Checkpoint, report: Callable[[dict, str], None],
                 place: Callable[[int], str] | None = None,
                 measure: Callable[[str], int] = directory_bytes):
        self.job, self.rank, self.engines, self.student = job, rank, engines, student
        self.ema, self.streams, self.report, self.place = ema, streams, report, place
        self.measure = measure
        self.student_config, self.teacher = student_config, teacher
        self.workdir = tempfile.mkdtemp(prefix="raydistill-train-")

    @property
    def log_path(self) -> str:
        """Where the run's log grows between checkpoints."""
        return os.path.join(self.workdir, LOG)

    def weights(self) -> Weights:
        """Every module's full weights, the student's EMA in place of the student where there is
        one (a collective under ZeRO: every rank calls it)."""
        weights = {name: full_state_dict(engine.module) for name, engine in self.engines.items()}
        if self.ema is not None:
            weights[self.student] = self.ema.state_dict()
        return weights

    def export_student(self, directory: str, weights: dict[str, Tensor], round_index: int,
                       steps: int) -> None:
        """The student as a model checkpoint, recording the round it finished and its steps; a
        student with adapters with them merged into its weights, and kept beside them
        (ADAPTER_FILE, recorded as `lora`)."""
        extra = {**student_record(self.job, self.teacher, round_index), "train_steps": steps}
        files, lora = {}, self.job.memory.lora
        if lora.rank and (lora.modules is None or self.student in lora.modules):
            files[ADAPTER_FILE] = save_tensors(adapters(weights))
            extra["lora"] = lora_record(lora, self.student_config.kind)
            weights = merged(self.student_config, lora, weights)
        network = build_network(self.student_config)
        network.load_state_dict(weights)
        save_checkpoint(directory, network, self.student_config, extra=extra, extra_files=files)

    def keep_round_student(self, name: str, weights: dict[str, Tensor], round_index: int,
                           steps: int) -> None:
        """A finished round's student, carried in every later checkpoint (rank 0)."""
        if self.rank == 0:
            self.export_student(os.path.join(self.workdir, ROUNDS, name), weights, round_index,
                                steps)

    def save(self, progress: Progress, round_weights: Weights, metrics: dict, *,
             final: bool, round_name: str | None = None) -> int:
        """Write a checkpoint of the state at `progress` and report it with `metrics`; `final`:
        the run's last, which also holds the consolidated student (and, under `round_name`, that
        round's copy of it). Returns the checkpoint's bytes on disk, every rank's files (each rank
        has written its own before the report returns)."""
        directory = self.place(progress.step) if self.place is not None else \
            tempfile.mkdtemp(prefix="raydistill-ckpt-")
        try:
            for name, engine in self.engines.items():
                engine.save_checkpoint(os.path.join(directory, "engines", name), tag="state")
            weights = self.weights() if final else None
            averages = self.ema.state_dict() if self.ema is not None else None
            os.makedirs(os.path.join(directory, STREAMS), exist_ok=True)   # ranks share it
            with open(os.path.join(directory, STREAMS, f"rank-{self.rank}.json"), "w") as f:
                json.dump({name: asdict(s.position) for name, s in self.streams.items()}, f)
            if self.rank == 0:
                self._write_shared(directory, progress, round_weights, averages)
                if final:
                    student = os.path.join(directory, STUDENT)
                    self.export_student(student, weights[self.student], progress.round,
                                        progress.step)
                    if round_name is not None:
                        shutil.copytree(student, os.path.join(directory, ROUNDS, round_name))
            self.report(metrics, directory)
            return self.measure(directory)
        finally:
            if self.place is None:
                shutil.rmtree(directory, ignore_errors=True)

    def _write_shared(self, directory: str, progress: Progress, round_weights: Weights,
                      averages: dict[str, Tensor] | None) -> None:
        """Rank 0's files: the state, the round's starting weights, the EMA, the work directory."""
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(asdict(progress), f)
        if round_weights:
            save_file(_flatten(round_weights), os.path.join(directory, ROUND_WEIGHTS))
        if averages is not None:
            save_file(averages, os.path.join(directory, EMA_FILE))
        shutil.copytree(self.workdir, directory, dirs_exist_ok=True)

    def restore(self, directory: str) -> tuple[Progress, Weights]:
        """Load the state a checkpoint holds into the engines, the EMA, this rank's streams and
        the work directory; the progress it records (its resumes counted) and the weights its
        round started from."""
        with open(os.path.join(directory, STATE)) as f:
            progress = Progress(**json.load(f))
        for name, engine in self.engines.items():
            saved = os.path.join(directory, "engines", name)
            if not os.path.isdir(os.path.join(saved, "state")):
                raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint for module {name}")
            engine.load_checkpoint(saved, tag="state")
        if self.ema is not None:
            self.ema.load(load_file(os.path.join(directory, EMA_FILE)))
        self._restore_positions(directory)
        for item in (LOG, ROUNDS):
            source = os.path.join(directory, item)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(self.workdir, item))
            elif os.path.isfile(source):
                shutil.copy(source, self.workdir)
        progress.resumes += 1
        saved = os.path.join(directory, ROUND_WEIGHTS)
        return progress, _unflatten(load_file(saved)) if os.path.isfile(saved) else {}

    def _restore_positions(self, directory: str) -> None:
        position = os.path.join(directory, STREAMS, f"rank-{self.rank}.json")
        if not os.path.isfile(position):
            raise FileNotFoundError(f"{directory}: no data position for rank {self.rank}")
        with open(position) as f:
            positions = json.load(f)
        for name, stream in self.streams.items():
            if name not in positions:
                raise FileNotFoundError(f"{directory}: no position of stream {name} for rank "
                                        f"{self.rank}")
            stream.restore(Position(**positions[name]))

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _flatten(weights: Weights) -> dict[str, Tensor]:
    return {f"{module}/{name}": value.contiguous() for module, state in weights.items()
            for name, value in state.items()}


def _unflatten(flat: dict[str, Tensor]) -> Weights:
    weights: Weights = {}
    for key, value in flat.items():
        module, _, name = key.partition("/")
        weights.setdefault(module, {})[name] = value
    return weights
