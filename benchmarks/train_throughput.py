"""Student-training throughput and memory: a bare PyTorch loop vs Ray Train + DeepSpeed.

Measured in one run, on the digits UNet architecture (random weights: the compute is what matters),
progressive distillation under CFG (w = 1) toward a 4-step student, batch 32, 1 torch thread:
  1. bare loop in a fresh process (OMP_NUM_THREADS=1, like a Ray worker): AdamW on the student
     from precomputed targets held in memory; also the teacher inline (two CFG DDIM steps per
     target); the separate times of one student step (forward + backward + update) and one target
     (the teacher's forward passes), from which the ideal offload ratio
     (teacher + student step) / student step follows; and the step time of the same student in a
     DeepSpeed engine at world size 1 (ZeRO-0 and ZeRO-2), without Ray;
  2. `raydistill train` with 1 worker from the same precomputed target shards (read by Ray tasks)
     -- goal >= 0.85x the bare loop. One worker runs ZeRO-0: ZeRO partitions state across ranks,
     and with one rank ZeRO-2 only adds the copy into its fp32 partition (step 1 measures what
     that costs);
  3. `raydistill train` with 1 worker and the teacher inline on real digits -- the pairs / inline
     ratio against the ideal ratio of (1), goal >= 0.9x that ideal;
  4. per-rank model + optimizer state bytes on 2 workers, ZeRO-3 vs ZeRO-0, in fp32 and in bf16
     mixed precision -- goal <= 0.6x. (In fp32 DeepSpeed's ZeRO-3 keeps an fp32 master partition
     beside the fp32 parameter partition, a copy that mixed precision needs anyway: with Adam's two
     moments that is 2P per rank on 2 ranks against 3P for ZeRO-0, 0.67x by construction.)
The shared machines this runs on drift by tens of percent within minutes, so (2) and (3) run in
rounds, each between two bare runs and compared with their mean; the summary is the median over
rounds. Ray Train rates are steady state: the median samples/s of logging windows after the first.
Prints one line per figure and writes JSON (default benchmarks/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch
from _record import write_record

from raydistill.config import ModelConfig, TrainJob, UNetConfig, from_dict, to_dict
from raydistill.methods.base import DATA
from raydistill.models import build_network, save_checkpoint

BATCH, STUDENT_STEPS, W = 32, 4, 1.0


def make_teacher(workdir: str, unet: UNetConfig | None = None, name: str = "teacher") -> str:
    """A UNet teacher with random weights (the digits architecture unless `unet` is given)."""
    config = ModelConfig(unet=unet or UNetConfig(attention_resolutions=[]))
    network = build_network(config)
    torch.manual_seed(0)
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.02)
    path = os.path.join(workdir, name)
    save_checkpoint(path, network, config)
    return path


def set_fields(job: dict, fields: dict) -> dict:
    """`job` with "section.leaf" (or "section") keys of `fields` set."""
    job = dict(job)
    for key, value in fields.items():
        section, _, leaf = key.partition(".")
        if leaf:
            job[section] = {**job.get(section, {}), leaf: value}
        else:
            job[section] = value
    return job


def teacher_ref(teacher: str | dict) -> dict:
    """A checkpoint path, or a teacher section as it is (e.g. {"analytic": {...}})."""
    return {"checkpoint": teacher} if isinstance(teacher, str) else teacher


def train_job(teacher: str | dict, **fields) -> TrainJob:
    job = {"method": "progressive", "teacher": teacher_ref(teacher),
           "data": {"source": "digits", "resolution": 16},
           "guidance": {"w_min": W, "w_max": W},
           "halving": {"start_steps": 2 * STUDENT_STEPS, "end_steps": STUDENT_STEPS,
                       "steps_per_round": 100},
           "optim": {"batch_size": BATCH, "lr": 1e-4, "warmup_steps": 0, "ema_decay": 0.0},
           "workers": {"num": 1, "threads": 1}, "deepspeed": {"zero_stage": 0},
           "checkpoint_every": 1000, "log_every": 10, "max_failures": 0}
    return from_dict(TrainJob, set_fields(job, fields))


def make_pairs(teacher: str | dict, out: str, **fields) -> None:
    """Progressive targets for the 4-step student (16 shards of 128 unless `fields` say else)."""
    from raydistill.config import PairsJob
    from raydistill.pairs.pool import generate_pairs

    job = {"mode": "progressive", "teacher": teacher_ref(teacher), "student_steps": STUDENT_STEPS,
           "data": {"source": "digits", "resolution": 16}, "guidance": {"w_min": W, "w_max": W},
           "num_shards": 16, "samples_per_shard": 128, "batch_size": 128,
           "workers": {"min": 2, "max": 2}}
    generate_pairs(from_dict(PairsJob, set_fields(job, fields)), out, progress=False)


# ----------------------------------------------------------------------------- bare loop (1)

def single_process() -> None:
    """Set up the process for one rank of a world of one, as a Ray worker would be (one torch thread,
    denormals flushed) and as deepspeed.init_distributed needs it."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def fresh_method(job: TrainJob):
    """The job's method at round 0 on the CPU, its student freshly initialised."""
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import build_method, student_config

    teacher = load_teacher(job.teacher)
    method = build_method(job, teacher, student_config(job, teacher), torch.device("cpu"))
    method.start_round(0, {})
    return method


