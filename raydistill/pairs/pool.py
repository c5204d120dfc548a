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

from raydistill.config import PairsJob, from_dict
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.format import encode_shard, shard_name
from raydistill.pairs.generate import ShardMaker, shard_seed
from raydistill.pairs.manifest import COLUMNS, Manifest, claim_location
from raydistill.storage import Location


def worker_device(job: PairsJob) -> torch.device:
    """CUDA when the job gives workers GPUs (and then CUDA must be there), else the CPU."""
    if job.workers.gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("workers.gpus > 0 but this worker sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def teacher_work(job: PairsJob) -> tuple[str, int]:
    """(solver, teacher steps) behind each target, for the manifest."""
    if job.mode == "ode":
        return job.solver.solver, job.solver.steps
    if job.mode == "progressive":
        return "ddim", 2                        # two teacher DDIM steps per target
    return "x_hat", 1                           # one guided teacher prediction


def shard_row(job: PairsJob, teacher_fingerprint: str, index: int, data: bytes,
              count: int) -> dict:
    solver, steps = teacher_work(job)
    return {
        "shard": shard_name(index), "index": index, "count": count, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "seed": shard_seed(job.seed, index),
        "mode": job.mode, "teacher_fingerprint": teacher_fingerprint, "solver": solver,
        "steps": steps, "w_min": job.guidance.w_min, "w_max": job.guidance.w_max,
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None),   # naive UTC for numpy
        "node": ray.get_runtime_context().get_node_id(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


class ShardWorker:
    """A Ray Data callable class: holds the teacher and commits one shard per input row."""

    def __init__(self, job: dict, out: str, fingerprint: str):
        self.job = from_dict(PairsJob, job)
        torch.set_num_threads(self.job.workers.threads)
        torch.set_flush_denormal(True)
        checkpoint = load_teacher(self.job.teacher)
        if checkpoint.fingerprint != fingerprint:
            raise RuntimeError("the teacher changed since the run started (fingerprint mismatch)")
        self.fingerprint = fingerprint
        self.maker = ShardMaker(self.job, checkpoint, worker_device(self.job))
        self.location = Location.parse(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for index in batch["index"].tolist():
            columns = self.maker.make(index)
            data = encode_shard(index, self.job.mode, columns)
            self.location.write_atomic(shard_name(index), data)
            rows.append(shard_row(self.job, self.fingerprint, index, data, len(columns["c"])))
        return {name: [row[name] for row in rows] for name in COLUMNS}


@dataclass
class PairsPlan:
    job: PairsJob
    location: Location
    fingerprint: str
    manifest: Manifest
    todo: list[int]           # shard indices the manifest lacks


@dataclass
class PairsResult:
    location: str
    generated: int            # shards made by this call
    total: int                # shards the location holds now
    seconds: float
    pairs_per_second: float


def plan_pairs(job: PairsJob, out: str) -> PairsPlan:
    """Check everything about the inputs and claim `out`; no Ray needed, no worker started.

    Raises ConfigError for a missing or mismatched teacher, data that does not fit it, or a
    location holding another run's shards.
    """
    teacher = load_teacher(job.teacher)
    teacher.check_guidance(job.guidance.w_min, job.guidance.w_max, "guidance")
    ShardMaker(job, teacher)                  # validates data and shapes against the teacher
    location = Location.parse(out)
    manifest = Manifest.read(location)
    run = claim_location(location, job, teacher.fingerprint)
    todo = [k for k in range(run["num_shards"]) if shard_name(k) not in manifest]
    return PairsPlan(job, location, teacher.fingerprint, manifest, todo)


def run_pairs(plan: PairsPlan, *, progress: bool = True) -> PairsResult:
    """Generate the planned shards on the Ray actor pool (Ray must be initialised)."""
    start = time.perf_counter()
    if plan.todo:
        _run_pool(plan.job, plan.location, plan.fingerprint, plan.manifest, plan.todo, progress)
    seconds = time.perf_counter() - start
    pairs = len(plan.todo) * plan.job.samples_per_shard
    return PairsResult(plan.location.uri, len(plan.todo), len(plan.manifest), seconds,
                       pairs / seconds if plan.todo else 0.0)


def generate_pairs(job: PairsJob, out: str, *, progress: bool = True) -> PairsResult:
    """Generate the shards that `out`'s manifest lacks (all of them on a fresh location)."""
    return run_pairs(plan_pairs(job, out), progress=progress)


def _run_pool(job: PairsJob, location: Location, fingerprint: str, manifest: Manifest,
              todo: list[int], progress: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    workers = job.workers
    pool = ray.data.ActorPoolStrategy(min_size=min(workers.min, len(todo)),
                                      max_size=min(workers.max or len(todo), len(todo)))
    shards = ray.data.from_items([{"index": k} for k in todo], override_num_blocks=len(todo))
    results = shards.map_batches(
        ShardWorker, batch_size=1, compute=pool, num_cpus=workers.cpus, num_gpus=workers.gpus,
        fn_constructor_kwargs={"job": dataclasses.asdict(job), "out": location.uri,
                               "fingerprint": fingerprint})
    bar = tqdm(total=len(todo), desc="pairs", unit="shard", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    recent: deque[tuple[float, str]] = deque()
    start = time.perf_counter()
    for row in results.iter_rows():
        manifest.add(dict(row))
        manifest.write(location)
        now = time.perf_counter()
        recent.append((now, row["worker"]))
        while now - recent[0][0] > 60:
            recent.popleft()
        bar.update(1)
        bar.set_postfix_str(f"{bar.n * job.samples_per_shard / (now - start):.1f} pairs/s, "
                            f"{len({worker for _, worker in recent})} workers active")
    bar.close()
