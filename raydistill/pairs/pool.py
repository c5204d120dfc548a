"""Teacher workers on Ray: an autoscaling Ray Data actor pool turns shard indices into committed
shards; the driver records each commit in the manifest as it arrives.

Why Ray Data's `map_batches` with an ActorPoolStrategy rather than a hand-written scheduler: it
keeps the teacher resident per actor, grows the pool when nodes join (up to `workers.max`), and
retries a task whose actor died on a restarted actor (max_restarts / max_task_retries default to
-1 for Ray Data actor pools). Exactly-once output then only needs the shard write to be atomic and
deterministic, which raydistill.storage and format guarantee.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import ray
import torch
from tqdm import tqdm

from raydistill.config import PairsJob, WorkersConfig, from_dict
from raydistill.logs import without_ray_data_bars
from raydistill.models.checkpoint import Checkpoint, load_teacher
from raydistill.models.denoiser import EvaluationCounter
from raydistill.pairs.format import Layout, encode_shard, shard_name
from raydistill.pairs.generate import ShardMaker, real_data, shard_seed
from raydistill.pairs.manifest import (
    COLUMNS,
    Manifest,
    PairSet,
    claim_location,
    identity_difference,
    read_run,
    run_identity,
)
from raydistill.pairs.modes import MODES
from raydistill.storage import Location


def worker_device(job: PairsJob) -> torch.device:
    """CUDA when the job gives workers GPUs (and then CUDA must be there), else the CPU."""
    if job.workers.gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("workers.gpus > 0 but this worker sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def check_teacher(job: PairsJob, teacher: Checkpoint) -> None:
    """A teacher that is a distilled student is sampled only as it was distilled: its w range,
    and what the job's mode asks of it (raydistill.pairs.modes)."""
    teacher.sampling.check_guidance(job.guidance.w_min, job.guidance.w_max, "guidance",
                                    force=job.force_sampler, force_key="force_sampler=true")
    MODES[job.mode].check_teacher(job, teacher)


def check_pairs_job(job: PairsJob, teacher: Checkpoint) -> None:
    """Every check of a pairs job against its teacher (one that exists, or one an earlier pipeline
    stage will make): how the teacher may be sampled, and the real data its targets start from."""
    check_teacher(job, teacher)
    if MODES[job.mode].from_data:
        real_data(job, teacher)


def planned_pair_set(job: PairsJob, teacher: Checkpoint) -> PairSet:
    """What the pair set `job` makes will be, as a training job's checks see it."""
    return PairSet(run_identity(job, teacher), job.mode, teacher.conditioning.text, job.num_shards,
                   job.num_shards * job.samples_per_shard)


