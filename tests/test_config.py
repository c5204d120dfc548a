"""Bad configs fail before any work, with exit code 2 and a one-line message naming the key."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from raydistill.cli import main
from raydistill.config import (
    ConfigError,
    OptimConfig,
    PipelineJob,
    TeacherJob,
    TrainJob,
    from_dict,
    load,
    planned_outputs,
    to_dict,
)
from raydistill.methods.dmd import DMDConfig
from raydistill.methods.generator import RegressionConfig
from raydistill.methods.progressive import HalvingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TEACHER = os.path.join(ROOT, "configs", "smoke", "teacher.yaml")
ANALYTIC = os.path.join(ROOT, "configs", "tests", "analytic_guided.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def train_yaml(tmp_path):
    """A train config whose teacher exists, plus a writer for variants of it."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()

    def write(**sections):
        data = {"method": "progressive", "teacher": {"checkpoint": str(teacher)}, **sections}
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)
    return write


@pytest.mark.parametrize("override, key", [
    ("optim.stepz=3", "optim.stepz"),        # unknown key
    ("bogus=1", "bogus"),
    ("optim.steps=abc", "optim.steps"),      # wrong type
    ("optim.lr=[1]", "optim.lr"),
    ("model.unet.w_embedding=3", "model.unet.w_embedding"),
    ("optim.steps=true", "optim.steps"),
    ("optim.lr=.nan", "optim.lr"),
    ("model.unet.channel_mult=[1,", "model.unet.channel_mult"),
    ("model.unet.w_embedding=true", "model.unet.w_embedding"),
    ("optim.steps=0", "optim.steps"),        # non-positive steps
    ("preview.steps=-4", "preview.steps"),
    ("model.prediction=score", "model.prediction"),
    ("data.channels=2", "data.channels"),
    ("data.source=npz", "data.path"),
    ("data.source=mixture", "data.source"),
])
def test_teacher_config_errors(capsys, tmp_path, override, key):
    out = tmp_path / "out"
    code, err = run(capsys, "teacher", "--config", SMOKE_TEACHER, "--out", str(out), override)
    assert code == 2
    assert err.count("\n") == 0 and f"error: {key}:" in err, err
    assert not out.exists()                   # no work started, nothing written


