"""`raydistill train`: check everything up front, then run the loop on Ray Train workers.

The output directory:

    DIR/train.yaml          the job as started (a resumed run may change only RESUMABLE_CHANGES)
    DIR/ray/                Ray Train's run: its checkpoints (unless `storage` points elsewhere)
    DIR/student/            the consolidated final student: `raydistill sample --checkpoint DIR/student`
    DIR/rounds/<N>-steps/   progressive: the student after each round
    DIR/train_log.jsonl     one line per logged step
    DIR/tensorboard/        the same numbers as TensorBoard events, written as they are logged
    DIR/logs/               each worker's engine log (Ray, Ray Train, Ray Data, DeepSpeed INFO
                            lines and Python warnings; the terminal shows WARNING and worse)

DIR/student appears only when the run has finished (or stopped at `until`, with the student of
that step); until then the directory holds no student.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from raydistill.config import (
    ConfigError,
    ModelConfig,
    TeacherJob,
    TrainJob,
    dotted,
    from_dict,
    load,
    to_dict,
    with_absolute_paths,
)
from raydistill.events import DIRECTORY as EVENTS
from raydistill.logs import engine_logs_to
from raydistill.methods import Method
from raydistill.methods.base import DATA, PAIRS, MethodSpec
from raydistill.methods.registry import METHODS, method_spec, register
from raydistill.models.checkpoint import Checkpoint, load_teacher
from raydistill.train.build import (
    build_method,
    check_job,
    prepare,
    starts_from_teacher,
    with_teacher_shape,
)
from raydistill.train.errors import Repeating, TrainingFailed, repeating_cause
from raydistill.train.progress import StepBar
from raydistill.train.stream import Stream, mixture_stream, source_stream

RUN_NAME, JOB_FILE, LOGS = "train", "train.yaml", "logs"
#: how often Ray Train's controller polls the workers during `fit` (its default, 2 s, left every
#: run idle for 5.6 s after its last step; 1.2 s at 0.5 s); a value the user exported wins
CONTROLLER_POLL_S = "0.5"
# What a resumed run may change: logging, checkpoint cadence, retries and per-worker CPU use.
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "max_failures", "max_nan_steps", "until",
                     "workers.cpus", "workers.threads"}


@dataclass
class TrainResult:
    student: str
    steps: int
    metrics: dict
    #: seconds spent outside the training loop, by phase (see `startup_phases`)
    outside_loop: dict[str, float]


def startup_phases(called: float, launched: float, finished: float,
                   metrics: dict) -> dict[str, float]:
    """Where the time outside the loop went, from the driver's clock (`called` train, `launched`
    the workers, `finished` with the student copied out) and the times rank 0 reported (the last
    attempt's, so a retried run counts its failed attempts under starting the workers)."""
    return {"checks on the driver": launched - called,
            "starting the workers": metrics["entered_at"] - launched,
            "teacher, student and data stream": metrics["set_up_at"] - metrics["entered_at"],
            "DeepSpeed engines and restore": metrics["loop_at"] - metrics["set_up_at"],
            "final checkpoint and shutdown": finished - metrics["logged_at"]}


def ensure_teacher(job: TrainJob, progress: bool) -> None:
    """Train the teacher `teacher.build` describes when its checkpoint does not exist yet, once
    the job checks out against the teacher it will train."""
    ref = job.teacher
    if not ref.build or os.path.isdir(ref.checkpoint):
        return
    from raydistill.pretrain.teacher import planned_teacher, train_teacher

    build = load(TeacherJob, ref.build)
    check_job(job, planned_teacher(build), None)   # its pairs can only be made once it is trained
    print(f"train: no teacher at {ref.checkpoint}; training one from {ref.build}", flush=True)
    train_teacher(build, ref.checkpoint, progress=progress)


def check_out_dir(job: TrainJob, out: str, resume: bool) -> None:
    """A new run needs an empty or absent DIR; --resume needs DIR to hold a run of this method."""
    if not resume:
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ConfigError(out, "is not empty; pass --resume to continue the run in it, or "
                                   "choose a new --out")
        return
    before = _recorded_job(out)
    if before.method != job.method:
        raise ConfigError("--resume", f"{out} is a {before.method} run, the config asks for "
                                      f"{job.method}")


def _recorded_job(out: str) -> TrainJob:
    path = os.path.join(out, JOB_FILE)
    if not os.path.isfile(path):
        raise ConfigError("--resume", f"{out} holds no training run (no {JOB_FILE})")
    with open(path) as f:
        return from_dict(TrainJob, yaml.safe_load(f))


def check_resumable(job: TrainJob, out: str) -> None:
    """A resumed run keeps everything that defines its training; only the keys in
    RESUMABLE_CHANGES may differ from the job recorded in DIR/train.yaml (both with absolute paths
    and the teacher's channel count filled in)."""
    then, now = dotted(to_dict(_recorded_job(out))), dotted(to_dict(job))
    for key in sorted(then.keys() | now.keys()):
        if key not in RESUMABLE_CHANGES and then.get(key) != now.get(key):
            raise ConfigError(key, f"is {now.get(key)!r}, but the run in {out} was started with "
                                   f"{then.get(key)!r}; a resumed run must keep it")


def train(job: TrainJob, out: str, *, resume: bool = False, address: str | None = None,
          progress: bool = True, label: str | None = None) -> TrainResult:
    """Run the job; returns where the consolidated student is. `label` names the progress bar
    (default: train and the method)."""
    called = time.time()
    out = os.path.abspath(out)
    check_out_dir(job, out, resume)
    job = with_absolute_paths(job)
    ensure_teacher(job, progress)
    plan = prepare(job)
    job = with_teacher_shape(job, plan.teacher)
    student, teacher = plan.student_config, plan.teacher.config
    if student.kind == teacher.kind and not starts_from_teacher(student, plan.teacher) \
            and not resume:
        print(f"train: the student predicts {student.prediction}, the teacher "
              f"{teacher.prediction}: it starts from its own initialisation, not from the "
              "teacher's weights", flush=True)
    if resume:
        check_resumable(job, out)

    from raydistill.cluster import init_ray

    if not resume:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, JOB_FILE), "w") as f:
            yaml.safe_dump(to_dict(job), f, sort_keys=False)
    workers = job.workers
    # Locally, the read and decode tasks need CPUs beside the training workers'.
    local_cpus = max(os.cpu_count() or 1, int(workers.num * workers.cpus) + 1)
    init_ray(address, num_cpus=local_cpus, dashboard=True)
    _check_data_headroom(job)
    launched = time.time()
    with StepBar(label or f"train {job.method}", enabled=progress) as bar:
        result = _fit(job, plan.student_config, out, bar.channel)
    with result.checkpoint.as_directory() as directory:
        for item in ("rounds", "train_log.jsonl", "student"):
            source, target = os.path.join(directory, item), os.path.join(out, item)
            if os.path.isdir(source):
                shutil.copytree(source, target, dirs_exist_ok=True)
            elif os.path.isfile(source):
                shutil.copy(source, target)
    return TrainResult(os.path.join(out, "student"), int(result.metrics["step"]), result.metrics,
                       startup_phases(called, launched, time.time(), result.metrics))


