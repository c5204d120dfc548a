"""`raydistill run`: the whole chain on one Ray instance, each stage skipped when its lineage
matches (raydistill.pipeline.lineage).

    DIR/teacher      the teacher checkpoint           (raydistill teacher), or only the lineage
                     of `teacher.pretrained` (a diffusers directory or a checkpoint, distilled
                     where it is)
    DIR/classifier   the domain classifier            (raydistill classifier; FID features),
                     unless `eval.features` names the features to score with
    DIR/<student>-pairs  a student's pair set, when its stage has `pairs:` (raydistill pairs)
    DIR/<student>    one training run per student      (raydistill train; DIR/<student>/student)
    DIR/eval         sample sets and eval.json         (raydistill eval)
    DIR/report.md, DIR/metrics.json                    (raydistill.pipeline.report)
    DIR/run.log      the stage lines, and the engines' INFO lines and warnings (raydistill.logs);
                     each training stage's workers log to DIR/<student>/logs/

A student stage that was killed midway continues from its last checkpoint when its job is
unchanged (train --resume), and starts over otherwise. Before the first stage runs, every stage's
job is checked against what the earlier stages will write (raydistill.pipeline.plan).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from raydistill.config import (
    ConfigError,
    EvalJob,
    PairsJob,
    PipelineJob,
    StudentStage,
    TrainJob,
    absolute_teacher,
    from_dict,
    planned_outputs,
    to_dict,
    with_absolute_paths,
)
from raydistill.logs import engine_logs_to
from raydistill.methods.registry import method_spec
from raydistill.models.checkpoint import Checkpoint, as_planned, load_checkpoint, load_teacher
from raydistill.pipeline.lineage import (
    forget_record,
    read_record,
    why_rerun,
    write_record,
)
from raydistill.pipeline.plan import Planner, StagePlan
from raydistill.storage import file_sha256

RUN_LOG = "run.log"


@dataclass
class Stage:
    """One stage: its lineage config (built when it is reached), the stages whose outputs it reads,
    how its output is fingerprinted and made, and how it is checked before the run (its key
    settings, one line)."""

    name: str
    config: Callable[[], dict[str, Any]]
    inputs: list[str]
    fingerprint: Callable[[str], str]
    make: Callable[[str], dict[str, Any] | None]
    check: Callable[[Planner], str]


@dataclass
class StageOutcome:
    name: str
    ran: bool                        # False: skipped, its lineage matched
    record: dict


def checkpoint_fingerprint(directory: str) -> str:
    return load_checkpoint(directory).fingerprint


def classifier_fingerprint(directory: str) -> str:
    from raydistill.models.classifier import load_classifier

    load_classifier(directory)
    return file_sha256(os.path.join(directory, "model.safetensors"))


def student_fingerprint(directory: str) -> str:
    return checkpoint_fingerprint(os.path.join(directory, "student"))


def pairs_fingerprint(directory: str) -> str:
    """The pair set's identity and every shard's checksum, once the listing shows each recorded
    shard present with its recorded size (no hashing: `raydistill verify` reads the contents)."""
    from raydistill.pairs.manifest import Manifest, read_run
    from raydistill.pairs.pool import lost_shards
    from raydistill.storage import Location

    location = Location.parse(directory)
    run, manifest = read_run(location), Manifest.read(location)
    if run is None:
        raise ValueError(f"{directory} holds no pair set")
    lost = lost_shards(location, manifest)
    if lost:
        name, why = next(iter(lost.items()))
        raise ValueError(f"shard {name} is {why}")
    if len(manifest) < run["num_shards"]:
        raise ValueError(f"{len(manifest)} of {run['num_shards']} shards")
    shards = {name: row["sha256"] for name, row in sorted(manifest.rows.items())}
    return hashlib.sha256(json.dumps({"identity": run["identity"], "shards": shards},
                                     sort_keys=True).encode()).hexdigest()


def eval_fingerprint(directory: str) -> str:
    return file_sha256(os.path.join(directory, "eval.json"))


class Pipeline:
    def __init__(self, job: PipelineJob, out: str, *, address: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print):
        self.job, self.out, self.address = job, os.path.abspath(out), address
        self.progress, self._print = progress, log
        self.fingerprints: dict[str, str] = {}
        self.outcomes: list[StageOutcome] = []
        self.checked: list[StagePlan] | None = None          # what `check` found
        self.reusable: dict[str, str] = {}    # stages the check found done, and their fingerprints
        pretrained = job.teacher.pretrained
        self.pretrained = absolute_teacher(pretrained) if pretrained is not None else None
        self.plan = self._stages()
        self.stages = [stage.name for stage in self.plan]

    def _stages(self) -> list[Stage]:
        if self.pretrained is None:
            stages = [Stage("teacher", lambda: to_dict(self.job.teacher), [],
                            checkpoint_fingerprint, self._train_teacher,
                            lambda planner: planner.teacher())]
        else:
            stages = [Stage("teacher", lambda: {"pretrained": to_dict(self.pretrained)}, [],
                            lambda directory: self.pretrained_model.fingerprint,
                            lambda directory: os.makedirs(directory, exist_ok=True),
                            lambda planner: planner.teacher())]
        if self.job.trains_classifier:
            stages.append(Stage("classifier", lambda: to_dict(self.job.classifier), [],
                                classifier_fingerprint, self._train_classifier,
                                lambda planner: planner.classifier()))
        for s in self.job.students:
            if s.pairs_stage:
                stages.append(Stage(s.pairs_stage,
                                    lambda s=s: self.pairs_stage_config(s), [s.teacher],
                                    pairs_fingerprint,
                                    lambda directory, s=s: self._make_pairs(s, directory),
                                    lambda planner, s=s: planner.pairs(s)))
            stages.append(Stage(s.name, lambda s=s: {"teacher": s.teacher, "train": s.train},
                                [s.teacher, *([s.reads_pairs] if s.reads_pairs else [])],
                                student_fingerprint,
                                lambda directory, s=s: self._train_student(s, directory),
                                lambda planner, s=s: planner.student(s)))
        evaluated = [s.name for s in self.job.students if s.evaluate]
        scored_by = ["classifier"] if self.job.trains_classifier else []
        stages.append(Stage("eval", lambda: {"eval": self.job.eval, "students": evaluated},
                            ["teacher", *scored_by, *evaluated], eval_fingerprint,
                            self._evaluate, lambda planner: planner.evaluation()))
        return stages

    @functools.cached_property
    def pretrained_model(self) -> Checkpoint | None:
        """The pretrained teacher, read once (its fingerprint and record, without its weights)."""
        return as_planned(load_teacher(self.pretrained)) if self.pretrained is not None else None

    def log(self, line: str) -> None:
        """A line for the terminal, also kept in DIR/run.log."""
        self._print(line)
        logging.getLogger("raydistill.run").info(line)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def check(self) -> list[StagePlan]:
        """Check every stage's job against what the earlier stages will write, before any stage
        runs (ConfigError naming the stage and the key), and say which stages the lineage records
        let the run reuse."""
        planner, plans, self.reusable = Planner(self), [], {}
        with planned_outputs(self.outputs()):
            for index, stage in enumerate(self.plan):
                try:
                    settings = stage.check(planner)
                except ConfigError as err:
                    raise ConfigError(f"stage {stage.name} [{index + 1}/{len(self.plan)}]",
                                      str(err)) from None
                plans.append(StagePlan(stage.name, stage.inputs, settings, self._verdict(stage)))
        self.checked = plans
        return plans

    def outputs(self) -> list[str]:
        """The directories the stages write that later stages read."""
        made = [self.path(name) for name in ("teacher", "classifier")] + [
            self.path(s.pairs_stage) for s in self.job.students if s.pairs_stage]
        return made + [os.path.join(self.path(s.name), "student") for s in self.job.students]

    def _verdict(self, stage: Stage) -> str:
        """Whether the run will reuse the stage (its lineage record matches, and every stage it
        reads is reused), or why it runs."""
        waiting = [name for name in stage.inputs if name not in self.reusable]
        if waiting:
            return f"runs: after {', '.join(waiting)}"
        directory = self.path(stage.name)
        reason = why_rerun(directory, stage.config(),
                           {name: self.reusable[name] for name in stage.inputs}, stage.fingerprint)
        if reason is not None:
            return f"runs: {reason}"
        self.reusable[stage.name] = read_record(directory)["fingerprint"]
        return f"reused (lineage matches, {self.reusable[stage.name][:12]})"

    def run(self) -> list[StageOutcome]:
        """Check every stage (see `check`) unless that was done, then run those that are not
        done."""
        if self.checked is None:
            self.check()
        os.makedirs(self.out, exist_ok=True)
        with engine_logs_to(os.path.join(self.out, RUN_LOG)):
            for stage in self.plan:
                self.stage(stage)
        return self.outcomes

    def ray(self) -> None:
        """One Ray instance serves every stage that needs one, started by the first of them (Ray
        Train wants the dashboard, and CPUs beside its workers for Ray Data)."""
        from raydistill.cluster import init_ray

        default = TrainJob().workers.num
        workers = max([default] + [int(s.train.get("workers", {}).get("num", default))
                                   for s in self.job.students])
        init_ray(self.address, num_cpus=max(os.cpu_count() or 1, workers + 1), dashboard=True)

    def stage(self, stage: Stage) -> None:
        """Reuse the stage if the check found it done, or if its lineage matches now (a stage it
        reads may have run again to the same output); else run it and record its lineage."""
        name, config, directory = stage.name, stage.config(), self.path(stage.name)
        index = f"[{self.stages.index(name) + 1}/{len(self.stages)}]"
        inputs = {source: self.fingerprints[source] for source in stage.inputs}
        reason = None if name in self.reusable else why_rerun(directory, config, inputs,
                                                              stage.fingerprint)
        if reason is None:
            record = read_record(directory)
            self.log(f"run: {index} {name}: done already (lineage matches, "
                     f"{record['fingerprint'][:12]}); skipped")
            self.fingerprints[name] = record["fingerprint"]
            self.outcomes.append(StageOutcome(name, False, record))
            return
        self.log(f"run: {index} {name}: running ({reason})")
        forget_record(directory)         # until it finishes again, nothing claims it did
        start = time.perf_counter()
        extra = stage.make(directory) or {}
        seconds = time.perf_counter() - start
        record = write_record(directory, name, config, inputs, stage.fingerprint(directory),
                              seconds, **extra)
        self.fingerprints[name] = record["fingerprint"]
        self.outcomes.append(StageOutcome(name, True, record))
        self.log(f"run: {index} {name}: finished in {seconds:.0f} s "
                 f"({record['fingerprint'][:12]})")

    def _train_teacher(self, directory: str) -> dict:
        from raydistill.pretrain.teacher import train_teacher

        _clear(directory)
        result = train_teacher(self.job.teacher, directory, progress=self.progress)
        return {"eval_loss": result.eval_loss_end}

    def _train_classifier(self, directory: str) -> dict:
        from raydistill.pretrain.classifier import train_classifier

        _clear(directory)
        result = train_classifier(self.job.classifier, directory, progress=self.progress)
        return {"test_accuracy": result.test_accuracy}

    def teacher_ref(self, name: str) -> dict[str, Any]:
        """The TeacherRef of stage `name`'s model: the pipeline's teacher (a pretrained one
        pinned to the fingerprint its stage recorded), or an earlier stage's student."""
        if name == "teacher" and self.pretrained is not None:
            return {**to_dict(self.pretrained), "fingerprint": self.pretrained_model.fingerprint}
        return {"checkpoint": self.path(name) if name == "teacher" else
                os.path.join(self.path(name), "student")}

    def students_key(self, stage: StudentStage, section: str) -> str:
        """The config key of a section of the stage: students[i].section."""
        return f"students[{self.job.students.index(stage)}].{section}"

    def train_job(self, stage: StudentStage) -> TrainJob:
        data = {"data": to_dict(self.job.teacher.data)} if "data" not in stage.train else {}
        pairs = {"pairs": self.path(stage.reads_pairs)} if stage.reads_pairs else {}
        try:
            job = from_dict(TrainJob, {**data, **stage.train, **pairs,
                                       "teacher": self.teacher_ref(stage.teacher)})
        except ConfigError as err:
            raise err.under(self.students_key(stage, "train")) from None
        return with_absolute_paths(job)

    def pairs_job(self, stage: StudentStage) -> PairsJob:
        """The pair set a stage trains from: mode, teacher, data and guidance from its train job,
        the method's own keys (e.g. progressive's student_steps), then the stage's `pairs:`."""
        train = self.train_job(stage)
        spec = method_spec(train.method)
        try:
            job = from_dict(PairsJob, {
                "mode": spec.pairs_mode, "teacher": self.teacher_ref(stage.teacher),
                "data": to_dict(train.data), "guidance": to_dict(train.guidance),
                **spec.pairs_keys(train), **stage.pairs})
        except ConfigError as err:
            raise err.under(self.students_key(stage, "pairs")) from None
        return with_absolute_paths(job)

    def pairs_stage_config(self, stage: StudentStage) -> dict[str, Any]:
        """The pair stage's lineage config: its job with the teacher named by stage, not by
        location (the teacher's fingerprint is the stage's input), so a pipeline directory that
        was moved or copied reuses its pair sets and the students trained from them."""
        pairs = to_dict(self.pairs_job(stage))
        del pairs["teacher"]
        return {"teacher": stage.teacher, "pairs": pairs}

    def _make_pairs(self, stage: StudentStage, directory: str) -> dict:
        """Make (or complete, or repair by listing) the stage's pair set; a set another job made
        there is replaced."""
        from raydistill.pairs.pool import plan_pairs, run_pairs

        plan = plan_pairs(self.pairs_job(stage), directory, replace=True)
        if plan.replaced:
            self.log(f"run: {stage.pairs_stage}: replacing the pair set made with {plan.replaced}")
        if plan.lost:
            self.log(f"run: {stage.pairs_stage}: regenerating " + ", ".join(
                f"{name} ({why})" for name, why in plan.lost.items()))
        self.ray()
        result = run_pairs(plan, progress=self.progress)
        return {"shards": result.total, "generated": result.generated,
                "samples_per_s": result.pairs_per_second,
                "teacher_evaluations": result.teacher_evaluations}

    def _train_student(self, stage: StudentStage, directory: str) -> dict:
        from raydistill.train.driver import train

        job = self.train_job(stage)
        self.ray()
        resume = _same_run(directory, job)
        if not resume:
            _clear(directory)
        else:
            self.log(f"run: {stage.name}: continuing its stopped training run")
        result = train(job, directory, resume=resume, address=self.address,
                       progress=self.progress, label=stage.name)
        outside = result.outside_loop
        self.log(f"run: {stage.name}: {result.steps} steps; {sum(outside.values()):.0f} s outside "
                 "the training loop (" + ", ".join(f"{name} {seconds:.0f} s"
                                                   for name, seconds in outside.items()) + ")")
        return {"method": job.method, "steps": result.steps, "loss": result.metrics["loss"],
                "overhead_s": sum(outside.values()), "outside_loop": outside,
                "teacher_evaluations": int(result.metrics["teacher_evaluations"]),
                "samples_per_s": float(result.metrics["run_samples_per_s"])}

    def students_to_score(self, stage: StudentStage) -> list[str]:
        """The checkpoints a stage made: every round's student of a progressive run (each at its
        own steps), else the student."""
        rounds = os.path.join(self.path(stage.name), "rounds")
        if os.path.isdir(rounds):
            return [os.path.join(rounds, name) for name in sorted(os.listdir(rounds))]
        return [os.path.join(self.path(stage.name), "student")]

    def eval_job(self, planned: bool = False) -> EvalJob:
        """The evaluation of every student the stages made, or (`planned`) of the final student
        each stage will make."""
        students = [{"name": s.name, "checkpoint": checkpoint}
                    for s in self.job.students if s.evaluate
                    for checkpoint in ([os.path.join(self.path(s.name), "student")] if planned
                                       else self.students_to_score(s))]
        features = {"features": {"kind": "classifier", "path": self.path("classifier")}} \
            if self.job.trains_classifier else {}
        try:
            job = from_dict(EvalJob, {
                **self.job.eval, "teacher": self.teacher_ref("teacher"),
                "students": students, "data": to_dict(self.job.teacher.data), **features})
        except ConfigError as err:
            raise err.under("eval") from None
        return with_absolute_paths(job)

    def _evaluate(self, directory: str) -> dict:
        from raydistill.eval.evaluate import evaluate

        job = self.eval_job()
        self.ray()
        report = evaluate(job, directory, progress=self.progress, log=self.log)
        return {"rows": len(report["rows"]),
                "network_evaluations": sum(r["nfe"] * r["samples"] for r in report["rows"])}


def _same_run(directory: str, job: TrainJob) -> bool:
    """Whether `directory` holds a stopped training run of exactly this job."""
    path = os.path.join(directory, "train.yaml")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        recorded = yaml.safe_load(f)
    try:                                 # read as a job, so that a run recorded before a key
        recorded = to_dict(from_dict(TrainJob, recorded))   # moved compares by its meaning
    except ConfigError:
        return False
    return recorded == to_dict(with_absolute_paths(job)) and os.path.isdir(
        os.path.join(directory, "ray"))


def _clear(directory: str) -> None:
    if os.path.isdir(directory):
        shutil.rmtree(directory)
