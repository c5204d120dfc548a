"""Pair-generation throughput: a bare single-process PyTorch loop vs the Ray actor pipeline.

Measured in one run on the same teacher (the digits UNet architecture, random weights: the compute
is what matters) and solver (DDIM under CFG):
  1. bare loop, 1 torch thread: ShardMaker.make(k) for every shard (teacher math only);
  2. Ray pipeline, 1 worker x 1 thread: everything (actor start, teacher, tar, atomic write,
     manifest) -- goal >= 0.90x the bare loop;
  3. Ray pipeline, 2 workers x 1 thread vs (2) -- goal >= 1.7x on a 2-core machine.
Prints one line per figure and writes JSON (default benchmarks/results/pairs_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import ray
import torch

from raydistill.config import ModelConfig, PairsJob, UNetConfig, from_dict
from raydistill.models import build_network, save_checkpoint
from raydistill.pairs.generate import ShardMaker
from raydistill.pairs.pool import generate_pairs, load_teacher


def make_job(teacher: str, shards: int, workers: int) -> PairsJob:
    return from_dict(PairsJob, {
        "mode": "ode", "teacher": {"checkpoint": teacher}, "num_shards": shards,
        "samples_per_shard": 64, "batch_size": 64, "solver": {"solver": "ddim", "steps": 8},
        "guidance": {"w_min": 0.0, "w_max": 2.0},
        "workers": {"min": workers, "max": workers, "cpus": 1, "threads": 1}})


def bare_loop(job: PairsJob) -> float:
    """Pairs/s of a plain loop over the same shards, in this process, 1 torch thread."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    maker = ShardMaker(job, load_teacher(job))
    maker.make(0)                                      # warm-up, as an actor's first shard is not
    start = time.perf_counter()
    for k in range(job.num_shards):
        maker.make(k)
    return job.num_shards * job.samples_per_shard / (time.perf_counter() - start)


def ray_pipeline(job: PairsJob, workdir: str, name: str) -> float:
    result = generate_pairs(job, os.path.join(workdir, name), progress=False)
    assert result.generated == job.num_shards
    return result.pairs_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "pairs_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config = ModelConfig(unet=UNetConfig(attention_resolutions=[]))
        teacher = os.path.join(workdir, "teacher")
        network = build_network(config)
        for p in network.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_checkpoint(teacher, network, config)
        one, two = make_job(teacher, args.shards, 1), make_job(teacher, args.shards, 2)
        bare = bare_loop(one)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray_one = ray_pipeline(one, workdir, "one")
        ray_two = ray_pipeline(two, workdir, "two")
        ray.shutdown()
    figures = {
        "bare_pairs_per_s": bare, "ray_1worker_pairs_per_s": ray_one,
        "ray_2workers_pairs_per_s": ray_two, "ray_1worker_vs_bare": ray_one / bare,
        "ray_2workers_vs_1worker": ray_two / ray_one,
    }
    print(f"bare loop (1 thread):          {bare:8.1f} pairs/s")
    print(f"ray, 1 worker x 1 thread:      {ray_one:8.1f} pairs/s  = {ray_one / bare:.2f}x bare "
          f"(goal >= 0.90)")
    print(f"ray, 2 workers x 1 thread:     {ray_two:8.1f} pairs/s  = {ray_two / ray_one:.2f}x "
          f"1 worker (goal >= 1.70)")
    record = {"benchmark": "pairs_throughput", "shards": args.shards, "samples_per_shard": 64,
              "teacher": "digits UNet (32ch, [1,2]), DDIM 8 steps, CFG", "cpus": os.cpu_count(),
              "machine": platform.machine(), "torch": torch.__version__, **figures}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
