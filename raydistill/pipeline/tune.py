"""`raydistill tune`: a measured search over a training job's keys, with Ray Tune's ASHA.

    DIR/tune/                  Ray Tune's experiment, whose state `--resume` continues
    DIR/trials/<trial>/run     a trial's training run (`raydistill train`, stopped at each rung)
    DIR/trials/<trial>/eval-N  its score after N steps (`raydistill eval` of its student alone)
    DIR/reference/             the reference images' features, computed once for every trial
    DIR/results.md, .json      every trial: its values, its score at each rung, whether ASHA
                               stopped it, and the best
    DIR/best.yaml              the job with the best trial's values (lowest score at the last rung
                               among the trials that reached it)

A trial is the job with its sampled values, trained in `rungs` legs: leg k stops at k/rungs of
its steps (TrainJob.until; each leg resumes the last, so the learning-rate schedule is the
whole run's), and its student is then scored as the evaluation scores students (FID and KID on
the same features, or exact distances on an analytic teacher) and reported to Tune; a student
of a range of w (guided) scored at several (`eval.w_sweep`) reports their geometric mean. ASHA stops a
trial at a rung where its score is not among the best 1/reduction_factor of the trials that
reached that rung. Trials run as Ray Train runs on the cluster Ray is connected to, `concurrent`
at once (each needs its Train workers' resources).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

import ray.tune
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from raydistill.cluster import init_ray
from raydistill.config import (
    ConfigError,
    EvalJob,
    TrainJob,
    TuneJob,
    apply_override,
    from_dict,
    load,
    planned_outputs,
    to_dict,
    with_absolute_paths,
)
from raydistill.eval.evaluate import evaluate, plan_rows
from raydistill.methods.registry import method_spec
from raydistill.models.checkpoint import planned_checkpoint
from raydistill.train.build import prepare, student_record
from raydistill.train.driver import JOB_FILE, ensure_teacher, train

EXPERIMENT, TRIALS, REFERENCE = "tune", "trials", "reference"
RESULTS, BEST = "results", "best.yaml"
METRIC = "score"          # what ASHA minimises: score(rows)


def trial_job(base: TrainJob, values: dict[str, Any]) -> TrainJob:
    """The job with a trial's values at their dotted keys (ConfigError naming a bad one)."""
    data = to_dict(base)
    for key, value in values.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    return from_dict(TrainJob, data)


def eval_job(job: TuneJob, train: TrainJob, student: str, reference: str) -> EvalJob:
    """How a trial's student is scored: the tune job's eval keys, at the job's one w by default."""
    guidance = train.guidance
    w = {"w": guidance.w_min} if guidance.w_min == guidance.w_max else {}
    try:
        return with_absolute_paths(from_dict(EvalJob, {
            "data": to_dict(train.data), **w, **job.eval, "teacher": to_dict(train.teacher),
            "students": [{"name": "trial", "checkpoint": student}], "students_only": True,
            "reference_cache": reference}))
    except ConfigError as err:
        raise err.under("eval") from None


def score(rows: list[dict]) -> float:
    """A trial's score: its row's FID (Frechet distance to the exact distribution, analytic), or
    with `eval.w_sweep` the geometric mean over the w it was scored at. The teacher's FID at each w
    is the same for every trial, so this ranks trials as the mean of log(FID / the teacher's) does,
    where the plain mean would rank them by the w whose FID is largest."""
    values = [row["fid"] if "fid" in row else row["frechet"] for row in rows]
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


def row_metrics(rows: list[dict]) -> dict[str, float]:
    """The rows' float scores for Tune's results: as named for one row, suffixed _w<w> for several."""
    return {key + ("" if len(rows) == 1 else f"_w{row['w']:g}"): value
            for row in rows for key, value in row.items() if isinstance(value, float)
            and key != "w"}


