"""FID against training budget: a finished pipeline run's students trained again at fractions of
their steps, so a reader can tell a recipe problem (a student that stays behind its teacher however
long it trains) from a budget problem (one still improving at the last point).

Each fraction f runs the pipeline (`raydistill run`) with every student's steps (its round length:
optim.steps, or halving.steps_per_round) and warm-ups scaled by f, from the finished run's teacher
(`teacher.pretrained`) and scored with its classifier's features (`eval.features`). Each budget
run starts with hard links to the finished run's pair sets and evaluation sample sets: the
pipeline reuses those whose identity (teacher fingerprint, solver, count, seed) still matches, the
teacher's and the baselines', and draws again those of the retrained students, so only the students
and their rows run again. The finished run is the point f = 1.
Writes OUT/budget.json (every row's FID, its ratio to the teacher's and its FID to the teacher's
samples at each budget: a student that drifts from its teacher can score a lower FID against the
data, so the two read together),
OUT/budget.md and OUT/fid_vs_budget.png (one line per student row: FID / teacher's against its
training steps).

    python benchmarks/fid_budget.py --config configs/digits/pipeline.yaml \\
        --run runs/digits-full --out docs/digits-budget [--fractions 0.25 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from _record import write_record

from raydistill.config import PipelineJob, TrainJob, load, planned_outputs
from raydistill.methods.registry import method_spec
from raydistill.pipeline.lineage import LINEAGE
from raydistill.pipeline.run import Pipeline


def train_jobs(job: PipelineJob, run: str) -> dict[str, TrainJob]:
    """Each student stage's training job, as the pipeline builds it."""
    pipeline = Pipeline(job, run)
    with planned_outputs(pipeline.outputs()):
        return {stage.name: pipeline.train_job(stage) for stage in job.students}


def scaled(job: TrainJob, index: int, fraction: float) -> list[str]:
    """The overrides that train stage `index` for `fraction` of its steps (warm-ups scaled too)."""
    key, steps = method_spec(job.method).round_length(job)
    prefix = f"students.{index}.train"
    overrides = [f"{prefix}.{key}={max(1, round(fraction * steps))}",
                 f"{prefix}.optim.warmup_steps={int(fraction * job.optim.warmup_steps)}",
                 f"{prefix}.checkpoint_every={max(1, round(fraction * job.checkpoint_every))}"]
    for name, module in job.optim.modules.items():
        if module.warmup_steps is not None:
            overrides.append(f"{prefix}.optim.modules.{name}.warmup_steps="
                             f"{int(fraction * module.warmup_steps)}")
    return overrides


def link_sets(full: str, run: str, job: PipelineJob) -> None:
    """Hard-link the finished run's pair sets and evaluation sample sets into `run` (their files
    are written once and replaced, never changed in place), without the stages' lineage records."""
    sets = [s.pairs_stage for s in job.students if s.pairs_stage] + [os.path.join("eval", "samples")]
    for name in sets:
        if os.path.isdir(os.path.join(full, name)) and not os.path.exists(os.path.join(run, name)):
            shutil.copytree(os.path.join(full, name), os.path.join(run, name),
                            copy_function=os.link, ignore=shutil.ignore_patterns(LINEAGE))


def rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.json")) as f:
        return [r for r in json.load(f)["eval"] if not r.get("sweep")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the pipeline config the run was made with")
    parser.add_argument("--preset", help="its preset, as the run was made")
    parser.add_argument("--run", required=True, help="the finished run (the budget f = 1)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    job = load(PipelineJob, args.config, preset=args.preset)
    full = os.path.abspath(args.run)
    for path in ("metrics.json", "teacher", "classifier"):
        if not os.path.exists(os.path.join(full, path)):
            parser.error(f"--run: {full} has no {path}: a finished pipeline run is needed")
    trains = train_jobs(job, full)
    points = {1.0: rows(full)}
    for fraction in sorted(args.fractions):
        run = os.path.join(args.out, "runs", f"f{fraction:g}")
        overrides = [f"teacher.pretrained={{checkpoint: {full}/teacher}}",
                     f"eval.features={{kind: classifier, path: {full}/classifier}}",
                     "eval.w_sweep=[]", "goals=[]"]
        for i, stage in enumerate(job.students):
            overrides += scaled(trains[stage.name], i, fraction)
        command = [sys.executable, "-m", "raydistill.cli", "run", "--config", args.config,
                   *(["--preset", args.preset] if args.preset else []), "--out", run, "--quiet",
                   *overrides]
        print(f"budget {fraction:g}: {' '.join(command[3:])}", flush=True)
        link_sets(full, run, job)
        subprocess.run(command, check=True)
        points[fraction] = rows(run)
    steps = {name: method_spec(train.method).total_steps(train) for name, train in trains.items()}
    table = []
    for fraction, found in sorted(points.items()):
        teacher = next(r for r in found if r["name"] == "teacher")
        for r in found:
            if r["name"] in steps:
                table.append({"row": r["name"], "sampling_steps": r["steps"], "fraction": fraction,
                              "training_steps": round(fraction * steps[r["name"]]),
                              "fid": r["fid"], "teacher_fid": teacher["fid"],
                              "ratio": r["fid"] / teacher["fid"], "kid": r["kid"],
                              "kid_std": r["kid_std"], "fid_to_teacher": r.get("fid_to_teacher")})
    os.makedirs(args.out, exist_ok=True)
    write_record(os.path.join(args.out, "budget.json"),
                 {"benchmark": "fid_budget", "config": args.config, "preset": args.preset,
                  "run": args.run, "fractions": sorted(points), "points": table})
    plot(table, os.path.join(args.out, "fid_vs_budget.png"))
    with open(os.path.join(args.out, "budget.md"), "w") as f:
        f.write(markdown(table, args))
    for line in markdown(table, args).splitlines()[4:]:
        print(line)


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    lines = list(dict.fromkeys((t["row"], t["sampling_steps"]) for t in table))
    colours = plt.cm.tab20(range(len(lines))) if len(lines) > 10 else plt.cm.tab10(range(10))
    for key, colour in zip(lines, colours):
        mine = sorted((t["training_steps"], t["ratio"]) for t in table
                      if (t["row"], t["sampling_steps"]) == key)
        ax.plot(*zip(*mine), marker="o", color=colour,
                label=f"{key[0]}, {key[1]} step{'s' * (key[1] > 1)}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training steps (optimizer steps of the whole run)")
    ax.set_ylabel("FID / the teacher's FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(table: list[dict], args: argparse.Namespace) -> str:
    lines = ["# FID against training budget", "",
             f"`{args.config}`{f' (preset {args.preset})' if args.preset else ''}: every student "
             "trained again at fractions of its steps (warm-ups scaled too), from the same "
             "teacher, scored with the same classifier features; the ratio is to the teacher's "
             "FID in the same evaluation.", "",
             "| row | sampling steps | training steps | FID | KID | FID / teacher's "
             "| FID to the teacher's samples |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {t['row']} | {t['sampling_steps']} | {t['training_steps']} | {t['fid']:.3f} | "
              f"{t['kid']:.4f} ± {t['kid_std']:.4f} | {t['ratio']:.2f} | "
              f"{'' if t.get('fid_to_teacher') is None else format(t['fid_to_teacher'], '.3f')} |"
              for t in sorted(table, key=lambda t: (t["row"], t["sampling_steps"],
                                                    t["training_steps"]))]
    return "\n".join(lines + ["", "![FID against training budget](fid_vs_budget.png)", ""])


if __name__ == "__main__":
    main()
