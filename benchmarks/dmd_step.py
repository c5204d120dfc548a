"""One DMD iteration (a fake-score update, then a generator update) through raydistill against a
bare PyTorch DMD step, and the per-rank memory of its two engines and its frozen teacher.

The smoke teacher's UNet (16 channels, [1, 2], 16x16, random weights), CFG at w = 1, batch 32, no
regression loss and no GAN head (the DM gradient and the fake score's denoising loss only), one
torch thread per process. Each round times:
  bare        both updates in plain PyTorch: the method's two losses, torch AdamW per network,
              gradient clipping, the fake score's parameters frozen during the generator's
              backward (a fresh process, world of one);
  loop        raydistill's loop (`run_worker`: two DeepSpeed ZeRO-0 engines, the phases, the
              gradient scope, the metrics) in that process, no Ray;
  zero0/zero3 `raydistill train` on 2 Ray Train workers at ZeRO-0 and ZeRO-3: seconds per
              iteration (steady state: the median over logging windows after the first) and
              rank 0's bytes of each engine's weights + optimizer state and of the teacher
              (the loop's bytes/<name> figures).
The loop's fixed cost is its iteration time minus the bare one (the bare time is the mean of the
runs before and after the loop). Prints one line per round and the median and range over rounds,
and writes JSON (default benchmarks/results/dmd_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
from _record import spread, write_record
from train_throughput import (
    BATCH,
    fresh_method,
    in_fresh_process,
    make_teacher,
    seconds,
    single_process,
)

from raydistill.config import TrainJob, UNetConfig, from_dict, to_dict

SMOKE_UNET = UNetConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[])


def dmd_job(teacher: str, **changes) -> TrainJob:
    job = {"method": "dmd", "teacher": {"checkpoint": teacher},
           "guidance": {"w_min": 1.0, "w_max": 1.0},
           "dmd": {"regression_weight": 0.0, "fake_updates": 1},
           "optim": {"steps": 60, "batch_size": BATCH, "lr": 1e-5, "betas": [0.0, 0.999],
                     "warmup_steps": 0, "ema_decay": 0.0},
           "workers": {"num": 1, "threads": 1}, "deepspeed": {"zero_stage": 0},
           "checkpoint_every": 1000, "log_every": 10, "max_failures": 0}
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        job[section] = {**job[section], leaf: value} if leaf else value
    return from_dict(TrainJob, job)


def bare_step(job: TrainJob):
    """One bare DMD iteration: the method's losses, torch AdamW, clipping, no DeepSpeed."""
    method = fresh_method(job)
    method.micro_batch = BATCH
    modules = method.modules()
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=job.optim.lr,
                                          betas=tuple(job.optim.betas))
                  for name, m in modules.items()}
    phases, step = method.phases(), [0]

    def iterate() -> None:
        method.seed(step[0], torch.device("cpu"))
        step[0] += 1
        for phase in phases:
            for name, module in modules.items():
                module.requires_grad_(name == phase.module)
            loss = method.loss({}, phase)["loss"]
            optimizers[phase.module].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules[phase.module].parameters(), job.optim.grad_clip)
            optimizers[phase.module].step()
    return iterate


def loop_seconds(job: TrainJob) -> float:
    """Steady-state seconds per iteration of `run_worker` (world of one, no Ray)."""
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import student_config
    from raydistill.train.loop import WorkerContext, run_worker

    windows: list[dict] = []
    method = fresh_method(job)
    context = WorkerContext(0, 1, torch.device("cpu"), lambda metrics, directory: None,
                            logged=windows.append)
    teacher = load_teacher(job.teacher)
    run_worker(job, method, {}, context, student_config(job, teacher), teacher)
    return BATCH / statistics.median(m["samples_per_s"] for m in windows[1:])


def _local(job_dict: dict, steps: int, queue) -> None:
    single_process()
    job = from_dict(TrainJob, job_dict)
    before = seconds(bare_step(job), steps)
    loop = loop_seconds(job)
    queue.put({"bare_s": (before + seconds(bare_step(job), steps)) / 2, "loop_s": loop})


def ray_figures(job: TrainJob, out: str) -> dict:
    """Seconds per iteration and rank 0's bytes by module of a `raydistill train` run."""
    import ray

    from raydistill.train.driver import train

    train(job, out, progress=False)
    ray.shutdown()
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rate = statistics.median(r["samples_per_s"] for r in rows[1:])
    return {"iteration_s": BATCH / rate,
            "bytes": {k.partition("/")[2]: v for k, v in rows[-1].items()
                      if k.startswith("bytes/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "dmd_step.json"))
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as workdir:
        teacher = make_teacher(workdir, SMOKE_UNET, name="teacher")
        job = dmd_job(teacher, **{"optim.steps": args.steps})
        for r in range(args.rounds):
            local = in_fresh_process(_local, to_dict(job), args.steps)
            ray = {f"zero{stage}": ray_figures(
                dmd_job(teacher, **{"optim.steps": args.steps, "workers.num": 2,
                                    "deepspeed.zero_stage": stage}),
                os.path.join(workdir, f"zero{stage}-{r}")) for stage in (0, 3)}
            figures = {"bare_ms": local["bare_s"] * 1e3, "loop_ms": local["loop_s"] * 1e3,
                       "loop_overhead_ms": (local["loop_s"] - local["bare_s"]) * 1e3,
                       "loop_vs_bare": local["bare_s"] / local["loop_s"],
                       **{f"{k}_ms": v["iteration_s"] * 1e3 for k, v in ray.items()},
                       "bytes": {k: v["bytes"] for k, v in ray.items()}}
            rounds.append(figures)
            print(f"round {r}: bare DMD iteration {figures['bare_ms']:.1f} ms; loop "
                  f"{figures['loop_ms']:.1f} ms (+{figures['loop_overhead_ms']:.1f} ms, "
                  f"{figures['loop_vs_bare']:.2f}x); 2 workers: ZeRO-0 "
                  f"{figures['zero0_ms']:.1f} ms, ZeRO-3 {figures['zero3_ms']:.1f} ms per iteration",
                  flush=True)
    summary = {key: spread(r[key] for r in rounds) for key in rounds[0] if key != "bytes"}
    memory = rounds[-1]["bytes"]

    def fig(key: str, unit: str) -> str:
        s = summary[key]
        return f"{s['median']:.2f}{unit} ({s['min']:.2f}..{s['max']:.2f})"

    print(f"median (range) of {len(rounds)} rounds: bare DMD iteration {fig('bare_ms', ' ms')}; "
          f"loop {fig('loop_ms', ' ms')}, fixed cost {fig('loop_overhead_ms', ' ms')}, "
          f"{fig('loop_vs_bare', 'x')} bare; 2 workers ZeRO-0 {fig('zero0_ms', ' ms')}, ZeRO-3 "
          f"{fig('zero3_ms', ' ms')}")
    for stage, sizes in memory.items():
        total = sum(sizes.values())
        print(f"per-rank bytes, 2 workers, {stage}: " + ", ".join(
            f"{name} {value / 1e6:.2f} MB" for name, value in sizes.items())
            + f"; total {total / 1e6:.2f} MB")
    trained = {stage: sum(v for k, v in sizes.items() if k != "teacher")
               for stage, sizes in memory.items()}
    print(f"ZeRO-3 / ZeRO-0 per-rank bytes of the two trained engines: "
          f"{trained['zero3'] / trained['zero0']:.2f}")
    write_record(args.out, {"benchmark": "dmd_step", "batch": BATCH, "steps": args.steps,
                            "rounds": rounds, "summary": summary, "bytes_per_rank": memory})


if __name__ == "__main__":
    main()
