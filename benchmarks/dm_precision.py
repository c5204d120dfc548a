"""What evaluating DMD's fake score in fp32 for the DM gradient costs, and what it changes, when the
networks train in bf16 (the digits UNet, random weights, DMD2's fake_updates = 5, batch 32, ZeRO-0,
one torch thread, world of one, no Ray).

Each round, in one fresh process, `run_worker` trains the same job twice from the same weights:
  fp32   the DM gradient's x_hat_fake computed in fp32 from the fake score's bf16 weights (what
         the loop does);
  bf16   the same, computed in bf16 (the fake score's own forward, as before);
and reports seconds per iteration of each (the median over logging windows after the first),
their ratio, and, on a batch after training, how far the bf16 x_hat_fake is from the fp32 one
relative to the DM gradient's own size, mean|x_fake_bf16 - x_fake_fp32| / mean|x_fake_fp32 -
x_real|. Prints one line per round and the median and range over rounds; writes JSON (default
benchmarks/results/dm_precision.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from _record import spread, write_record
from dmd_step import dmd_job
from train_throughput import BATCH, fresh_method, in_fresh_process, make_teacher, single_process

from raydistill.config import TrainJob, UNetConfig, from_dict, to_dict

DIGITS_UNET = UNetConfig(base_channels=32, channel_mult=[1, 2], attention_resolutions=[])


def iteration_seconds(job: TrainJob, precise: bool):
    """Seconds per iteration of `run_worker` on the job, the DM gradient's fake score in fp32 or
    (precise False) in bf16; and the method as training left it."""
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import student_config
    from raydistill.train.loop import WorkerContext, run_worker

    windows: list[dict] = []
    method = fresh_method(job)
    if not precise:
        method.precise_modules = ()
    teacher = load_teacher(job.teacher)
    run_worker(job, method, {}, WorkerContext(0, 1, torch.device("cpu"),
                                              lambda metrics, directory: None,
                                              logged=windows.append),
               student_config(job, teacher), teacher)
    return BATCH / statistics.median(m["samples_per_s"] for m in windows[1:]), method


@torch.no_grad()
def bf16_error(method) -> float:
    """mean|x_fake_bf16 - x_fake_fp32| / mean|x_fake_fp32 - x_real| on one generator batch."""
    from raydistill.models.denoiser import denoise
    from raydistill.train.engine import evaluated_in_fp32

    method.seed(12345, torch.device("cpu"))
    x, cond = method.generate()
    t = method.times(len(x), method.dmd.t_min, method.dmd.t_max)
    z_t = method.noised(x, t)
    module, prediction = method.fake_score.module, method.fake_config.prediction
    low = denoise(module, method.schedule, prediction, z_t, t, cond)
    full = denoise(evaluated_in_fp32(module), method.schedule, prediction, z_t, t, cond)
    real = method.teacher(z_t, t, cond).to(x.dtype)
    return float((low - full).abs().mean() / (full - real).abs().mean())


def _round(job_dict: dict, queue) -> None:
    single_process()
    job = from_dict(TrainJob, job_dict)
    fp32_s, method = iteration_seconds(job, precise=True)
    bf16_s, _ = iteration_seconds(job, precise=False)
    queue.put({"fp32_ms": fp32_s * 1e3, "bf16_ms": bf16_s * 1e3, "ratio": fp32_s / bf16_s,
               "bf16_error": bf16_error(method)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "dm_precision.json"))
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be at least 20 (the loop logs every 10 steps and the first "
                     "window is left out)")
    rounds = []
    with tempfile.TemporaryDirectory() as workdir:
        job = dmd_job(make_teacher(workdir, DIGITS_UNET), **{
            "optim.steps": args.steps, "dmd.fake_updates": 5, "deepspeed.precision": "bf16"})
        for r in range(args.rounds):
            figures = in_fresh_process(_round, to_dict(job))
            rounds.append(figures)
            print(f"round {r}: iteration {figures['fp32_ms']:.1f} ms with the DM gradient's fake "
                  f"score in fp32, {figures['bf16_ms']:.1f} ms in bf16 ({figures['ratio']:.3f}x); "
                  f"bf16's x_hat_fake off by {figures['bf16_error']:.3f} of the DM gradient",
                  flush=True)
    summary = {key: spread(r[key] for r in rounds) for key in rounds[0]}

    def fig(key: str, unit: str = "", digits: int = 2) -> str:
        s = summary[key]
        return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"

    print(f"median (range) of {len(rounds)} rounds: DMD2 iteration (5 fake-score updates + 1 "
          f"generator update, bf16) {fig('fp32_ms', ' ms', 1)} with the DM gradient's fake score "
          f"in fp32, {fig('bf16_ms', ' ms', 1)} in bf16: {fig('ratio', 'x', 3)}; bf16's "
          f"x_hat_fake off by {fig('bf16_error', '', 3)} of the DM gradient's size")
    write_record(args.out, {"benchmark": "dm_precision", "batch": BATCH, "steps": args.steps,
                            "fake_updates": 5, "rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()