def pair_batches(pairs: str, batch: int) -> list[dict]:
    """Every full batch of a pair set, held in memory."""
    from raydistill.pairs.reader import PairReader

    samples = list(PairReader(pairs))
    return [{k: torch.stack([s[k] for s in samples[i:i + batch]]) for k in samples[0]}
            for i in range(0, len(samples) - batch + 1, batch)]


def torch_step(job: TrainJob, method):
    """One bare PyTorch student step: the method's loss, backward, gradient clipping, torch AdamW."""
    phase = method.phases()[0]
    student = method.modules()[method.student_module]
    optimizer = torch.optim.AdamW(student.parameters(), lr=job.optim.lr)

    def step(batch: dict) -> None:
        loss = method.loss({phase.reads[0]: batch}, phase)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), job.optim.grad_clip)
        optimizer.step()
    return step


def deepspeed_step(job: TrainJob, stage: int):
    """The same student step through a DeepSpeed engine at ZeRO `stage` (world of one)."""
    from raydistill.train.engine import build_engine

    staged = dataclasses.replace(job, deepspeed=dataclasses.replace(job.deepspeed,
                                                                     zero_stage=stage))
    method = fresh_method(staged)
    phase = method.phases()[0]
    engine = build_engine(method.modules()[method.student_module], staged, staged.optim, 1, 100,
                          on_cuda=False)
    method.trainables()[method.student_module].attach(engine)

    def step(batch: dict) -> None:
        engine.backward(method.loss({phase.reads[0]: batch}, phase)["loss"])
        engine.step()
    return step