def run_trial(values: dict[str, Any], *, base: dict, job: dict, out: str) -> None:
    """One trial, inside Ray Tune: train in legs, score after each, report (see the module)."""
    tune_job, train_job = from_dict(TuneJob, job), trial_job(from_dict(TrainJob, base), values)
    directory = os.path.join(out, TRIALS, ray.tune.get_context().get_trial_id())
    run = os.path.join(directory, "run")
    done = ray.tune.get_checkpoint()
    start = 1
    if done is not None:
        with done.as_directory() as reported:
            start = json.load(open(os.path.join(reported, "rung.json")))["rung"] + 1
    total = method_spec(train_job.method).total_steps(train_job)
    for rung in range(start, tune_job.rungs + 1):
        until = max(1, round(rung * total / tune_job.rungs))
        if _student_steps(run) != until:
            train(dataclasses.replace(train_job, until=until), run,
                  resume=os.path.isfile(os.path.join(run, JOB_FILE)), progress=False)
        rows = evaluate(eval_job(tune_job, train_job, os.path.join(run, "student"),
                                 os.path.join(out, REFERENCE)),
                        os.path.join(directory, f"eval-{until}"), progress=False,
                        log=lambda line: None)["rows"]
        with tempfile.TemporaryDirectory() as reported:
            with open(os.path.join(reported, "rung.json"), "w") as f:
                json.dump({"rung": rung}, f)
            ray.tune.report({METRIC: score(rows), "step": until, "rung": rung,
                             **row_metrics(rows)},
                            checkpoint=ray.tune.Checkpoint.from_directory(reported))


def _student_steps(run: str) -> int | None:
    """The steps of the student a stopped run holds (None: it holds none)."""
    path = os.path.join(run, "student", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["extra"].get("train_steps")


def base_job(job: TuneJob) -> TrainJob:
    """The job every trial starts from; every key of the space takes each value of its domain
    (ConfigError naming the key otherwise)."""
    try:
        base = with_absolute_paths(load(TrainJob, job.train, job.overrides))
    except ConfigError as err:
        raise err.under(f"train ({job.train})") from None
    for key, domain in job.space.items():
        (kind, values), = domain.items()
        for value in values:
            try:
                trial_job(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"space.{key}", f"{value!r}: {err}") from None
    return base


def check(job: TuneJob, base: TrainJob) -> EvalJob:
    """The base job against its teacher and data, and the scoring of its students, checked
    before any trial starts; returns the scoring (its paths absolute)."""
    plan = prepare(base)
    student = os.path.join(tempfile.gettempdir(), "raydistill-tune-check", "student")
    with planned_outputs([student]):
        scoring = eval_job(job, base, student, "")
    planned = planned_checkpoint(plan.student_config, student_record(base, plan.teacher, -1),
                                 "planned:trial")
    plan_rows(scoring, load=lambda ref: planned)
    return scoring


def tune(job: TuneJob, out: str, *, resume: bool = False, address: str | None = None,
         quiet: bool = False) -> dict:
    """Run (or with `resume`, continue) the search; writes DIR's results and returns them."""
    out = os.path.abspath(out)
    experiment = os.path.join(out, EXPERIMENT)
    if resume and not ray.tune.Tuner.can_restore(experiment):
        raise ConfigError("--resume", f"{out} holds no search to continue")
    if not resume and os.path.isdir(out) and os.listdir(out):
        raise ConfigError(out, "is not empty; pass --resume to continue the search in it, or "
                               "choose a new --out")
    base = base_job(job)
    ensure_teacher(base, progress=not quiet)
    scoring = check(job, base)
    # the trials run in other working directories: the paths as checked here, absolute
    job = dataclasses.replace(job, train=os.path.abspath(job.train),
                              eval={key: to_dict(scoring)[key] for key in job.eval})
    workers = base.workers
    init_ray(address, num_cpus=max(os.cpu_count() or 1, int(workers.num * workers.cpus) + 2),
             dashboard=True)
    trainable = ray.tune.with_parameters(run_trial, base=to_dict(base), job=to_dict(job), out=out)
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        os.makedirs(out, exist_ok=True)
        domains = {"loguniform": ray.tune.loguniform, "uniform": ray.tune.uniform,
                   "choice": ray.tune.choice, "grid": ray.tune.grid_search}
        space = {}
        for key, domain in job.space.items():
            (kind, values), = domain.items()
            space[key] = domains[kind](*values) if kind in ("loguniform", "uniform") \
                else domains[kind](values)
        tuner = ray.tune.Tuner(
            trainable, param_space=space,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=job.trials,
                scheduler=ASHAScheduler(max_t=job.rungs, grace_period=1,
                                        reduction_factor=job.reduction_factor),
                search_alg=BasicVariantGenerator(max_concurrent=job.concurrent,
                                                 random_state=job.seed)),
            run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=out, verbose=0,
                                          callbacks=[] if quiet else [Lines(job.rungs)]))
    grid = tuner.fit()
    results = summarize(grid, job, scoring)
    write_results(out, results, base, job)
    return results


