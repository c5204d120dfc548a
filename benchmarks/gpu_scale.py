"""DMD2 at Stable Diffusion 1.5's scale on one GPU: raydistill against bare PyTorch.

The job is configs/sd15/dmd.yaml (a one-step generator, an online fake score with its GAN head and
the frozen teacher; 10 fake-score updates per generator update; bf16, ZeRO-2) on a random
SD-1.5-sized teacher written in place (the dry run's writer at full size: UNet 860 M, VAE 84 M,
64 prompts of 77 tokens, 16 images at 512 pixels), one worker with one GPU, `--batch` samples a
step. Measured, the JSON under --out rewritten as each part finishes:
  matmul    the GPU's bf16 matmul rate (8192^3, median of 10): the peak the rest is read against;
  bare      one iteration in plain PyTorch (the method's losses, bf16 autocast over fp32 weights,
            fused AdamW per network, gradient clipping, the same phases, each micro-batch of
            images encoded by the VAE as the loop's data stream does): seconds (median
            of --steps after a warm-up), FLOPs counted by torch.utils.flop_counter, TFLOP/s and
            their share of the matmul rate; peak GPU memory, and again with the networks
            recomputing their activations (memory.activation_checkpointing);
  train     `raydistill train` of the same job for --train-steps: seconds from the call to the
            first step, by phase; seconds per iteration (steady state) and the bare iteration's
            ratio to it; the final checkpoint and shutdown (an upper bound on the seconds a
            checkpoint blocks: only the final one is written, two would not fit a 64 GB disk);
            rank 0's bytes per engine;
  lora      the same run for 2 steps with rank-64 adapters (memory.lora) on the generator and
            the fake score: bytes per engine, seconds per iteration;
  offload   the same run for 2 steps with memory.offload_optimizer: bytes per engine on the GPU
            and in host memory.
CUDA only: elsewhere it prints one line and exits 0. `--tiny` runs every part it can on the dry
run's tiny teacher wherever it is (on a CPU: a check of this script, not a measurement; bf16 is
slow there).
Sized for about 8 minutes of an H100 or H200 beside the wheel install; each run's directory is
removed before the next (an SD-sized checkpoint of the two engines is about 24 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from _record import write_record

from raydistill.config import LoraConfig, TrainJob, read_config
from raydistill.dryrun import dry_run_job

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "sd15", "dmd.yaml")


#: the runs of 2 steps with a memory lever: rank-64 adapters on the generator and the fake score
#: (DMD2's SDXL LoRA rank) and ZeRO-Offload of the optimizer state
LEVERS = {"lora": {"lora": LoraConfig(rank=64)}, "offload": {"offload_optimizer": True}}


def matmul_tflops(device: torch.device, size: int = 8192, repeat: int = 10) -> float:
    """The device's bf16 matmul rate: 2 size^3 FLOPs per product, the median of `repeat`."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e12


def sized_job(workdir: str, batch: int, steps: int, tiny: bool, gpus: int) -> tuple[TrainJob, str]:
    """configs/sd15/dmd.yaml on a random teacher of SD-1.5's size (or the dry run's tiny one),
    one worker (its torch threads no more than the machine's cores), `batch` samples a step for
    `steps` steps, only the final checkpoint."""
    data = read_config(CONFIG, [f"workers.gpus={gpus}"])
    job, line = dry_run_job(data, workdir, full_size=not tiny)
    optim = dataclasses.replace(job.optim, steps=steps, batch_size=batch)
    workers = dataclasses.replace(job.workers, threads=min(job.workers.threads,
                                                           os.cpu_count() or 1))
    return dataclasses.replace(job, optim=optim, workers=workers, checkpoint_every=steps + 1,
                               log_every=1), line


