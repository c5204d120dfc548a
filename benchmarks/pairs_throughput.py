"""Pair-generation throughput: a bare single-process PyTorch loop vs the Ray actor pipeline.

Measured in rounds on the same teacher (the digits UNet architecture, random weights: the compute
is what matters) and solver (DDIM under CFG):
  1. bare loop, 1 torch thread, in a fresh process: ShardMaker.make(k) per shard (teacher math
     only), measured before and after the Ray runs and averaged (the machines are shared and
     drift);
  2. Ray pipeline, 1 worker x 1 thread: teacher, tar, sha256, atomic write, manifest -- goal >=
     0.90x the bare loop;
  3. Ray pipeline, 2 workers x 1 thread vs (2) -- goal >= 1.7x on a 2-core machine.
Ray figures are given two ways: steady state (shards committed per second between the first and
the last commit, what a long job runs at) and end to end (including the one-time actor start-up:
process spawn, torch import, teacher load), with the start-up seconds. The machines this runs on
drift by tens of percent within minutes, so each round compares its Ray runs with the bare loops
around them, and the summary is the median and range of each ratio over rounds.
Prints one line per round and the summary, and writes JSON (default
benchmarks/results/pairs_throughput.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import tempfile
import time

import ray
import torch
from _record import spread, write_record

from raydistill.config import ModelConfig, PairsJob, UNetConfig, from_dict
from raydistill.models import build_network, save_checkpoint
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.generate import ShardMaker
from raydistill.pairs.manifest import Manifest
from raydistill.pairs.pool import generate_pairs
from raydistill.storage import Location


def make_job(teacher: str, shards: int, workers: int) -> PairsJob:
    return from_dict(PairsJob, {
        "mode": "ode", "teacher": {"checkpoint": teacher}, "num_shards": shards,
        "samples_per_shard": 64, "batch_size": 64, "solver": {"solver": "ddim", "steps": 8},
        "guidance": {"w_min": 0.0, "w_max": 2.0},
        "workers": {"min": workers, "max": workers, "cpus": 1, "threads": 1}})


def bare_loop(job: PairsJob, shards: int, offset: int = 0) -> float:
    """Pairs/s of a plain loop over shards of the same job, in this process, 1 torch thread."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    maker = ShardMaker(job, load_teacher(job.teacher))
    maker.make(offset)                                 # warm-up
    start = time.perf_counter()
    for k in range(offset, offset + shards):
        maker.make(k)
    return shards * job.samples_per_shard / (time.perf_counter() - start)


def _bare_worker(job: dict, shards: int, offset: int, queue) -> None:
    queue.put(bare_loop(from_dict(PairsJob, job), shards, offset))


def bare_processes(job: PairsJob, shards: int, processes: int) -> float:
    """Aggregate pairs/s of `processes` bare loops running at once, each in a fresh process with
    OMP_NUM_THREADS=1 like a Ray worker. With 2 processes this is the machine's own scaling
    ceiling for two 1-thread workers (shared caches, memory bandwidth, SMT siblings)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_bare_worker,
                             args=(dataclasses.asdict(job), shards, i * shards, queue))
             for i in range(processes)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def ray_pipeline(job: PairsJob, out: str) -> dict:
    """End-to-end and steady-state pairs/s of one generate_pairs call."""
    start = time.time()
    result = generate_pairs(job, out, progress=False)
    assert result.generated == job.num_shards
    commits = sorted(row["created_at"].timestamp()
                     for row in Manifest.read(Location.parse(out)).rows.values())
    steady = (len(commits) - 1) * job.samples_per_shard / (commits[-1] - commits[0])
    return {"end_to_end": result.pairs_per_second, "steady": steady,
            "startup_s": commits[0] - start}


def one_round(teacher: str, shards: int, workdir: str) -> dict:
    """A round's rates and ratios: the Ray runs between two bare loops, then two bare loops at
    once (the machine's ceiling for two 1-thread workers)."""
    one, two = make_job(teacher, shards, 1), make_job(teacher, shards, 2)
    bare_before = bare_processes(one, shards // 2, 1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray_one = ray_pipeline(one, os.path.join(workdir, "one"))
    ray_two = ray_pipeline(two, os.path.join(workdir, "two"))
    ray.shutdown()
    bare_after = bare_processes(one, shards // 2, 1)
    bare_two = bare_processes(one, shards // 2, 2)
    bare = (bare_before + bare_after) / 2
    return {
        "bare_pairs_per_s": bare, "bare_before": bare_before, "bare_after": bare_after,
        "ray_1worker": ray_one, "ray_2workers": ray_two,
        "ray_1worker_vs_bare_steady": ray_one["steady"] / bare,
        "ray_1worker_vs_bare_end_to_end": ray_one["end_to_end"] / bare,
        "ray_2workers_vs_1worker_steady": ray_two["steady"] / ray_one["steady"],
        "ray_2workers_vs_1worker_end_to_end": ray_two["end_to_end"] / ray_one["end_to_end"],
        "bare_2processes_pairs_per_s": bare_two, "bare_2processes_vs_1": bare_two / bare,
    }


RATIOS = {  # key: (what it is, goal)
    "ray_1worker_vs_bare_steady": ("1 worker / bare loop, steady", 0.90),
    "ray_1worker_vs_bare_end_to_end": ("1 worker / bare loop, end to end", None),
    "ray_2workers_vs_1worker_steady": ("2 workers / 1 worker, steady", 1.70),
    "ray_2workers_vs_1worker_end_to_end": ("2 workers / 1 worker, end to end", None),
    "bare_2processes_vs_1": ("machine ceiling: 2 bare loops at once / 1", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "pairs_throughput.json"))
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as workdir:
        config = ModelConfig(unet=UNetConfig(attention_resolutions=[]))
        teacher = os.path.join(workdir, "teacher")
        network = build_network(config)
        for p in network.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_checkpoint(teacher, network, config)
        for r in range(args.rounds):
            f = one_round(teacher, args.shards, os.path.join(workdir, f"round{r}"))
            rounds.append(f)
            print(f"round {r}: bare loop {f['bare_pairs_per_s']:.1f} pairs/s (before "
                  f"{f['bare_before']:.1f}, after {f['bare_after']:.1f}); ray 1 worker "
                  f"{f['ray_1worker']['steady']:.1f} steady, {f['ray_1worker']['end_to_end']:.1f} "
                  f"end to end (start-up {f['ray_1worker']['startup_s']:.1f} s); 2 workers "
                  f"{f['ray_2workers']['steady']:.1f} steady, "
                  f"{f['ray_2workers']['end_to_end']:.1f} end to end; 2 bare loops at once "
                  f"{f['bare_2processes_pairs_per_s']:.1f}", flush=True)
    summary = {key: spread(r[key] for r in rounds) for key in RATIOS}
    print(f"median (range) of {len(rounds)} rounds, {args.shards} shards of 64 pairs:")
    for key, (what, goal) in RATIOS.items():
        s = summary[key]
        print(f"  {what}: {s['median']:.2f}x ({s['min']:.2f}..{s['max']:.2f})"
              + (f", goal >= {goal:.2f}" if goal else ""))
    write_record(args.out, {"benchmark": "pairs_throughput", "shards": args.shards,
                            "samples_per_shard": 64,
                            "teacher": "digits UNet (32ch, [1,2]), DDIM 8 steps, CFG",
                            "rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()
