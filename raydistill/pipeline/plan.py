"""A pipeline checked before it runs (`raydistill run` always; `raydistill run --check` only).

Every stage's job is built as the stage will build it (presets and overrides applied) and checked
as its own command checks it: the teacher's data against its network, each pair set's teacher and
data, each student's method and module checks (raydistill.train.build.check_job), each evaluation
row's sampler. What an earlier stage will write stands in for itself: a checkpoint is its config and
its record on the meta device (no weights, no training), a pair set is the identity its pairs.json
will hold. So a config error stops the run before its first stage, naming the stage and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raydistill.config import (
    ConfigError,
    StudentStage,
    TeacherRef,
    absolute_teacher,
    from_dict,
    to_dict,
)
from raydistill.methods.registry import method_spec
from raydistill.models.checkpoint import Checkpoint, planned_checkpoint
from raydistill.pairs.manifest import PairSet
from raydistill.train.build import check_job, student_record

if TYPE_CHECKING:
    from raydistill.pipeline.run import Pipeline


@dataclass
class StagePlan:
    name: str
    reads: list[str]                 # the earlier stages whose outputs it reads
    settings: str                    # its key settings, one line
    verdict: str = ""                # "reused (...)" or "runs: why"


@dataclass
class Planner:
    """The stand-ins of what the stages checked so far will write."""

    pipeline: Pipeline
    models: dict[str, Checkpoint] = field(default_factory=dict)    # by _ref_key of their ref
    pair_sets: dict[str, PairSet] = field(default_factory=dict)    # by stage name

    def model(self, ref: TeacherRef) -> Checkpoint:
        return self.models[_ref_key(ref)]

    def stage_model(self, name: str) -> Checkpoint:
        """The model stage `name` ("teacher" or a student stage) writes."""
        return self.models[self._stage_key(name)]

    def _stage_key(self, name: str) -> str:
        return _ref_key(from_dict(TeacherRef, self.pipeline.teacher_ref(name)))

    def teacher(self) -> str:
        job = self.pipeline.job.teacher
        pretrained = self.pipeline.pretrained_model
        if pretrained is not None:
            self.models[self._stage_key("teacher")] = pretrained
            config = pretrained.config
            return f"pretrained {config.kind} ({config.prediction}-prediction, " \
                   f"{config.schedule.kind} schedule), fingerprint {pretrained.fingerprint[:12]}"
        from raydistill.pretrain.teacher import planned_teacher

        try:
            teacher = planned_teacher(job)
        except ConfigError as err:
            raise err.under("teacher") from None
        self.models[self._stage_key("teacher")] = teacher
        config = teacher.config
        return f"{config.kind} ({config.prediction}-prediction, {config.schedule.kind} " \
               f"schedule) on {job.data.source}: {job.optim.steps} steps, batch " \
               f"{job.optim.batch_size}, lr {job.optim.lr:g}"

    def classifier(self) -> str:
        job = self.pipeline.job.classifier
        return f"{job.steps} steps, batch {job.batch_size}, width {job.width}"

    def pairs(self, stage: StudentStage) -> str:
        from raydistill.pairs.modes import MODES
        from raydistill.pairs.pool import check_pairs_job, planned_pair_set

        job = self.pipeline.pairs_job(stage)
        teacher = self.stage_model(stage.teacher)
        try:
            check_pairs_job(job, teacher)
        except ConfigError as err:
            raise err.under(self.pipeline.students_key(stage, "pairs")) from None
        self.pair_sets[stage.pairs_stage] = planned_pair_set(job, teacher)
        made = MODES[job.mode].describe(job)
        return f"{job.mode} pairs ({made}{', stochastic' if job.stochastic else ''}): " \
               f"{job.num_shards} shards x {job.samples_per_shard}, w in " \
               f"[{job.guidance.w_min:g}, {job.guidance.w_max:g}]"

    def student(self, stage: StudentStage) -> str:
        job = self.pipeline.train_job(stage)
        teacher = self.stage_model(stage.teacher)
        pairs = self.pair_sets[stage.reads_pairs] if stage.reads_pairs else None
        try:
            plan = check_job(job, teacher, (lambda: pairs) if pairs else None)
        except ConfigError as err:
            raise err.under(self.pipeline.students_key(stage, "train")) from None
        record = student_record(job, teacher, -1)
        self.models[self._stage_key(stage.name)] = \
            planned_checkpoint(plan.student_config, record, f"planned:{stage.name}")
        spec, optim, workers = method_spec(job.method), job.optim, job.workers
        key, steps = spec.round_length(job)
        section = f"; {spec.section}: " + " ".join(
            f"{k}={v}" for k, v in to_dict(job.settings).items() if v != "") \
            if spec.section else ""
        gpus = f" x {workers.gpus:g} GPU" if workers.gpus else ""
        return f"{job.method}: {key} = {steps}, batch {optim.batch_size}, lr {optim.lr:g}, " \
               f"EMA {optim.ema_decay:g}, {workers.num} workers{gpus}, ZeRO-" \
               f"{job.deepspeed.zero_stage} {job.deepspeed.precision}{section}"

    def evaluation(self) -> str:
        from raydistill.eval.evaluate import plan_rows, sample_job
        from raydistill.pairs.pool import check_pairs_job

        job = self.pipeline.eval_job(planned=True)
        rows = plan_rows(job, load=self.model)
        for row in rows:
            try:
                check_pairs_job(sample_job(job, row), self.model(row.model))
            except ConfigError as err:
                raise ConfigError("eval", f"row {row.key}: {err}") from None
        baselines = len(job.baseline_solvers) * len(job.baseline_steps)
        teacher = "the teacher and its floor" if job.floor else "the teacher"
        features = f"{job.features.kind} features" if job.features is not None else \
            "exact distances"
        sweep = f"; a guidance sweep at w = {', '.join(f'{w:g}' for w in job.w_sweep)}" \
            if job.w_sweep else ""
        return f"{teacher}, {baselines} baselines and the students of {len(job.students)} " \
               f"stages: {job.num_samples} samples a row at w = {job.w:g}, {features}{sweep}"


def _ref_key(ref: TeacherRef) -> str:
    return json.dumps(to_dict(absolute_teacher(ref)), sort_keys=True)


def format_plan(plans: list[StagePlan]) -> str:
    """The plan, two lines a stage: its name, whether it runs and what it reads; its settings."""
    index = len(f"[{len(plans)}/{len(plans)}]")
    name, verdict = max(len(p.name) for p in plans), max(len(p.verdict) for p in plans)
    lines = []
    for i, p in enumerate(plans):
        reads = f"  reads {', '.join(p.reads)}" if p.reads else ""
        lines += [f"{f'[{i + 1}/{len(plans)}]':>{index}} {p.name:<{name}}  "
                  f"{p.verdict:<{verdict}}{reads}".rstrip(),
                  f"{'':>{index}} {p.settings}"]
    return "\n".join(lines)