def shard_row(job: PairsJob, teacher: Checkpoint, index: int, data: bytes, count: int) -> dict:
    solver, steps = MODES[job.mode].teacher_work(job, teacher.sampling.is_stochastic_student)
    return {
        "shard": shard_name(index), "index": index, "count": count, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "seed": shard_seed(job.seed, index),
        "mode": job.mode, "teacher_fingerprint": teacher.fingerprint, "solver": solver,
        "steps": steps, "w_min": job.guidance.w_min, "w_max": job.guidance.w_max,
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None),   # naive UTC for numpy
        "node": ray.get_runtime_context().get_node_id(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


TEACHER_EVALUATIONS = "teacher_evaluations"      # beside the manifest columns, not in them


class ShardWorker:
    """A Ray Data callable class: holds the teacher and commits one shard per input row."""

    def __init__(self, job: dict, out: str, fingerprint: str):
        self.job = from_dict(PairsJob, job)
        torch.set_num_threads(self.job.workers.threads)
        torch.set_flush_denormal(True)
        self.teacher = load_teacher(self.job.teacher)
        if self.teacher.fingerprint != fingerprint:
            raise RuntimeError("the teacher changed since the run started (fingerprint mismatch)")
        self.maker = ShardMaker(self.job, self.teacher, worker_device(self.job))
        self.layout = Layout(self.job.mode, self.teacher.conditioning.text)
        self.location = Location.parse(out)
        self.evaluations = EvaluationCounter()
        self.evaluations.watch(self.teacher.denoiser)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows, evaluations = [], []
        for index in batch["index"].tolist():
            self.evaluations.take()
            columns = self.maker.make(index)
            data = encode_shard(index, self.layout, columns)
            self.location.write_atomic(shard_name(index), data)
            rows.append(shard_row(self.job, self.teacher, index, data, len(columns["c"])))
            evaluations.append(self.evaluations.take())
        return {**{name: [row[name] for row in rows] for name in COLUMNS},
                TEACHER_EVALUATIONS: evaluations}


@dataclass
class PairsPlan:
    job: PairsJob
    location: Location
    fingerprint: str
    manifest: Manifest
    todo: list[int]                  # shard indices to generate
    lost: dict[str, str]             # shards the manifest listed but the listing lacks: why
    replaced: str | None = None      # how the run that `replace` emptied the location of differed


@dataclass
class PairsResult:
    location: str
    generated: int                   # shards made by this call
    total: int                       # shards the location holds now (listed, right size)
    seconds: float
    pairs_per_second: float
    teacher_evaluations: int         # samples the teacher evaluated for this call's shards


def plan_pairs(job: PairsJob, out: str, *, replace: bool = False) -> PairsPlan:
    """Check everything about the inputs and claim `out`; no Ray needed, no worker started.

    The shards to generate are those the manifest lacks and those it lists whose file is gone or
    has another size (one listing of the location, no hashing; `raydistill verify --repair`
    checks contents). Their manifest rows are dropped first, so the manifest never lists a shard
    that is not there. Raises ConfigError for a missing or mismatched teacher, data that does not
    fit it, or a location holding another run's shards; with `replace` (for a caller whose own
    cache the location is: a pipeline stage's pair set, eval's sample sets) another run's set is
    deleted instead, and `replaced` says how it differed.
    """
    teacher = load_teacher(job.teacher)
    check_pairs_job(job, teacher)
    location = Location.parse(out)
    replaced = empty_of_another_run(location, job, teacher) if replace else None
    manifest = Manifest.read(location)
    run = claim_location(location, job, teacher)
    lost = lost_shards(location, manifest)
    if lost:
        for name in lost:
            del manifest.rows[name]
        manifest.write(location)
    todo = [k for k in range(run["num_shards"]) if shard_name(k) not in manifest]
    return PairsPlan(job, location, teacher.fingerprint, manifest, todo, lost, replaced)


def empty_of_another_run(location: Location, job: PairsJob, teacher: Checkpoint) -> str | None:
    """Delete every file of a set another run made at `location`; returns how that run
    differed from this one (`teacher_fingerprint='...'`), None when there was none."""
    previous = read_run(location)
    if previous is None:
        return None
    difference = identity_difference(previous["identity"], run_identity(job, teacher))
    if difference is None:
        return None
    for name in location.list():
        location.delete(name)
    key, theirs, _ = difference
    return f"{key}={theirs!r}"


def lost_shards(location: Location, manifest: Manifest) -> dict[str, str]:
    """Shards the manifest lists whose file is missing or of another size, and why."""
    sizes, lost = location.sizes(), {}
    for name, row in sorted(manifest.rows.items()):
        if name not in sizes:
            lost[name] = "missing"
        elif sizes[name] != row["bytes"]:
            lost[name] = f"{sizes[name]} bytes, the manifest says {row['bytes']}"
    return lost


def run_pairs(plan: PairsPlan, *, progress: bool = True) -> PairsResult:
    """Generate the planned shards on the Ray actor pool (Ray must be initialised)."""
    start = time.perf_counter()
    before, evaluations = len(plan.manifest), 0
    if plan.todo:
        evaluations = _run_pool(plan.job, plan.location, plan.fingerprint, plan.manifest,
                                plan.todo, progress)
    seconds = time.perf_counter() - start
    generated = len(plan.manifest) - before
    present = len(plan.manifest) - len(lost_shards(plan.location, plan.manifest))
    return PairsResult(plan.location.uri, generated, present, seconds,
                       generated * plan.job.samples_per_shard / seconds if generated else 0.0,
                       evaluations)


def generate_pairs(job: PairsJob, out: str, *, progress: bool = True) -> PairsResult:
    """Generate the shards that `out`'s manifest lacks (all of them on a fresh location)."""
    return run_pairs(plan_pairs(job, out), progress=progress)


def room_for(workers: WorkersConfig) -> int:
    """How many workers of this size the cluster has free resources for now."""
    free = ray.available_resources()
    if workers.gpus:
        return int(free.get("GPU", 0) // workers.gpus)
    return int(free.get("CPU", 0) // workers.cpus)


def grow_when_busy(context: ray.data.DataContext) -> None:
    """Ray Data adds an actor when its pool's tasks in flight reach this share of its slots; its
    default (175%) needs shards queued on busy actors, which `actor_pool` does not do."""
    context.autoscaling_config = dataclasses.replace(context.autoscaling_config,
                                                     actor_pool_util_upscaling_threshold=1.0)


def actor_pool(workers: WorkersConfig, shards: int, room: int) -> ray.data.ActorPoolStrategy:
    """The pool for `shards` shards: it starts with as many actors as the cluster has `room` for
    (within min and max, no more than the shards). Each actor holds one shard at a time, so a
    queued shard goes to the next free actor, and the pool grows (as nodes join) while every
    actor is busy and shards wait (`grow_when_busy`). Started at `min` with Ray Data's default of
    queueing shards on busy actors, the digits eval drew each 2-shard sample set on one actor
    while the second CPU idled: Ray Data's autoscaler adds actors only for waiting work."""
    most = min(workers.max or shards, shards)
    least = min(workers.min, shards)
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most,
                                      initial_size=max(least, min(most, room)),
                                      max_tasks_in_flight_per_actor=1)


def _run_pool(job: PairsJob, location: Location, fingerprint: str, manifest: Manifest,
              todo: list[int], progress: bool) -> int:
    """Generate the `todo` shards, recording each in the manifest as it lands; returns the
    samples the teacher evaluated for them."""
    context = ray.data.DataContext.get_current()
    without_ray_data_bars(context)
    context.print_on_execution_start = False
    grow_when_busy(context)
    workers = job.workers
    shards = ray.data.from_items([{"index": k} for k in todo], override_num_blocks=len(todo))
    pool = actor_pool(workers, len(todo), room_for(workers))   # Ray is up: from_items starts it
    results = shards.map_batches(
        ShardWorker, batch_size=1, compute=pool, num_cpus=workers.cpus, num_gpus=workers.gpus,
        fn_constructor_kwargs={"job": dataclasses.asdict(job), "out": location.uri,
                               "fingerprint": fingerprint})
    bar = tqdm(total=len(todo), desc="pairs", unit="shard", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    recent: deque[tuple[float, str]] = deque()
    start, evaluations = time.perf_counter(), 0
    for row in results.iter_rows():
        row = dict(row)
        evaluations += int(row.pop(TEACHER_EVALUATIONS))
        manifest.add(row)
        manifest.write(location)
        now = time.perf_counter()
        recent.append((now, row["worker"]))
        while now - recent[0][0] > 60:
            recent.popleft()
        bar.update(1)
        bar.set_postfix_str(f"{bar.n * job.samples_per_shard / (now - start):.1f} pairs/s, "
                            f"{len({worker for _, worker in recent})} workers active")
    bar.close()
    return evaluations