def _fit(job: TrainJob, student: ModelConfig, out: str, channel) -> Any:
    """Run the workers to the end; a failure is retried here from the last checkpoint (Ray Train
    retries nothing itself, max_failures=0), up to job.max_failures times, unless it is an error
    that would repeat."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = job.workers
    for attempt in range(job.max_failures + 1):
        trainer = TorchTrainer(
            worker_main,
            train_loop_config={"plan": WorkerPlan(job, student, method_spec(job.method),
                                                  os.path.join(out, LOGS),
                                                  os.path.join(out, EVENTS), channel)},
            scaling_config=ScalingConfig(num_workers=workers.num, use_gpu=workers.gpus > 0,
                                         resources_per_worker={"CPU": workers.cpus,
                                                               **({"GPU": workers.gpus}
                                                                  if workers.gpus else {})}),
            torch_config=TorchConfig(backend="nccl" if workers.gpus > 0 else "gloo"),
            run_config=RunConfig(name=RUN_NAME, storage_path=job.storage or os.path.join(out, "ray"),
                                 failure_config=FailureConfig(max_failures=0),
                                 logging_config=LoggingConfig(log_level="WARNING"),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        try:
            with _env("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S):
                return trainer.fit()
        except Exception as err:     # Ray wraps the workers' errors; keep the cause, one line
            fatal = _repeating_cause(err, job)
            cause = fatal.cause if fatal is not None else next(
                (line for line in reversed(str(err).splitlines()) if line.strip()), repr(err))
            if fatal is not None or attempt == job.max_failures:
                then = "continue it with --resume" if fatal is None or fatal.resumable else \
                    "start a new run with the change (a resumed run keeps its settings)"
                raise TrainingFailed(f"{out}: training stopped ({cause.strip()}); {then}") \
                    from err
            print(f"train: a worker failed ({cause.strip()}); restarting from the last "
                  f"checkpoint (retry {attempt + 1} of {job.max_failures})", flush=True)
    raise AssertionError("unreachable: the last attempt returns or raises")


@contextlib.contextmanager
def _env(name: str, default: str):
    """Export `name` (unless it is set) while inside: Ray Train hands it to its controller."""
    if name in os.environ:
        yield
        return
    os.environ[name] = default
    try:
        yield
    finally:
        del os.environ[name]


def _repeating_cause(err: Exception, job: TrainJob) -> Repeating | None:
    """Why `fit` failed, if a worker's error would happen again on a retry (see
    errors.repeating_cause)."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = (repeating_cause(e, job) for e in failures.values())
    return next((cause for cause in causes if cause is not None), None)


