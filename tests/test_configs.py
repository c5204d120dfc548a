"""Every config the project ships passes the checks its command makes before any work starts:

- each pipeline with each of its presets, through `raydistill run --check`'s path (every stage's
  job against what the earlier stages will write; tests/test_pipeline.py shows what it catches);
- each train, pairs, teacher and classifier job against the teacher and pair set it names, or
  the teacher its `teacher.build` trains and the pair set the pairs config beside it makes (as the
  README runs them);
- the sd15 jobs through their dry-run path, and their warm-up at their real values.

A config added under configs/ without a row in KINDS fails the first test.
"""

import glob
import os

import numpy as np
import pytest
import yaml
from test_data import write_image_shards, write_png_folder

from raydistill.config import (
    ClassifierJob,
    PairsJob,
    PipelineJob,
    TeacherJob,
    TeacherRef,
    TrainJob,
    TuneJob,
    from_dict,
    load,
    read_config,
    to_dict,
)
from raydistill.data import load_images
from raydistill.dryrun import dry_run_job
from raydistill.models.checkpoint import Checkpoint, load_teacher
from raydistill.pairs.pool import check_pairs_job, planned_pair_set
from raydistill.pipeline.run import Pipeline
from raydistill.pipeline.tune import base_job
from raydistill.pretrain.teacher import planned_teacher
from raydistill.train.build import check_job, check_warmup, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

KINDS = {
    "cluster/cluster.yaml": "cluster",      # Ray's cluster launcher: tests/test_submit.py
    "digits/classifier.yaml": "classifier",
    "digits/dmd.yaml": "train",
    "digits/dmd2.yaml": "train",
    "digits/guided.yaml": "train",
    "digits/kd.yaml": "train",
    "digits/pairs_ode.yaml": "pairs",
    "digits/pipeline.yaml": "pipeline",
    "digits/pipeline_multistep.yaml": "pipeline",
    "digits/teacher.yaml": "teacher",
    "examples/classifier_folder.yaml": "classifier",
    "examples/teacher_folder.yaml": "teacher",
    "examples/teacher_npz.yaml": "teacher",
    "examples/teacher_webdataset.yaml": "teacher",
    "sd15/dmd.yaml": "sd15",
    "sd15/guided.yaml": "sd15",
    "sd15/progressive.yaml": "sd15",
    "smoke/classifier.yaml": "classifier",
    "smoke/dmd.yaml": "train",
    "smoke/dmd2.yaml": "train",
    "smoke/guided.yaml": "train",
    "smoke/kd.yaml": "train",
    "smoke/pairs.yaml": "pairs",
    "smoke/pairs_ode.yaml": "pairs",
    "smoke/pairs_progressive.yaml": "pairs",
    "smoke/pipeline.yaml": "pipeline",
    "smoke/progressive.yaml": "train",
    "smoke/teacher.yaml": "teacher",
    "smoke/teacher_npz.yaml": "teacher",
    "tests/analytic_dmd.yaml": "train",
    "tests/analytic_guided.yaml": "train",
    "tune/dmd.yaml": "tune",
    "tune/dmd2.yaml": "tune",
    "tune/guided.yaml": "tune",
    "tune/kd.yaml": "tune",
}
#: the pairs config whose output a train config reads (the README's order of commands)
PAIRS_FROM = {"digits/dmd.yaml": "digits/pairs_ode.yaml", "digits/kd.yaml": "digits/pairs_ode.yaml",
              "smoke/kd.yaml": "smoke/pairs_ode.yaml"}


def of_kind(kind):
    return [name for name, k in KINDS.items() if k == kind]


@pytest.fixture(autouse=True)
def in_the_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)          # the configs' paths (runs/..., configs/...) are relative


def teacher_of(ref: TeacherRef) -> Checkpoint:
    """The teacher a job names, or the one its `build` will train when it is not there yet."""
    if ref.build and not os.path.isdir(ref.checkpoint):
        return planned_teacher(load(TeacherJob, ref.build))
    return load_teacher(ref)


