"""DIR/report.md, DIR/metrics.json and DIR/tensorboard/ (the scores against NFE), written from the
lineage records and eval.json only, so a report never claims a stage that did not finish.

The quality goals are the pipeline's `goals:` (raydistill.config.Goal), each stated with its
measured ratio and whether it is met; beside them, each 4-step progressive student's FID to the
teacher's samples against plain DDIM's at 4 steps: FID against the data also falls when a student
drifts from its teacher towards the data (e.g. a guided student that has not learned w), and this
line shows it; and, where the evaluation drew the floor (EvalJob.floor), against the floor, the
least a sampler unpaired with the teacher's noise can score. The evaluation's guidance sweep (rows
at other w) has its own table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

from raydistill.config import FLOOR_ROW, Goal
from raydistill.diffusion.solvers import SOLVERS  # a baseline row is named by its solver
from raydistill.events import DIRECTORY as EVENTS
from raydistill.events import write_evaluation
from raydistill.pipeline.lineage import read_record

PLOT = "fid_vs_nfe.png"
#: what the report takes from a stage's lineage record (raydistill.pipeline.run says which
#: stages record which): wall time, the training loop's start-up and consolidation time outside
#: the loop, the samples its frozen teacher evaluated, the students' training samples per second,
#: the network evaluations behind the evaluation's sample sets
STAGE_FIELDS = ("seconds", "fingerprint", "inputs", "overhead_s", "outside_loop", "shards",
                "teacher_evaluations", "samples_per_s", "network_evaluations")


def goals(rows: list[dict], wanted: list[Goal]) -> list[dict]:
    """Each goal for each row it names, at its w (the evaluation's, or each of the sweep's):
    the measured ratio to what it is held against, and whether it is met."""
    out = []
    for goal in wanted:
        for at_w in _by_w(rows, goal.sweep):
            teacher = next(r for r in at_w if r["name"] == "teacher")
            score = "fid" if "fid" in teacher else "frechet"
            ddim = sorted((r for r in at_w if r["name"] == "ddim"), key=lambda r: r["nfe"])
            for row in at_w:
                named = row["name"] == goal.row or (goal.row == "*" and row["name"] not in
                                                    ("teacher", FLOOR_ROW, *SOLVERS))
                if not named or (goal.steps and row["steps"] != goal.steps):
                    continue
                where = {"row": row["name"], "steps": row["steps"], "w": row["w"]}
                if goal.fid_vs_teacher:
                    ratio = row[score] / teacher[score]
                    out.append({**where, "goal": f"FID <= {goal.fid_vs_teacher:g}x the "
                                                 "teacher's", "ratio": ratio,
                                "met": ratio <= goal.fid_vs_teacher})
                above = next((d for d in ddim if d["nfe"] >= row["nfe"]), None)
                if goal.beats_ddim and above is not None:
                    out.append({**where, "goal": f"FID below plain DDIM's at {above['steps']} "
                                                 f"steps ({above['nfe']} NFE)",
                                "ratio": row[score] / above[score],
                                "met": row[score] < above[score]})
                plain = next((d for d in ddim if d["steps"] == goal.closer_than_ddim), None)
                if goal.closer_than_ddim and plain is not None and "fid_to_teacher" in row:
                    out.append({**where, "goal": "FID to the teacher's samples below plain "
                                                 f"DDIM's at {plain['steps']} steps",
                                "ratio": row["fid_to_teacher"] / plain["fid_to_teacher"],
                                "met": row["fid_to_teacher"] < plain["fid_to_teacher"]})
    return out


def _by_w(rows: list[dict], sweep: bool) -> list[list[dict]]:
    """The evaluation's rows at its w, or (sweep) at each w of its guidance sweep."""
    if not sweep:
        return [[r for r in rows if not r.get("sweep")]]
    ws = dict.fromkeys(r["w"] for r in rows if r.get("sweep"))
    return [[r for r in rows if r.get("sweep") and r["w"] == w] for w in ws]


def fidelity(rows: list[dict], students: set[str]) -> list[dict]:
    """Beside the goals: each distilled student's FID to the teacher's samples at 4 steps against
    plain DDIM's at 4 steps, and against the floor's where there is one (not a goal of the issue;
    the context its goals need). `students`: the rows of trained students, by stage name."""
    ddim4 = _ddim4(rows)
    if ddim4 is None:
        return []
    floor = next((r for r in rows if r["name"] == FLOOR_ROW), None)
    return [{"row": row["name"], "fid_to_teacher": row["fid_to_teacher"],
             "ddim4_fid_to_teacher": ddim4["fid_to_teacher"],
             "ratio": row["fid_to_teacher"] / ddim4["fid_to_teacher"],
             **({"floor_fid_to_teacher": floor["fid_to_teacher"],
                 "floor_ratio": row["fid_to_teacher"] / floor["fid_to_teacher"]} if floor else {})}
            for row in _four_step_students(rows, students, "fid_to_teacher")]


