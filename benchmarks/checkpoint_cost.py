"""What a training checkpoint costs: the seconds it stops training for and its bytes on disk,
through `raydistill train` against a bare `torch.save` of the same networks and optimizer state.

A DMD run (a generator and an online fake score, each its own DeepSpeed engine under ZeRO-2, 2 Ray
Train workers, fp32) of a random teacher at two sizes, the smoke UNet (16 channels, [1, 2]) and the
digits UNet (32 channels, [1, 2]), 16x16, batch 32, a checkpoint every 10 steps; each checkpoint is
written into the run's storage and registered with Ray Train (train/driver.py: in_storage). The
figures are the loop's own (train_log.jsonl: checkpoint_s, checkpoint_bytes, logged for the last
checkpoint), over the run's checkpoints but its last. The baseline, in this process after each
run: both networks and their torch AdamW state (moments allocated by one step) written with one
`torch.save` to a file beside the run (the median of 5 saves). DeepSpeed's checkpoint holds more
than that state (ZeRO-2 keeps an fp32 master partition of each network beside its weights), so
the bytes ratio above 1 is what DeepSpeed stores, not a second copy. The same run again with
`storage` a file:// URI (standing in for remote storage): each rank writes its part locally and Ray
Train uploads it in the background, so the seconds training stops for are the local write's. Prints
one line per size and round and the median and range over rounds, and writes JSON (default
benchmarks/results/checkpoint_cost.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from _record import spread, write_record
from dmd_step import SMOKE_UNET, dmd_job
from train_throughput import fresh_method, make_teacher

from raydistill.config import UNetConfig

SIZES = {"smoke": SMOKE_UNET, "digits": UNetConfig(base_channels=32, channel_mult=[1, 2],
                                                     attention_resolutions=[])}
EVERY = 10


def loop_checkpoints(teacher: str, out: str, steps: int, storage: str = "") -> list[dict]:
    """checkpoint_s and checkpoint_bytes of each checkpoint of a `raydistill train` run but its
    last (each is logged with the step after it), kept in `storage` (default: the run's)."""
    import ray

    from raydistill.train.driver import train

    job = dmd_job(teacher, **{"optim.steps": steps, "workers.num": 2, "deepspeed.zero_stage": 2,
                              "checkpoint_every": EVERY, "log_every": EVERY, "storage": storage})
    train(job, out, progress=False)
    ray.shutdown()
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{"seconds": r["checkpoint_s"], "bytes": r["checkpoint_bytes"]} for r in rows
            if "checkpoint_s" in r]


def bare_save(teacher: str, path: str, repeat: int = 5) -> dict:
    """Seconds (median of `repeat`) and bytes of one torch.save of both networks and their AdamW
    state."""
    job = dmd_job(teacher)
    method = fresh_method(job)
    method.micro_batch = job.optim.batch_size
    method.seed(0, torch.device("cpu"))
    state = {}
    for phase in method.phases():
        module = method.modules()[phase.module]
        optimizer = torch.optim.AdamW(module.parameters(), lr=job.optim.lr)
        method.loss({}, phase)["loss"].backward()
        optimizer.step()
        state[phase.module] = {"model": module.state_dict(), "optimizer": optimizer.state_dict()}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        torch.save(state, path)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "bytes": os.path.getsize(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "checkpoint_cost.json"))
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for size, unet in SIZES.items():
                teacher = make_teacher(workdir, unet, name=f"teacher-{size}")
                run = os.path.join(workdir, f"{size}-{r}")
                loop = loop_checkpoints(teacher, run, args.steps)
                uploaded = loop_checkpoints(teacher, run + "-uploaded", args.steps,
                                            storage=f"file://{run}-storage")
                bare = bare_save(teacher, os.path.join(workdir, f"bare-{size}.pt"))
                figures = {"checkpoint_s": statistics.median(c["seconds"] for c in loop),
                           "checkpoint_bytes": statistics.median(c["bytes"] for c in loop),
                           "uploaded_checkpoint_s": statistics.median(c["seconds"]
                                                                      for c in uploaded),
                           "bare_save_s": bare["seconds"], "bare_bytes": bare["bytes"]}
                figures["seconds_vs_bare"] = figures["checkpoint_s"] / figures["bare_save_s"]
                figures["bytes_vs_bare"] = figures["checkpoint_bytes"] / figures["bare_bytes"]
                figures["uploaded_vs_in_place"] = (figures["uploaded_checkpoint_s"]
                                                   / figures["checkpoint_s"])
                rounds[size].append(figures)
                print(f"round {r} {size}: a checkpoint stops training {figures['checkpoint_s']:.3f} s "
                      f"({len(loop)} checkpoints, median) and holds "
                      f"{figures['checkpoint_bytes'] / 1e6:.2f} MB; torch.save of the networks and "
                      f"AdamW state {figures['bare_save_s']:.3f} s, {bare['bytes'] / 1e6:.2f} MB "
                      f"({figures['seconds_vs_bare']:.1f}x the time, "
                      f"{figures['bytes_vs_bare']:.2f}x the bytes); uploaded to file:// storage "
                      f"{figures['uploaded_checkpoint_s']:.3f} s", flush=True)
    summary = {size: {key: spread(f[key] for f in figures) for key in figures[0]}
               for size, figures in rounds.items()}
    for size, s in summary.items():
        print(f"{size}, median (range) of {args.rounds} rounds: "
              f"{s['checkpoint_s']['median']:.3f} s ({s['checkpoint_s']['min']:.3f}.."
              f"{s['checkpoint_s']['max']:.3f}) a checkpoint, "
              f"{s['checkpoint_bytes']['median'] / 1e6:.2f} MB; "
              f"{s['seconds_vs_bare']['median']:.1f}x ({s['seconds_vs_bare']['min']:.1f}.."
              f"{s['seconds_vs_bare']['max']:.1f}) a bare torch.save's time, "
              f"{s['bytes_vs_bare']['median']:.2f}x its bytes; with an upload to file:// storage "
              f"{s['uploaded_checkpoint_s']['median']:.3f} s "
              f"({s['uploaded_checkpoint_s']['min']:.3f}..{s['uploaded_checkpoint_s']['max']:.3f}),"
              f" {s['uploaded_vs_in_place']['median']:.2f}x in place")
    write_record(args.out, {"benchmark": "checkpoint_cost", "steps": args.steps, "every": EVERY,
                            "rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()