class Lines(ray.tune.Callback):
    """One line per score reported and per trial ended on standard output (Ray Tune's own tables
    are off). It holds nothing but the rung count: a resumed search restores it as pickled."""

    def __init__(self, rungs: int):
        self.rungs = rungs

    @staticmethod
    def log(line: str) -> None:
        print(line, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.log(f"tune: {trial.trial_id} rung {result['rung']}/{self.rungs} ({result['step']} "
                 f"steps): {METRIC} {result[METRIC]:.4f}  " + _values(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info):
        reached = trial.last_result.get("rung", 0)
        self.log(f"tune: {trial.trial_id} " + ("finished" if reached == self.rungs else
                                               f"stopped by ASHA after rung {reached}"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"tune: {trial.trial_id} failed ({trial.error_file})")


def _values(config: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in sorted(config.items()))


def summarize(grid, job: TuneJob, scoring: EvalJob) -> dict:
    """Every trial's values, scores by rung and outcome, and the best finished trial."""
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        scores = [] if frame is None or METRIC not in frame else [
            {"rung": int(r["rung"]), "step": int(r["step"]), METRIC: float(r[METRIC])}
            for _, r in frame.iterrows()]
        trials.append({"trial": result.metrics["trial_id"] if result.metrics else
                       os.path.basename(result.path), "values": dict(result.config),
                       "scores": scores, "error": str(result.error) if result.error else None,
                       "stopped_early": result.error is None and len(scores) < job.rungs})
    finished = [t for t in trials if len(t["scores"]) == job.rungs]
    best = min(finished, key=lambda t: t["scores"][-1][METRIC]) if finished else None
    exact = any(result.metrics and any(key.startswith("frechet") for key in result.metrics)
                for result in grid)
    measure = "Frechet distance to the exact distribution" if exact else "FID"
    if scoring.w_sweep:
        ws = ", ".join(f"{w:g}" for w in [scoring.w, *scoring.w_sweep])
        measure = f"{measure}, the geometric mean over w = {ws}"
    return {"metric": METRIC, "measure": measure, "rungs": job.rungs, "trials": trials,
            "best": best["trial"] if best else None}


def write_results(out: str, results: dict, base: TrainJob, job: TuneJob) -> None:
    """DIR/results.json and results.md, and DIR/best.yaml when a trial ran every rung."""
    with open(os.path.join(out, RESULTS + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    keys = sorted(job.space)
    header = ["trial", *keys, *(f"rung {r}" for r in range(1, job.rungs + 1)), "outcome"]
    lines = [f"# raydistill tune: {job.train}", "",
             f"{len(results['trials'])} trials, {job.rungs} rungs, ASHA keeping the best "
             f"1/{job.reduction_factor} at each; score: {results['measure']} (lower is better)",
             "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for trial in sorted(results["trials"], key=lambda t: t["trial"]):
        scores = {s["rung"]: f"{s[METRIC]:.4f} ({s['step']} steps)" for s in trial["scores"]}
        outcome = "failed" if trial["error"] else "stopped early" if trial["stopped_early"] \
            else "best" if trial["trial"] == results["best"] else "finished"
        lines.append("| " + " | ".join([trial["trial"], *(_cell(trial["values"].get(k))
                                                           for k in keys),
                                         *(scores.get(r, "") for r in range(1, job.rungs + 1)),
                                         outcome]) + " |")
    with open(os.path.join(out, RESULTS + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if results["best"] is not None:
        best = next(t for t in results["trials"] if t["trial"] == results["best"])
        chosen = trial_job(base, best["values"])
        with open(os.path.join(out, BEST), "w") as f:
            f.write(f"# raydistill tune {job.train}: trial {best['trial']}, {METRIC} "
                    f"{best['scores'][-1][METRIC]:.4f} ({_values(best['values'])})\n")
            yaml.safe_dump(to_dict(chosen), f, sort_keys=False)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