def _check_data_headroom(job: TrainJob) -> None:
    """Ray tasks read and decode the data on CPUs the training workers do not hold; with none
    left over the workers would wait for data forever, so say so before starting. (The analytic
    mixture's exact draws are made by each worker itself.)"""
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - job.workers.num * job.workers.cpus
    if (job.pairs or job.data.source != "mixture") and spare < 1:
        raise ConfigError("workers.cpus", f"{job.workers.num} workers x {job.workers.cpus} CPUs "
                                          "leave no CPU on the cluster for the tasks that read "
                                          "the training data")


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker is handed (train_loop_config["plan"])."""

    job: TrainJob
    student: ModelConfig
    method: MethodSpec                # the job's method (one registered in the driver only too)
    logs: str                         # where each rank writes its engine log
    events: str                       # where rank 0 writes TensorBoard events
    progress: Any = None              # the driver's progress channel (None: no bar)


def worker_main(config: dict) -> None:
    """The Ray Train worker: build teacher, student and method, then run the loop."""
    entered = time.time()
    import ray.train

    from raydistill.train.loop import WorkerContext, run_worker

    plan: WorkerPlan = config["plan"]
    job, student_config, channel = plan.job, plan.student, plan.progress
    if plan.method.name not in METHODS:
        register(plan.method)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    place, report, measure = in_storage(context.get_storage(), remote=bool(job.storage))

    with engine_logs_to(os.path.join(plan.logs, f"train-rank{rank}.log")):
        setup = setup_worker(job, student_config, rank, world)
        set_up = time.time()
        restored = ray.train.get_checkpoint()
        with restored.as_directory() if restored else contextlib.nullcontext() as directory:
            show = None if channel is None else functools.partial(StepBar.put, channel)
            context = WorkerContext(rank, world, setup.device, report, directory, place=place,
                                    measure=measure, logged=show,
                                    reached={"entered": entered, "set_up": set_up},
                                    events=plan.events)
            run_worker(job, setup.method, setup.streams, context, student_config,
                       setup.teacher)


def in_storage(storage, *, remote: bool) -> tuple[Callable[[int], str],
                                                 Callable[[dict, str], None],
                                                 Callable[[str], int]]:
    """Where a worker writes the checkpoint of a step, how it reports it, and what the reported
    checkpoint measures. In the run's storage where that is a file system every worker sees
    (`storage_path` is the run's directory): as checkpoint-<step>, registered as it lies (no
    upload). (Written to a temporary directory and uploaded, every checkpoint was written twice:
    69 s for an SD-sized generator and fake score, and two such runs filled a 64 GB disk.) Where
    the storage is `remote` (job.storage, a URI): into a local directory of its own, which Ray
    Train uploads in the background while training goes on and deletes once uploaded; it measures
    this rank's part, as written before the upload. Either way each rank writes its files before
    it reports, and Ray Train registers a checkpoint once every rank's part is in storage, so one
    that a failure cut short is never taken for complete; it removes those past num_to_keep."""
    import ray.train

    from raydistill.train.checkpointer import directory_bytes

    uploading: dict[str, int] = {}

    def place(step: int) -> str:
        if remote:
            return tempfile.mkdtemp(prefix=f"raydistill-ckpt-{step:08d}-")
        directory = storage.build_checkpoint_path_from_name(checkpoint_name(step))
        os.makedirs(directory, exist_ok=True)
        return directory

    def report(metrics: dict, directory: str) -> None:
        mode = ray.train.CheckpointUploadMode
        if remote:
            uploading[directory] = directory_bytes(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=checkpoint_name(metrics["step"]),
                         checkpoint_upload_mode=mode.ASYNC if remote else mode.NO_UPLOAD,
                         delete_local_checkpoint_after_upload=remote)

    def measure(directory: str) -> int:
        return uploading.pop(directory) if remote else directory_bytes(directory)

    return place, report, measure


def checkpoint_name(step: int) -> str:
    """A checkpoint's directory in the run's storage."""
    return f"checkpoint-{step:08d}"


@dataclass
class WorkerSetup:
    device: torch.device
    teacher: Checkpoint
    method: Method
    streams: dict[str, Stream]                 # what the method's phases read, by name


def setup_worker(job: TrainJob, student_config: ModelConfig, rank: int, world: int) -> WorkerSetup:
    """Device, teacher, method and data streams of one training worker (torch's global generator
    is left alone: the student's initialisation, the data and the method's draws are seeded each from
    their own stream of job.seed)."""
    if job.workers.gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"workers.gpus is {job.workers.gpus} but worker {rank} sees no CUDA "
                               "device; refusing to train on CPU")
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(job.workers.threads)
    # Zero-initialised layers make early gradients denormal floats, ~20x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    teacher = load_teacher(job.teacher)
    method = build_method(job, teacher, student_config, device)
    micro = job.micro_batch(world)
    names = sorted({name for phase in method.phases() for name in phase.reads})
    autoencoder = teacher.conditioning.autoencoder
    if DATA in names and autoencoder is not None:   # encodes real images to latents
        autoencoder.to(device)
    streams = {name: data_stream(name, job, teacher, micro, rank, world) for name in names}
    return WorkerSetup(device, teacher, method, streams)


def data_stream(name: str, job: TrainJob, teacher: Checkpoint, micro: int, rank: int,
                world: int) -> Stream:
    """This rank's micro-batches of stream `name` (raydistill.methods.base): PAIRS, the pair
    shards; DATA, real images (read, like the pairs, by Ray tasks) or exact draws of an analytic
    mixture."""
    common = {"micro": micro, "seed": job.seed, "rank": rank}
    if name == PAIRS:
        from raydistill.pairs.reader import PairShards

        shards = PairShards(job.pairs, rank=rank, world=world)
        columns = {key: key for key in (*shards.layout.arrays, *shards.layout.fields)
                   if key != "seed"}
        return source_stream(shards, columns=columns, name=job.pairs, **common)
    if name != DATA:
        raise ValueError(f"unknown data stream {name!r} (expected {DATA} or {PAIRS})")
    if job.data.source == "mixture":
        return mixture_stream(teacher.network, **common)
    from raydistill.data.ray_source import image_source

    stream = source_stream(image_source(job.data, rank=rank, world=world),
                           columns={"image": "x", "label": "c"},
                           name=job.data.path or job.data.source, **common)
    autoencoder = teacher.conditioning.autoencoder
    if autoencoder is None:
        return stream
    return stream.map(lambda batch: {**batch, "x": autoencoder.encode(batch["x"])})