def _ddim4(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["name"] == "ddim" and r["steps"] == 4), None)


def _four_step_students(rows: list[dict], students: set[str], score: str) -> list[dict]:
    """The rows of students at 4 steps that hold `score`."""
    return [r for r in rows if r["name"] in students and r["steps"] == 4 and score in r]


def environment() -> dict[str, Any]:
    import deepspeed
    import ray
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__,
            "deepspeed": deepspeed.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(out: str, stages: list[str], ran: dict[str, bool],
                 wanted: list[Goal] = ()) -> dict:
    """Write report.md and metrics.json from what the stages recorded, with the `wanted` goals
    stated as met or not; returns the metrics."""
    records = {name: read_record(os.path.join(out, name)) for name in stages}
    finished = {name: record for name, record in records.items() if record is not None}
    evaluation = None
    if "eval" in finished:
        with open(os.path.join(out, "eval", "eval.json")) as f:
            evaluation = json.load(f)
    students = {name for name, r in finished.items() if r.get("method")}
    every = evaluation["rows"] if evaluation else []
    rows = [r for r in every if not r.get("sweep")]          # the evaluation's w
    metrics = {"stages": {name: {"finished": name in finished,
                                 "ran_this_time": ran.get(name, False),
                                 **({key: finished[name][key] for key in STAGE_FIELDS
                                     if key in finished[name]} if name in finished else {})}
                          for name in stages},
               "eval": every, "goals": goals(every, list(wanted)) if rows else [],
               "fidelity": fidelity(rows, students) if rows else [],
               "environment": environment()}
    if evaluation:
        metrics.update(w=evaluation["w"], samples=evaluation["num_samples"],
                       metric=evaluation["metric"])
    if rows:
        plot_scores(rows, os.path.join(out, PLOT))
        write_evaluation(rows, os.path.join(out, EVENTS))
    _atomic(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    _atomic(os.path.join(out, "report.md"), _markdown(metrics, rows,
                                                      [r for r in every if r.get("sweep")]))
    return metrics


def plot_scores(rows: list[dict], path: str) -> None:
    """FID (or the exact Frechet distance) against NFE per sample, one line per sampler name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    score = "fid" if "fid" in rows[0] else "frechet"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = sorted((r["nfe"], r[score]) for r in rows if r["name"] == name)
        ax.plot(*zip(*mine), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID" if score == "fid" else "Fréchet distance to p(x | c)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".partial.png")
    plt.close(fig)
    os.replace(path + ".partial.png", path)


def _markdown(metrics: dict, rows: list[dict], sweep: list[dict]) -> str:
    lines = ["# raydistill report", ""]
    if rows:
        teacher = next(r for r in rows if r["name"] == "teacher")
        exact = "fid" not in teacher
        score = "frechet" if exact else "fid"
        lines += [f"{metrics['samples']} samples per row at w = {metrics['w']:g}, the same noise "
                  f"and classes in every row; features: `{metrics['metric'][:32]}`.", "",
                  "| sampler | solver | steps | NFE | " +
                  ("Fréchet | sliced W2 |" if exact else
                   "FID | KID | FID / teacher's | FID to the teacher's samples |"),
                  "| --- | --- | ---: | ---: | ---: | ---: |" + ("" if exact else " ---: | ---: |")]
        for r in rows:
            if exact:
                lines.append(f"| {r['name']} | {r['solver']} | {r['steps']} | {r['nfe']} | "
                             f"{r['frechet']:.4f} | {r['sliced_w2']:.4f} |")
            else:
                lines.append(f"| {r['name']} | {r['solver']} | {r['steps']} | {r['nfe']} | "
                             f"{r['fid']:.3f} | {r['kid']:.4f} ± {r['kid_std']:.4f} | "
                             f"{r[score] / teacher[score]:.2f} | "
                             f"{_fidelity_cell(r, teacher)} |")
        if not exact:
            lines += ["", "FID is against the data (train and held-out images, features of the "
                      "domain classifier); FID to the teacher's samples measures how faithfully "
                      "a sampler reproduces the teacher, which FID against the data cannot tell "
                      "apart from a change of guidance strength."]
            if any(r["name"] == FLOOR_ROW for r in rows):
                lines[-1] += (f" The {FLOOR_ROW} row is the teacher drawn again at a second seed: its "
                              "FID to the teacher's samples is what two independent draws of one "
                              "distribution score at this sample count, the least a sampler whose "
                              "samples are not paired with the teacher's by their noise (a "
                              "stochastic one) can reach; its FID against the data, how far FID "
                              "moves with the seed alone.")
        lines += ["", f"![{'FID' if not exact else 'Fréchet distance'} against NFE]({PLOT})", ""]
        if sweep and not exact:
            lines += _sweep_table(sweep)
        grids = [r for r in rows if r.get("grid")]
        if grids:
            lines += ["## Samples", "", "The first 50 samples of every row: the same noise and "
                      "classes in every grid.", ""]
            lines += [f"**{r['name']}, {r['solver']}, {r['steps']} steps**\n\n"
                      f"![{r['name']} {r['steps']}](eval/{r['grid']})\n" for r in grids]
    else:
        lines += ["No evaluation finished yet: no quality figures.", ""]
    if metrics["goals"]:
        lines += ["## Goals", ""]
        lines += [f"- {g['row']} at {g['steps']} steps, w = {g['w']:g}: {g['goal']}: "
                  f"{g['ratio']:.2f}x, {'met' if g['met'] else 'NOT met'}"
                  for g in metrics["goals"]]
        lines += [f"- {f['row']}, beside them: FID to the teacher's samples {f['fid_to_teacher']:.3f}"
                  f" = {f['ratio']:.2f}x plain DDIM's at 4 steps ({f['ddim4_fid_to_teacher']:.3f})"
                  + (f", {f['floor_ratio']:.2f}x the floor's ({f['floor_fid_to_teacher']:.3f})"
                     if "floor_ratio" in f else "")
                  for f in metrics["fidelity"]]
        lines.append("")
    lines += ["## Stages", "", "Wall time as the stage last ran; outside the loop: Ray Train and "
              "DeepSpeed start-up and the final consolidation; teacher evaluations: samples the "
              "teacher evaluated for a pair set or for training targets, counted as they ran "
              "(CFG's two branches count two); samples/s: student training samples per second "
              "inside the loop, or pairs made per second; the evaluation's figure is the network "
              "evaluations behind its sample sets.", "",
              "| stage | state | wall time | outside the loop | teacher evaluations | samples/s | "
              "fingerprint | inputs |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, stage in metrics["stages"].items():
        if not stage["finished"]:
            lines.append(f"| {name} | not finished | | | | | | |")
            continue
        state = "ran" if stage["ran_this_time"] else "reused (lineage matched)"
        inputs = ", ".join(f"{k} {v[:12]}" for k, v in stage["inputs"].items()) or "config only"
        overhead = f"{stage['overhead_s']:.0f} s" if "overhead_s" in stage else ""
        evaluations = stage.get("teacher_evaluations", stage.get("network_evaluations"))
        rate = f"{stage['samples_per_s']:.0f}" if "samples_per_s" in stage else ""
        lines.append(f"| {name} | {state} | {stage['seconds']:.0f} s | {overhead} | "
                     f"{'' if evaluations is None else f'{evaluations:,}'} | {rate} | "
                     f"{stage['fingerprint'][:12]} | {inputs} |")
    phases = [(name, stage["outside_loop"]) for name, stage in metrics["stages"].items()
              if "outside_loop" in stage]
    if phases:
        lines += ["", "Time outside the training loop, by phase:", ""]
        lines += [f"- {name}: " + ", ".join(
            f"{phase} {seconds:.1f} s"
            for phase, seconds in sorted(outside.items(), key=lambda item: -item[1]))
            for name, outside in phases]
    env = metrics["environment"]
    lines += ["", "## Environment", "",
              f"Python {env['python']}, torch {env['torch']}, Ray {env['ray']}, DeepSpeed "
              f"{env['deepspeed']}; {env['platform']}, {env['cpus']} CPUs, GPU: "
              f"{env['gpu'] or 'none'}.", ""]
    return "\n".join(lines)


def _sweep_table(sweep: list[dict]) -> list[str]:
    """The guidance sweep: at each w, the teacher, plain DDIM and the w-conditioned students."""
    lines = ["## Guidance sweep", "", "The same scores at other guidance strengths: a student that "
             "follows w stays near the teacher at each (FID to the teacher's samples).", "",
             "| w | sampler | steps | NFE | FID | KID | FID / teacher's | FID to the teacher's "
             "samples |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for at_w in _by_w(sweep, True):
        teacher = next(r for r in at_w if r["name"] == "teacher")
        lines += [f"| {r['w']:g} | {r['name']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | "
                  f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['fid'] / teacher['fid']:.2f} | "
                  f"{_fidelity_cell(r, teacher)} |" for r in at_w]
    return lines + [""]


def _fidelity_cell(row: dict, teacher: dict) -> str:
    if row is teacher:
        return "(itself)"
    return f"{row['fid_to_teacher']:.3f}" if "fid_to_teacher" in row else "(not measured)"


def _atomic(path: str, text: str) -> None:
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)