def test_every_shipped_config_has_a_kind():
    shipped = sorted(os.path.relpath(path, CONFIGS)
                     for path in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
    assert shipped == sorted(KINDS)


@pytest.mark.parametrize("name, preset", [
    (name, preset) for name in of_kind("pipeline")
    for preset in sorted(yaml.safe_load(open(os.path.join(CONFIGS, name))).get("presets", {}))
    or [None]])
def test_a_pipeline_checks_out_with_each_preset(name, preset, tmp_path):
    out = tmp_path / "run"
    pipeline = Pipeline(load(PipelineJob, os.path.join(CONFIGS, name), preset=preset), str(out))
    plans = pipeline.check()
    assert [p.name for p in plans] == pipeline.stages
    assert plans[0].verdict == "runs: not run yet" and not out.exists()


@pytest.mark.parametrize("name", of_kind("train"))
def test_a_train_job_checks_out(name):
    job = load(TrainJob, os.path.join(CONFIGS, name))
    teacher = teacher_of(job.teacher)
    pairs = None
    if name in PAIRS_FROM:
        made = load(PairsJob, os.path.join(CONFIGS, PAIRS_FROM[name]))
        assert made.teacher == job.teacher
        check_pairs_job(made, teacher)
        pairs = planned_pair_set(made, teacher)
    assert bool(job.pairs) == (pairs is not None)
    plan = check_job(job, teacher, (lambda: pairs) if pairs else None)
    assert plan.pairs_rows == (pairs.rows if pairs else 0)


@pytest.mark.parametrize("name", of_kind("pairs"))
def test_a_pairs_job_checks_out(name):
    job = load(PairsJob, os.path.join(CONFIGS, name))
    check_pairs_job(job, teacher_of(job.teacher))


def data_for(source, tmp_path):
    """A few images of the kind a template config reads from the path its user gives."""
    if source == "npz":
        path = str(tmp_path / "data.npz")
        np.savez(path, images=np.zeros((8, 8, 8), np.uint8), labels=np.arange(8) % 2)
        return path
    if source == "folder":
        write_png_folder(tmp_path)
        return str(tmp_path)
    write_image_shards(tmp_path)
    return str(tmp_path)


def given_data(name, tmp_path):
    """The data.path a template needs (its user gives it), none for the digits."""
    source = yaml.safe_load(open(os.path.join(CONFIGS, name)))["data"]["source"]
    return [] if source == "digits" else [f"data.path={data_for(source, tmp_path)}"]


@pytest.mark.parametrize("name", of_kind("teacher"))
def test_a_teacher_job_checks_out(name, tmp_path):
    job = load(TeacherJob, os.path.join(CONFIGS, name), given_data(name, tmp_path))
    planned = planned_teacher(job)
    assert planned.config.unet.num_classes == load_images(job.data).num_classes


@pytest.mark.parametrize("name", of_kind("classifier"))
def test_a_classifier_job_checks_out(name, tmp_path):
    job = load(ClassifierJob, os.path.join(CONFIGS, name), given_data(name, tmp_path))
    assert len(load_images(job.data).train) > 0


@pytest.mark.parametrize("name", of_kind("tune"))
def test_a_tune_job_checks_out(name):
    """Its train job checks out (as a train config above) and takes every value of its space."""
    job = load(TuneJob, os.path.join(CONFIGS, name))
    assert KINDS[os.path.relpath(job.train, CONFIGS)] == "train"
    base_job(job)


@pytest.mark.parametrize("name", of_kind("sd15"))
def test_an_sd15_job_checks_out_through_its_dry_run(name, tmp_path):
    """Its files are on a cluster: the dry run's tiny teacher of the same family stands in for
    them, and the warm-up is checked at the job's real values."""
    path = os.path.join(CONFIGS, name)
    job, _ = dry_run_job(read_config(path), str(tmp_path / "dry"))
    prepare(job)
    real = read_config(path)
    real["teacher"], real["data"]["path"] = to_dict(job.teacher), str(tmp_path)
    check_warmup(from_dict(TrainJob, real))