def seconds(fn, repeat: int) -> float:
    """Mean seconds of one call of `fn` over `repeat` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _bare(job_dict: dict, pairs: str, steps: int, queue) -> None:
    from raydistill.data import load_images

    single_process()
    job = from_dict(TrainJob, job_dict)
    method = fresh_method(job)
    student_step = torch_step(job, method)
    precomputed = pair_batches(pairs, BATCH)
    images = load_images(job.data).train
    g = torch.Generator().manual_seed(1)

    def real_batch() -> dict:
        index = torch.randint(0, len(images), (BATCH,), generator=g)
        return {"x": images.images[index], "c": images.labels[index]}

    def rate(make_batch) -> float:
        batches = iter(range(steps + 1))
        return BATCH / seconds(lambda: student_step(make_batch(next(batches))), steps)

    from_pairs = rate(lambda i: precomputed[i % len(precomputed)])
    inline = rate(lambda i: real_batch())
    batch = real_batch()
    target_s = seconds(lambda: method.inline_targets(batch["x"], batch["c"]), steps // 2)
    step_s = seconds(lambda: student_step(precomputed[0]), steps // 2)
    ds_s = {f"zero{stage}": seconds(functools.partial(deepspeed_step(job, stage), precomputed[0]),
                                    steps // 2) for stage in (0, 2)}
    queue.put({"from_pairs": from_pairs, "inline": inline, "target_s": target_s,
               "student_step_s": step_s, **{f"deepspeed_{k}_step_s": v for k, v in ds_s.items()}})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_fresh_process(target, *args) -> dict:
    """What `target(*args, queue)` puts on its queue, run in a new process with one OpenMP thread
    (a Ray worker's setting; nothing this process has imported or initialised carries over)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bare_loop(job: TrainJob, pairs: str, steps: int) -> dict:
    return in_fresh_process(_bare, to_dict(job), pairs, steps)


# ------------------------------------------------------------------------ Ray Train runs (2, 3)

def ray_rate(job: TrainJob, out: str) -> float:
    """Steady-state samples/s of one `raydistill train` run (median of windows after the first)."""
    import ray

    from raydistill.train.driver import train

    train(job, out, progress=False)
    ray.shutdown()
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rates = [json.loads(line)["samples_per_s"] for line in f]
    return statistics.median(rates[1:])


# --------------------------------------------------------------------------- memory (4)

def memory_worker(config: dict) -> None:
    import ray.train

    from raydistill.train.build import build_method
    from raydistill.train.engine import build_engine, state_bytes

    job = from_dict(TrainJob, config["job"])
    student = from_dict(ModelConfig, config["student"])
    rank = ray.train.get_context().get_world_rank()
    results = {}
    for stage, precision in ((0, "fp32"), (3, "fp32"), (0, "bf16"), (3, "bf16")):
        staged = dataclasses.replace(job, deepspeed=dataclasses.replace(
            job.deepspeed, zero_stage=stage, precision=precision))
        from raydistill.models.checkpoint import load_teacher

        method = build_method(staged, load_teacher(staged.teacher), student, torch.device("cpu"))
        method.start_round(0, {})
        engine = build_engine(method.modules()["student"], staged, staged.optim, 2, 100,
                              on_cuda=False)
        method.trainables()["student"].attach(engine)
        x = torch.randn(BATCH // 2, 1, 16, 16)
        c = torch.randint(0, 10, (BATCH // 2,))
        engine.backward(method.loss({DATA: {"x": x, "c": c}}, method.phases()[0])["loss"])
        engine.step()
        results[f"zero{stage}-{precision}"] = state_bytes(engine)
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump(results, f)


def zero_memory(job: TrainJob, student: ModelConfig, workdir: str) -> dict:
    import ray
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = os.path.join(workdir, "memory.json")
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    TorchTrainer(memory_worker,
                 train_loop_config={"job": to_dict(job), "student": to_dict(student), "out": out},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="memory", storage_path=os.path.join(workdir, "ray"))
                 ).fit()
    ray.shutdown()
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="bare-loop steps per figure")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (Ray from targets, Ray inline, bare loop)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "train_throughput.json"))
    args = parser.parse_args()
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import student_config

    with tempfile.TemporaryDirectory() as workdir:
        teacher = make_teacher(workdir)
        pairs = os.path.join(workdir, "pairs")
        make_pairs(teacher, pairs)
        import ray

        ray.shutdown()
        job = train_job(teacher)
        bares, rounds = [bare_loop(job, pairs, args.steps)], []
        for r in range(args.rounds):
            ray_pairs = ray_rate(train_job(teacher, pairs=pairs),
                                 os.path.join(workdir, f"pairs{r}"))
            ray_inline = ray_rate(job, os.path.join(workdir, f"inline{r}"))
            bares.append(bare_loop(job, pairs, args.steps))
            rounds.append(round_figures(bares[-2], bares[-1], ray_pairs, ray_inline))
        two = train_job(teacher, **{"workers.num": 2, "deepspeed.zero_stage": 2})
        memory = zero_memory(two, student_config(two, load_teacher(two.teacher)), workdir)
    for r, figures in enumerate(rounds):
        print_round(r, figures)
    summary = {key: statistics.median(f[key] for f in rounds)
               for key in ("ray_vs_bare_from_pairs", "offload_vs_ideal", "deepspeed_zero0_vs_torch",
                           "deepspeed_zero2_vs_torch")}
    print(f"median over {len(rounds)} rounds: 1 worker from targets "
          f"{summary['ray_vs_bare_from_pairs']:.2f}x bare (goal >= 0.85); offload "
          f"{summary['offload_vs_ideal']:.2f}x the ideal (goal >= 0.90)")
    for precision in ("fp32", "bf16"):
        zero3, zero0 = memory[f"zero3-{precision}"], memory[f"zero0-{precision}"]
        print(f"per-rank model+optimizer state, 2 workers, {precision}: ZeRO-3 {zero3 / 1e6:.2f} MB "
              f"vs ZeRO-0 {zero0 / 1e6:.2f} MB = {zero3 / zero0:.2f}x (goal <= 0.60)")
    write_record(args.out, {
        "benchmark": "train_throughput", "batch": BATCH, "student_steps": STUDENT_STEPS,
        "model": "digits UNet (32ch, [1,2]) student, progressive under CFG w=1",
        "bare_runs": bares, "rounds": rounds, "median": summary, "state_bytes_per_rank": memory,
        "zero3_vs_zero0_bytes_fp32": memory["zero3-fp32"] / memory["zero0-fp32"],
        "zero3_vs_zero0_bytes_bf16": memory["zero3-bf16"] / memory["zero0-bf16"]})


