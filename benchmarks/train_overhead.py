"""The training loop's fixed cost per step: raydistill's loop against a bare PyTorch loop.

Three step sizes, each progressive distillation under CFG (w = 1) toward a 4-step student from
precomputed targets (pair shards), batch 32, 1 worker, 1 torch thread:
  tiny    an MLP student of a 64-dimensional analytic mixture: a step of a few milliseconds on
          the CPU, standing in for a GPU-speed step;
  smoke   the smoke teacher's UNet (16 channels, [1, 2]) at 16x16;
  digits  the digits teacher's UNet (32 channels, [1, 2]) at 16x16.
At each size, one step is timed four ways:
  bare       torch AdamW, gradient clipping, batches held in memory (a fresh process);
  deepspeed  the same step through a DeepSpeed ZeRO-0 engine, `engine.backward`, `engine.step`;
  loop       raydistill's training loop (`run_worker`) in that process: DeepSpeed, the method's
             seeding, the non-finite checks, logging every `log_every` steps (the default), the
             batches coming from an in-memory stream; no Ray;
  ray        `raydistill train` with 1 worker: the loop on Ray Train, batches streamed from the
             pair shards by Ray tasks, checkpoints reported to Ray Train;
  ray bare   the bare step inside a Ray Train worker (started as `raydistill train` starts its
             one), batches held in memory: what running on Ray alone costs a step, the loop and
             its data aside.
The fixed cost per step is the step time minus the bare step time; the ratio is the bare step
time over the step time. Loop and Ray step times are steady state: the median over logging windows
after the first of the window's seconds per step. The machines this runs on drift by tens of percent
within minutes, so each round times the bare step in the same process just before the loop and the
Ray runs sit between two bare runs (their mean); the summary is the median and range over rounds.
Prints one line per size and round and writes JSON (default benchmarks/results/train_overhead.json).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import tempfile

import torch
from _record import spread, write_record
from train_throughput import (
    BATCH,
    deepspeed_step,
    fresh_method,
    in_fresh_process,
    make_pairs,
    make_teacher,
    pair_batches,
    ray_rate,
    seconds,
    set_fields,
    single_process,
    torch_step,
    train_job,
)

from raydistill.config import TrainJob, UNetConfig, from_dict, to_dict

ANALYTIC = {"analytic": {"num_classes": 4, "components_per_class": 2, "dim": 64, "seed": 0}}
MLP_STUDENT = {"kind": "mlp", "prediction": "v",
               "mlp": {"dim": 64, "width": 256, "depth": 3, "num_classes": 4}}
#: name -> (UNet config, or None for the analytic mixture's MLP student; timed steps per figure)
SIZES = {"tiny": (None, 600),
         "smoke": (UNetConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[]), 60),
         "digits": (UNetConfig(base_channels=32, channel_mult=[1, 2], attention_resolutions=[]), 40)}


def size_setup(name: str, workdir: str) -> TrainJob:
    """The job of one size, training from a pair set made for it (its step count still to set)."""
    unet, _ = SIZES[name]
    pairs = os.path.join(workdir, f"{name}-pairs")
    if unet is None:
        teacher, data = ANALYTIC, {"source": "mixture"}
        fields = {"student": MLP_STUDENT, "data": data}
    else:
        teacher = make_teacher(workdir, unet, name=f"{name}-teacher")
        data = {"source": "digits", "resolution": unet.resolution}
        fields = {"data": data}
    make_pairs(teacher, pairs, data=data, num_shards=8)
    return train_job(teacher, pairs=pairs, **fields)


def _bare_and_loop(job_dict: dict, steps: int, queue) -> None:
    """Seconds per step of the bare, DeepSpeed and in-process loop figures (one fresh process)."""
    single_process()
    job = from_dict(TrainJob, job_dict)
    batches = pair_batches(job.pairs, BATCH)
    cycle = itertools.cycle(batches)
    bare_s = seconds(functools.partial(next_step, torch_step(job, fresh_method(job)), cycle), steps)
    deepspeed_s = seconds(functools.partial(next_step, deepspeed_step(job, 0), cycle), steps)
    queue.put({"bare_s": bare_s, "deepspeed_s": deepspeed_s, "loop_s": loop_seconds(job, batches),
               "bare_after_s": seconds(functools.partial(
                   next_step, torch_step(job, fresh_method(job)), cycle), steps)})


def next_step(step, batches) -> None:
    step(next(batches))


def loop_seconds(job: TrainJob, batches: list[dict]) -> float:
    """Steady-state seconds per step of `run_worker` over in-memory batches, without Ray."""
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import student_config
    from raydistill.train.loop import WorkerContext, run_worker
    from raydistill.train.stream import Stream

    def stream(position):
        for batch in itertools.cycle(batches):
            position.rows += BATCH
            yield batch

    windows: list[dict] = []
    method = fresh_method(job)
    context = WorkerContext(0, 1, torch.device("cpu"), lambda metrics, directory: None,
                            logged=windows.append)
    teacher = load_teacher(job.teacher)
    run_worker(job, method, {method.phases()[0].reads[0]: Stream(stream)}, context,
               student_config(job, teacher), teacher)
    return BATCH / statistics.median(m["samples_per_s"] for m in windows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "train_overhead.json"))
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {name: [] for name in args.sizes}
    with tempfile.TemporaryDirectory() as workdir:
        jobs = {name: size_setup(name, workdir) for name in args.sizes}
        import ray

        ray.shutdown()
        for r in range(args.rounds):
            for name, job in jobs.items():
                steps = SIZES[name][1]
                timed = from_dict(TrainJob, set_fields(to_dict(job), {
                    "halving.steps_per_round": steps}))     # progressive: one round of 8 -> 4
                local = in_fresh_process(_bare_and_loop, to_dict(timed), steps)
                ray_bare_s = ray_bare_seconds(timed, steps, os.path.join(workdir, f"{name}-b{r}"))
                ray_s = BATCH / ray_rate(timed, os.path.join(workdir, f"{name}-ray{r}"))
                after = in_fresh_process(_bare_and_loop, to_dict(timed), steps)
                figures = round_figures(local, after, ray_s, ray_bare_s)
                rounds[name].append(figures)
                print_round(name, r, figures, flush=True)
    summary = {name: summarise(figures) for name, figures in rounds.items()}
    for name, s in summary.items():
        print_summary(name, s, len(rounds[name]))
    write_record(args.out, {"benchmark": "train_overhead", "batch": BATCH,
                            "sizes": {name: {"steps": SIZES[name][1]} for name in args.sizes},
                            "rounds": rounds, "summary": summary})


def _bare_on_ray_train(config: dict) -> None:
    """A Ray Train worker timing the bare step over in-memory batches; writes seconds per step to
    config["out"] (Ray Train 2's results keep metrics only beside checkpoints)."""
    sys.path.insert(0, config["benchmarks"])      # this function travels by value, its imports not
    from train_throughput import fresh_method, pair_batches, seconds, torch_step

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    job = from_dict(TrainJob, config["job"])
    cycle = itertools.cycle(pair_batches(job.pairs, BATCH))
    step = functools.partial(next_step, torch_step(job, fresh_method(job)), cycle)
    with open(config["out"], "w") as f:
        f.write(str(seconds(step, config["steps"])))


def ray_bare_seconds(job: TrainJob, steps: int, storage: str) -> float:
    """Seconds per bare step inside one Ray Train worker, Ray started as `raydistill train` does."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.cluster import init_ray

    init_ray(num_cpus=max(os.cpu_count() or 1, 2), dashboard=True)
    out = os.path.join(storage, "step_s")
    config = {"job": to_dict(job), "steps": steps, "out": out,
              "benchmarks": os.path.dirname(os.path.abspath(__file__))}
    TorchTrainer(_bare_on_ray_train, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="bare", storage_path=storage)).fit()
    ray.shutdown()
    with open(out) as f:
        return float(f.read())


def round_figures(local: dict, after: dict, ray_s: float, ray_bare_s: float) -> dict:
    """One round's step times (ms), fixed costs (ms) and ratios to bare. The in-process figures
    compare with the bare step timed around them in the same process; the Ray ones with the mean
    of the bare steps of the processes before and after them."""
    bare_local = (local["bare_s"] + local["bare_after_s"]) / 2
    bare_ray = (bare_local + (after["bare_s"] + after["bare_after_s"]) / 2) / 2
    ms = {"bare": bare_local * 1e3, "deepspeed": local["deepspeed_s"] * 1e3,
          "loop": local["loop_s"] * 1e3, "ray": ray_s * 1e3, "ray_bare": ray_bare_s * 1e3,
          "bare_around_ray": bare_ray * 1e3}
    return {"step_ms": ms,
            "overhead_ms": {"deepspeed": ms["deepspeed"] - ms["bare"],
                            "loop": ms["loop"] - ms["bare"],
                            "ray": ms["ray"] - ms["bare_around_ray"],
                            "ray_bare": ms["ray_bare"] - ms["bare_around_ray"]},
            "vs_bare": {"deepspeed": ms["bare"] / ms["deepspeed"], "loop": ms["bare"] / ms["loop"],
                        "ray": ms["bare_around_ray"] / ms["ray"],
                        "ray_bare": ms["bare_around_ray"] / ms["ray_bare"]}}


def summarise(figures: list[dict]) -> dict:
    out = {}
    for group in ("step_ms", "overhead_ms", "vs_bare"):
        for key in figures[0][group]:
            out[f"{group}.{key}"] = spread(f[group][key] for f in figures)
    return out


def print_round(name: str, r: int, f: dict, flush: bool = False) -> None:
    ms, over, ratio = f["step_ms"], f["overhead_ms"], f["vs_bare"]
    print(f"round {r} {name}: bare step {ms['bare']:.2f} ms; deepspeed {ms['deepspeed']:.2f} ms "
          f"(+{over['deepspeed']:.2f}, {ratio['deepspeed']:.2f}x); loop {ms['loop']:.2f} ms "
          f"(+{over['loop']:.2f}, {ratio['loop']:.2f}x); bare on ray train {ms['ray_bare']:.2f} ms "
          f"(+{over['ray_bare']:.2f}, {ratio['ray_bare']:.2f}x); ray train {ms['ray']:.2f} ms "
          f"(+{over['ray']:.2f} vs bare {ms['bare_around_ray']:.2f}, {ratio['ray']:.2f}x)",
          flush=flush)


def print_summary(name: str, s: dict, n: int) -> None:
    def fig(key: str, unit: str = "") -> str:
        v = s[key]
        return f"{v['median']:.2f}{unit} ({v['min']:.2f}..{v['max']:.2f})"

    goal = "0.90" if name == "tiny" else "0.97"
    print(f"{name}, median (range) of {n} rounds: bare step {fig('step_ms.bare', ' ms')}; fixed cost "
          f"per step: deepspeed {fig('overhead_ms.deepspeed', ' ms')}, loop "
          f"{fig('overhead_ms.loop', ' ms')}, bare step on ray train "
          f"{fig('overhead_ms.ray_bare', ' ms')}, ray train {fig('overhead_ms.ray', ' ms')} "
          f"(goal <= 2 ms); ray train {fig('vs_bare.ray', 'x')} bare (goal >= {goal}), the bare "
          f"step on ray train {fig('vs_bare.ray_bare', 'x')}")


if __name__ == "__main__":
    main()
