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
unchanged (train --resume), and starts over otherwise.
"""

from __future__ import annotations

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
    to_dict,
    with_absolute_paths,
)
from raydistill.logs import engine_logs_to
from raydistill.methods.registry import method_spec
from raydistill.models.checkpoint import load_checkpoint, load_teacher
from raydistill.pipeline.lineage import (
    forget_record,
    read_record,
    why_rerun,
    write_record,
)
from raydistill.storage import file_sha256

RUN_LOG = "run.log"


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
        pretrained = job.teacher.pretrained
        self.pretrained = absolute_teacher(pretrained) if pretrained is not None else None
        self.stages = ["teacher", *(["classifier"] if job.trains_classifier else []),
                       *(name for s in job.students for name in (s.pairs_stage, s.name) if name),
                       "eval"]

    def log(self, line: str) -> None:
        """A line for the terminal, also kept in DIR/run.log."""
        self._print(line)
        logging.getLogger("raydistill.run").info(line)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def run(self) -> list[StageOutcome]:
        os.makedirs(self.out, exist_ok=True)
        with engine_logs_to(os.path.join(self.out, RUN_LOG)):
            self._run()
        return self.outcomes

    def _run(self) -> None:
        if self.pretrained is None:
            self.stage("teacher", to_dict(self.job.teacher), {}, checkpoint_fingerprint,
                       self._train_teacher)
        else:
            self.stage("teacher", {"pretrained": to_dict(self.pretrained)}, {},
                       lambda directory: load_teacher(self.pretrained).fingerprint,
                       lambda directory: os.makedirs(directory, exist_ok=True))
        if self.job.trains_classifier:
            self.stage("classifier", to_dict(self.job.classifier), {}, classifier_fingerprint,
                       self._train_classifier)
        for stage in self.job.students:
            inputs = {stage.teacher: self.fingerprints[stage.teacher]}
            if stage.pairs_stage:
                self.stage(stage.pairs_stage, {"pairs": to_dict(self.pairs_job(stage))}, inputs,
                           pairs_fingerprint,
                           lambda directory, s=stage: self._make_pairs(s, directory))
            if stage.reads_pairs:
                inputs = {**inputs, stage.reads_pairs: self.fingerprints[stage.reads_pairs]}
            self.stage(stage.name, {"teacher": stage.teacher, "train": stage.train}, inputs,
                       student_fingerprint,
                       lambda directory, s=stage: self._train_student(s, directory))
        evaluated = [s.name for s in self.job.students if s.evaluate]
        scored_by = ["classifier"] if self.job.trains_classifier else []
        self.stage("eval", {"eval": self.job.eval, "students": evaluated},
                   {name: self.fingerprints[name] for name in ["teacher", *scored_by,
                                                               *evaluated]},
                   eval_fingerprint, self._evaluate)

    def ray(self) -> None:
        """One Ray instance serves every stage that needs one, started by the first of them (Ray
        Train wants the dashboard, and CPUs beside its workers for Ray Data)."""
        from raydistill.cluster import init_ray

        default = TrainJob().workers.num
        workers = max([default] + [int(s.train.get("workers", {}).get("num", default))
                                   for s in self.job.students])
        init_ray(self.address, num_cpus=max(os.cpu_count() or 1, workers + 1), dashboard=True)

    def stage(self, name: str, config: dict[str, Any], inputs: dict[str, str],
              fingerprint: Callable[[str], str],
              make: Callable[[str], dict[str, Any] | None]) -> None:
        directory = self.path(name)
        index = f"[{self.stages.index(name) + 1}/{len(self.stages)}]"
        reason = why_rerun(directory, config, inputs, fingerprint)
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
        extra = make(directory) or {}
        seconds = time.perf_counter() - start
        record = write_record(directory, name, config, inputs, fingerprint(directory), seconds,
                              **extra)
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
            return {**to_dict(self.pretrained), "fingerprint": self.fingerprints["teacher"]}
        return {"checkpoint": self.path(name) if name == "teacher" else
                os.path.join(self.path(name), "student")}

    def train_job(self, stage: StudentStage) -> TrainJob:
        data = {"data": to_dict(self.job.teacher.data)} if "data" not in stage.train else {}
        pairs = {"pairs": self.path(stage.reads_pairs)} if stage.reads_pairs else {}
        try:
            job = from_dict(TrainJob, {**data, **stage.train, **pairs,
                                       "teacher": self.teacher_ref(stage.teacher)})
        except ConfigError as err:
            raise err.under(f"students[{self.job.students.index(stage)}].train") from None
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
            raise err.under(f"students[{self.job.students.index(stage)}].pairs") from None
        return with_absolute_paths(job)

    def _make_pairs(self, stage: StudentStage, directory: str) -> dict:
        """Make (or complete, or repair by listing) the stage's pair set; a set another job made
        there is replaced."""
        from raydistill.pairs.manifest import read_run, run_identity
        from raydistill.pairs.pool import plan_pairs, run_pairs
        from raydistill.storage import Location

        job = self.pairs_job(stage)
        previous = read_run(Location.parse(directory)) if os.path.isdir(directory) else None
        if previous is not None and previous["identity"] != run_identity(
                job, load_teacher(job.teacher)):
            _clear(directory)
        plan = plan_pairs(job, directory)
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

    def eval_job(self) -> EvalJob:
        students = [{"name": s.name, "checkpoint": checkpoint}
                    for s in self.job.students if s.evaluate
                    for checkpoint in self.students_to_score(s)]
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
    return recorded == to_dict(with_absolute_paths(job)) and os.path.isdir(
        os.path.join(directory, "ray"))


def _clear(directory: str) -> None:
    if os.path.isdir(directory):
        shutil.rmtree(directory)