def round_figures(before: dict, after: dict, ray_pairs: float, ray_inline: float) -> dict:
    """One round's ratios: the Ray runs against the mean of the bare runs on either side."""
    bare = {key: (before[key] + after[key]) / 2 for key in before}
    ideal = (bare["target_s"] + bare["student_step_s"]) / bare["student_step_s"]
    measured = ray_pairs / ray_inline
    return {"bare": bare, "ray_1worker_from_pairs": ray_pairs, "ray_1worker_inline": ray_inline,
            "ray_vs_bare_from_pairs": ray_pairs / bare["from_pairs"],
            "bare_offload_ratio": bare["from_pairs"] / bare["inline"],
            "offload_ratio": measured, "offload_ideal": ideal, "offload_vs_ideal": measured / ideal,
            "deepspeed_zero0_vs_torch": bare["student_step_s"] / bare["deepspeed_zero0_step_s"],
            "deepspeed_zero2_vs_torch": bare["student_step_s"] / bare["deepspeed_zero2_step_s"]}


def print_round(r: int, f: dict) -> None:
    bare = f["bare"]
    print(f"round {r}: bare loop, from targets {bare['from_pairs']:.1f} samples/s, teacher inline "
          f"{bare['inline']:.1f} samples/s (ratio {f['bare_offload_ratio']:.2f})")
    print(f"round {r}: step times: student step {bare['student_step_s'] * 1e3:.1f} ms, inline target "
          f"{bare['target_s'] * 1e3:.1f} ms -> ideal offload ratio {f['offload_ideal']:.2f}; "
          f"DeepSpeed engine step in-process {f['deepspeed_zero0_vs_torch']:.2f}x (ZeRO-0), "
          f"{f['deepspeed_zero2_vs_torch']:.2f}x (ZeRO-2) the torch step's speed")
    print(f"round {r}: ray train + deepspeed ZeRO-0, 1 worker, from targets: "
          f"{f['ray_1worker_from_pairs']:.1f} samples/s = {f['ray_vs_bare_from_pairs']:.2f}x bare "
          "(goal >= 0.85)")
    print(f"round {r}: ray train + deepspeed ZeRO-0, 1 worker, teacher inline: "
          f"{f['ray_1worker_inline']:.1f} samples/s; from targets / inline = "
          f"{f['offload_ratio']:.2f} = {f['offload_vs_ideal']:.2f}x the ideal "
          f"{f['offload_ideal']:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