def test_unknown_key_in_yaml_file(capsys, tmp_path):
    path = tmp_path / "t.yaml"
    shutil.copy(SMOKE_TEACHER, path)
    with open(path, "a") as f:
        f.write("optim_typo:\n  steps: 3\n")
    code, err = run(capsys, "teacher", "--config", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and "optim_typo: unknown key" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = run(capsys, "teacher", "--config", str(tmp_path / "nope.yaml"), "--out", "x")
    assert code == 2 and "--config: no such file" in err


def test_w_min_above_w_max(capsys, train_yaml):
    path = train_yaml(guidance={"w_min": 3.0, "w_max": 1.0})
    code, err = run(capsys, "train", "--config", path, "--out", "x")
    assert code == 2 and "guidance.w_min:" in err and "w_max" in err


@pytest.mark.parametrize("halving, key", [
    ({"start_steps": 12}, "halving.start_steps"),
    ({"start_steps": 16, "end_steps": 3}, "halving.end_steps"),
    ({"start_steps": 0}, "halving.start_steps"),
])
def test_halving_needs_powers_of_two(capsys, train_yaml, halving, key):
    code, err = run(capsys, "train", "--config", train_yaml(halving=halving), "--out", "x")
    assert code == 2 and f"error: {key}:" in err


def test_missing_teacher_file(capsys, train_yaml, tmp_path):
    path = train_yaml()
    code, err = run(capsys, "train", "--config", path, "--out", "x",
                    f"teacher.checkpoint={tmp_path / 'missing'}")
    assert code == 2 and "error: teacher.checkpoint: no such file" in err


def test_sample_flag_errors(capsys, tmp_path):
    code, err = run(capsys, "sample", "--checkpoint", str(tmp_path), "--steps", "0",
                    "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--steps: must be positive" in err
    code, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--checkpoint: no such directory" in err
    code, err = run(capsys, "sample", "--checkpoint", str(tmp_path), "--solver", "euler",
                    "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--solver: must be one of" in err


def test_overrides_and_types():
    job = load(TeacherJob, SMOKE_TEACHER, ["optim.lr=1e-3", "model.unet.channel_mult=[1,2]",
                                           "optim.steps=7"])
    assert job.optim.lr == 1e-3 and job.optim.steps == 7 and job.model.unet.channel_mult == [1, 2]
    assert from_dict(HalvingConfig, {"start_steps": 64, "end_steps": 2}).end_steps == 2


def test_null_means_the_default(tmp_path):
    """`key=null` (or an empty YAML value) clears an optional key back to its default, in files and
    on the command line alike; a null list item is still a type error."""
    job = load(TrainJob, ANALYTIC, ["teacher.build=null", "optim.lr=null"])
    assert job.teacher.build == "" and job.optim.lr == OptimConfig().lr
    with pytest.raises(ConfigError, match="student: is required with an analytic teacher"):
        load(TrainJob, ANALYTIC, ["student=null"])
    path = tmp_path / "t.yaml"
    path.write_text("optim:\n  steps:\n  lr: 0.5\n")
    job = load(TeacherJob, str(path))
    assert job.optim.steps == OptimConfig().steps and job.optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"model.unet.channel_mult\[1\]: must be an integer"):
        load(TeacherJob, SMOKE_TEACHER, ["model.unet.channel_mult=[1,null]"])


def test_console_script_help_and_bad_input():
    exe = os.path.join(os.path.dirname(sys.executable), "raydistill")
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("teacher", "pairs", "train", "sample", "eval", "run", "verify", "submit"):
        assert verb in help_text
    done = subprocess.run([exe, "submit", "somewhere"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'somewhere'" in done.stderr
    bad = subprocess.run([exe, "teacher", "--config", SMOKE_TEACHER, "--out", "x", "a.b=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error: a: unknown key" in bad.stderr


def test_device_selection_never_falls_back_silently(capsys, tmp_path):
    import torch

    from raydistill.config import ConfigError
    from raydistill.devices import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device: unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        code, err = run(capsys, "teacher", "--config", SMOKE_TEACHER, "--out",
                        str(tmp_path / "o"), "device=cuda")
        assert code == 2 and "error: device: cuda requested but no CUDA device" in err


def test_pipeline_presets_and_list_item_overrides(capsys):
    """configs/digits/pipeline.yaml: `full` by default, `quick` shortens every stage; an override
    reaches into the students list by index, and bad indices or presets are named."""
    path = os.path.join(ROOT, "configs", "digits", "pipeline.yaml")
    full = load(PipelineJob, path)
    quick = load(PipelineJob, path, preset="quick")
    assert full.teacher.optim.steps == 640 and quick.teacher.optim.steps == 300
    assert full.students[1].train["halving"]["start_steps"] == 16
    assert quick.students[2].train["halving"] == {"start_steps": 8, "end_steps": 2,
                                                  "steps_per_round": 100, "stochastic": True}
    tuned = load(PipelineJob, path, ["students.0.train.optim.steps=7"], preset="quick")
    assert tuned.students[0].train["optim"]["steps"] == 7
    assert main(["run", "--config", path, "--out", "x", "--preset", "fast"]) == 2
    assert "--preset: 'fast' is not one of the presets ['full', 'quick']" in capsys.readouterr().err
    assert main(["run", "--config", path, "--out", "x", "students.6.name=a"]) == 2
    assert "students.6.name: 6 is not an index of a list of 6" in capsys.readouterr().err
    assert main(["run", "--config", path, "--out", "x", "students.1.teacher=nobody"]) == 2
    assert "students[1].teacher: must be 'teacher' or an earlier stage" in capsys.readouterr().err
    assert not os.path.exists("x")


def test_a_pipeline_stages_pairs_are_derived_from_its_train_keys(tmp_path):
    """A stage's `pairs:` holds only what its train keys do not decide; the pair set's mode,
    teacher, guidance and progressive student_steps come from the stage, and its stage name
    (`<name>-pairs`) may not collide with another stage's."""
    from raydistill.pipeline.run import Pipeline

    smoke = os.path.join(ROOT, "configs", "smoke", "pipeline.yaml")
    job = load(PipelineJob, smoke, ["students.1.pairs={num_shards: 2}"])
    pipeline = Pipeline(job, str(tmp_path))
    os.makedirs(tmp_path / "guided" / "student")        # the teacher the stage would have then
    assert pipeline.stages[2:6] == ["guided-pairs", "guided", "progressive-pairs", "progressive"]
    pairs = pipeline.pairs_job(job.students[1])
    assert (pairs.mode, pairs.student_steps, pairs.stochastic) == ("progressive", 4, False)
    assert (pairs.guidance.w_min, pairs.guidance.w_max) == (0.0, 2.0)
    assert pairs.teacher.checkpoint == os.path.join(str(tmp_path), "guided", "student")
    assert pipeline.train_job(job.students[1]).pairs == os.path.join(str(tmp_path),
                                                                     "progressive-pairs")
    with pytest.raises(ConfigError, match=r"students\[0\].pairs.mode: follows from the stage"):
        load(PipelineJob, smoke, ["students.0.pairs.mode=ode"])
    with pytest.raises(ConfigError, match="'guided-pairs' is used twice"):
        load(PipelineJob, smoke, ["students.1.name=guided-pairs"])


def test_every_shipped_config_loads(monkeypatch):
    """Each YAML under configs/ is a valid job for its verb (by its name: pairs*, teacher*,
    classifier*, pipeline*, the searches under configs/tune/, and training jobs otherwise)."""
    from raydistill.config import ClassifierJob, PairsJob, PipelineJob, TeacherJob, TuneJob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    verbs = {"pairs": PairsJob, "teacher": TeacherJob, "classifier": ClassifierJob,
             "pipeline": PipelineJob}
    paths = [p for p in sorted(glob.glob("configs/**/*.yaml", recursive=True))
             if not p.startswith(("configs/cluster/",     # Ray cluster launcher configs, not jobs
                                  "configs/sd15/"))]      # cluster files: tests/test_sd15.py
    assert "configs/smoke/dmd.yaml" in paths and "configs/digits/dmd2.yaml" in paths
    for path in paths:
        name = os.path.basename(path)
        cls = TuneJob if path.startswith("configs/tune/") else next(
            (c for prefix, c in verbs.items() if name.startswith(prefix)), TrainJob)
        if "npz" in name or "folder" in name or "webdataset" in name:
            continue                # they name the user's data, which the tests do not have
        load(cls, path)


def test_a_pretrained_teacher_is_for_pipelines_and_must_be_images(tmp_path, capsys):
    """`teacher.pretrained` names a teacher a pipeline distils where it lies: `raydistill teacher`
    refuses it (it trains one), and an analytic one is refused (a pipeline scores images)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    teacher_yaml = os.path.join(root, "configs", "smoke", "teacher.yaml")
    (tmp_path / "model").mkdir()
    assert main(["teacher", "--config", teacher_yaml, "--out", str(tmp_path / "t"),
                 f"pretrained.diffusers.path={tmp_path / 'model'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pretrained: names a teacher to distil in a pipeline (raydistill run); "
                        "raydistill teacher trains one") and not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="^teacher.pretrained: must be a diffusers directory or "
                                          "a checkpoint"):
        load(PipelineJob, None, ["teacher.pretrained.analytic={num_classes: 2}"])
    with pytest.raises(ConfigError, match="^teacher.pretrained.diffusers.path: no such directory"):
        load(PipelineJob, None, ["teacher.pretrained.diffusers.path=/nowhere"])


def _train_v1(name: str) -> dict:
    """A train.yaml as raydistill wrote it before methods owned their sections (tests/data)."""
    data = yaml.safe_load(open(os.path.join(ROOT, "tests", "data", f"train-v1-{name}.yaml")))
    data["teacher"]["checkpoint"] = os.path.join(ROOT, data["teacher"]["checkpoint"])
    return data


def test_a_train_yaml_from_before_methods_owned_their_sections_loads_unchanged():
    kd = from_dict(TrainJob, _train_v1("kd"))
    assert kd.settings == RegressionConfig(distance="pseudo_huber")
    dmd = from_dict(TrainJob, _train_v1("dmd"))
    assert (dmd.settings.distance, dmd.settings.fake_updates) == ("pseudo_huber", 2)
    # written again in today's layout: the method's section only, read back as the same job
    again = to_dict(dmd)
    assert again["dmd"]["distance"] == "pseudo_huber"
    assert not {"halving", "kd", "distance", "lpips", "settings"} & again.keys()
    assert from_dict(TrainJob, again) == dmd


def test_another_methods_section_is_checked_and_left_out():
    """A config switched to another method on the command line keeps its old section: checked
    as that method reads it, then left out of the job."""
    guided = to_dict(from_dict(TrainJob, {**_train_v1("kd"), "method": "guided",
                                          "halving": {"start_steps": 8}}))
    assert not {"halving", "kd", "dmd", "distance", "lpips"} & guided.keys()
    for change, message in [({"halving": {"start_steps": 12}}, "halving.start_steps: must be a "
                                                               "power of two"),
                            ({"kd": {"distance": "mse"}}, "distance: is also given as kd.distance"),
                            ({"settings": {}}, "settings: unknown key"),
                            ({"kdd": {}}, r"kdd: unknown key \(expected one of \[.*'kd',")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(TrainJob, {**_train_v1("kd"), **change})


def test_each_method_reads_its_own_section():
    with planned_outputs(["teacher"]):
        for method, section, settings in [("progressive", "halving", HalvingConfig),
                                          ("kd", "kd", RegressionConfig),
                                          ("dmd", "dmd", DMDConfig), ("guided", None, None)]:
            job = load(TrainJob, None, [f"method={method}", "teacher.checkpoint=teacher"])
            assert type(job.settings) is type(settings()) if settings else job.settings is None
            assert to_dict(job).get(section) == (to_dict(settings()) if settings else None)
            assert from_dict(TrainJob, to_dict(job)) == job
        job = load(TrainJob, None, ["method=progressive", "teacher.checkpoint=teacher",
                                    "halving.start_steps=16"])
        assert job.settings.start_steps == 16