def bare_iteration(job: TrainJob, device: torch.device, recompute: bool):
    """One DMD2 iteration in plain PyTorch, as a function, on the job's networks."""
    import numpy as np

    from raydistill.methods.base import DATA
    from raydistill.models.checkpoint import load_teacher
    from raydistill.models.memory import checkpoint_activations
    from raydistill.train.build import build_method, student_config

    teacher = load_teacher(job.teacher)
    method = build_method(job, teacher, student_config(job, teacher), device)
    method.start_round(0, {})
    method.micro_batch = job.optim.batch_size
    modules = method.modules()
    if recompute:
        for name, network in modules.items():
            checkpoint_activations(network, name)
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=job.optim.lr,
                                          betas=tuple(job.optim.betas),
                                          fused=device.type == "cuda")
                  for name, module in modules.items()}
    arrays = np.load(job.data.path)
    images = (torch.from_numpy(arrays["images"][:job.optim.batch_size]).float() / 127.5 - 1
              ).to(device)
    labels = torch.from_numpy(arrays["labels"][:len(images)]).to(device)
    autoencoder = teacher.conditioning.autoencoder
    if autoencoder is not None:
        autoencoder.to(device)
    steps = [0]

    def batch(reads: tuple[str, ...]) -> dict:
        """What the loop's data stream hands a micro-batch: the images encoded to latents."""
        if DATA not in reads:
            return {}
        with torch.no_grad():
            x = autoencoder.encode(images) if autoencoder is not None else images
        return {DATA: {"x": x, "c": labels}}

    def iterate() -> None:
        method.seed(steps[0], device)
        steps[0] += 1
        for phase in method.phases():
            for name, module in modules.items():
                module.requires_grad_(name == phase.module)
            for _ in range(phase.updates):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = method.loss(batch(phase.reads), phase)["loss"]
                optimizers[phase.module].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(modules[phase.module].parameters(),
                                               job.optim.grad_clip)
                optimizers[phase.module].step()

    return iterate


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeat` calls after one warm-up."""
    times = []
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bare_figures(job: TrainJob, device: torch.device, steps: int, peak: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    figures: dict = {}
    for recompute in (False, True):
        iterate = bare_iteration(job, device, recompute)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(iterate, steps, device)
        key = "recomputed" if recompute else "held"
        figures[key] = {"iteration_s": seconds}
        if device.type == "cuda":
            figures[key]["peak_bytes"] = torch.cuda.max_memory_allocated()
        if not recompute:
            with FlopCounterMode(display=False) as counter:
                iterate()
            flops = counter.get_total_flops()
            figures["flops"], figures["tflops"] = flops, flops / seconds / 1e12
            if peak:
                figures["share_of_matmul_rate"] = figures["tflops"] / peak
        del iterate
        free(device)
    return figures


def free(device: torch.device) -> None:
    """Release what this process holds on the GPU (the training worker is another process)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_figures(job: TrainJob, out: str) -> dict:
    """Start-up, steady-state seconds per iteration, the final checkpoint and rank 0's bytes of a
    `raydistill train` run; its directory removed afterwards."""
    import ray

    from raydistill.train.driver import train

    called = time.time()
    result = train(job, out, progress=False)
    ray.shutdown()
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    shutil.rmtree(out, ignore_errors=True)
    phases = result.outside_loop
    steady = rows[1:] or rows
    return {"to_first_step_s": result.metrics["loop_at"] - called, "outside_loop_s": phases,
            "iteration_s": job.optim.batch_size / statistics.median(r["samples_per_s"]
                                                                    for r in steady),
            "final_checkpoint_and_shutdown_s": phases["final checkpoint and shutdown"],
            "bytes": {k: v for k, v in rows[-1].items() if k.startswith(("bytes/", "host_bytes/"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="bare iterations timed")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(
        os.path.dirname(__file__), "results"), "gpu_scale.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_scale: no CUDA device here; nothing measured (it runs on one GPU; --tiny "
              "checks the script on a tiny teacher)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    record: dict = {"benchmark": "gpu_scale", "tiny": args.tiny, "batch": args.batch,
                    "device": torch.cuda.get_device_name() if cuda else "cpu"}
    peak = None
    if cuda:
        peak = record["matmul_tflops"] = matmul_tflops(device)
        print(f"matmul: {peak:.0f} TFLOP/s bf16", flush=True)
        write_record(args.out, record)
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_SCALE_WORKDIR")) as workdir:
        start = time.perf_counter()
        job, line = sized_job(workdir, args.batch, args.train_steps, args.tiny, int(cuda))
        record["teacher_written_s"] = time.perf_counter() - start
        print(f"{line} ({record['teacher_written_s']:.0f} s)", flush=True)
        record["bare"] = bare = bare_figures(job, device, args.steps, peak)
        share = f", {bare['share_of_matmul_rate']:.0%} of the matmul rate" if peak else ""
        print(f"bare: {bare['held']['iteration_s']:.2f} s an iteration, "
              f"{bare['tflops']:.1f} TFLOP/s{share}; with activation checkpointing "
              f"{bare['recomputed']['iteration_s']:.2f} s", flush=True)
        write_record(args.out, record)
        record["train"] = run = train_figures(job, os.path.join(workdir, "run"))
        record["train"]["vs_bare"] = bare["held"]["iteration_s"] / run["iteration_s"]
        print(f"train: {run['to_first_step_s']:.0f} s to the first step, "
              f"{run['iteration_s']:.2f} s an iteration ({run['vs_bare']:.2f}x bare), final "
              f"checkpoint and shutdown {run['final_checkpoint_and_shutdown_s']:.0f} s",
              flush=True)
        write_record(args.out, record)
        for name, lever in LEVERS.items():
            short = dataclasses.replace(
                job, optim=dataclasses.replace(job.optim, steps=2, ema_decay=0.0),
                checkpoint_every=3, memory=dataclasses.replace(job.memory, **lever))
            record[name] = figures = train_figures(short, os.path.join(workdir, name))
            print(f"{name}: bytes {figures['bytes']}, {figures['iteration_s']:.2f} s an "
                  "iteration", flush=True)
            write_record(args.out, record)


if __name__ == "__main__":
    main()
