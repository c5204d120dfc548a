"""The real-scale configs (configs/sd15/): they validate at their real values, and `train --dry-run`
builds everything and runs one step of each on a tiny random Stable-Diffusion-family model (a
UNet2DConditionModel with cross-attention, an AutoencoderKL, SD-1.5's scheduler), in bf16 and at
the configured ZeRO stage, in local Ray."""

import json
import math
import os

import pytest
import ray
import yaml
from diffusers_models import CLASSES, scheduler, tiny_unet, write_model
from safetensors.torch import load_file

from raydistill.cli import main
from raydistill.config import TrainJob, load
from raydistill.dryrun import (
    FULL_PROMPTS,
    FULL_TOKENS,
    SD15_SCHEDULER,
    _family,
    _write_teacher,
    dry_run_job,
)
from raydistill.models import load_checkpoint
from raydistill.models.checkpoint import load_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(ROOT, "configs", "sd15", f"{name}.yaml")
           for name in ("guided", "progressive", "dmd")}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", CONFIGS)
def test_an_sd15_config_validates_at_its_real_values(name, tmp_path):
    """Every key but the /shared files is checked as written: with stand-ins for the files the job
    loads; without them the first missing one is named."""
    for directory in ("model", "laion"):
        (tmp_path / directory).mkdir()
    for file in ("null.safetensors", "prompts.safetensors"):
        (tmp_path / file).touch()
    stand_ins = [f"teacher.diffusers.path={tmp_path / 'model'}",
                 f"teacher.diffusers.null_embedding={tmp_path / 'null.safetensors'}",
                 f"teacher.prompts={tmp_path / 'prompts.safetensors'}",
                 f"data.path={tmp_path / 'laion'}"]
    job = load(TrainJob, CONFIGS[name], stand_ins)
    assert job.method == name
    assert job.deepspeed.precision == "bf16" and job.deepspeed.zero_stage in (2, 3)
    assert job.workers.gpus == 1 and job.workers.num >= 8
    assert (job.data.resolution, job.data.channels) == (512, 3)
    with open(CONFIGS[name]) as f:
        assert yaml.safe_load(f)["teacher"]["diffusers"]["path"].startswith("/shared/")
    with pytest.raises(Exception, match="^teacher.diffusers.path: no such directory: /shared/"):
        load(TrainJob, CONFIGS[name])


@pytest.mark.parametrize("name, overrides", [
    pytest.param("guided", [], marks=pytest.mark.slow),
    pytest.param("progressive", [], marks=pytest.mark.slow),
    ("dmd", []), ("dmd", ["memory.lora.rank=8"])])
# the suite runs the two-engine one, as it is and with LoRA adapters in bf16 (20-35 s each);
# test-all runs them all
def test_dry_run_trains_one_step_of_an_sd15_config(local_ray, name, overrides, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["train", "--config", CONFIGS[name], "--out", str(out), "--dry-run",
                 "--quiet", *overrides]) == 0
    said = capsys.readouterr().out
    assert "dry run: a tiny random UNet2DConditionModel + AutoencoderKL" in said
    assert "Stable Diffusion 1.5's configs (/shared/models/stable-diffusion-v1-5 is not on this " \
           "machine)" in said
    with open(out / "run" / "train.yaml") as f:
        ran = yaml.safe_load(f)
    with open(CONFIGS[name]) as f:
        written = yaml.safe_load(f)
    # what the dry run keeps as configured, and what it shrinks
    assert ran["deepspeed"] == {**TrainJob().deepspeed.__dict__, **written["deepspeed"]}
    assert ran["method"] == name and ran["guidance"] == written["guidance"]
    assert ran["workers"]["num"] == 1 and ran["optim"]["steps"] == 1
    with open(out / "run" / "train_log.jsonl") as f:
        steps = [json.loads(line) for line in f]
    assert steps and all(math.isfinite(step["loss"]) for step in steps)
    student = load_checkpoint(str(out / "run" / "student"))
    unet = student.config.diffusers
    assert unet.model_class == "UNet2DConditionModel" and unet.text_length > 0
    assert unet.unet["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert student.config.prediction == "eps"          # SD's eps UNet, started from its weights
    assert student.conditioning.autoencoder_path == str(out / "teacher" / "vae")
    assert student.extra.get("lora", {}).get("rank") == (8 if overrides else None)
    grid = out / "grid.png"
    assert main(["sample", "--checkpoint", str(out / "run" / "student"), "--out", str(grid),
                 "--per-class", "1"]) == 0
    assert "4 samples" in capsys.readouterr().out and grid.stat().st_size > 0


def test_a_dry_run_shrinks_the_teachers_own_family_when_its_directory_is_here(tmp_path):
    """A class-conditional pixel UNet2DModel directory gives a tiny UNet2DModel with its block
    types, class embeddings and scheduler, and no autoencoder."""
    model = write_model(str(tmp_path / "model"), tiny_unet(), scheduler("v_prediction"),
                        pipeline=True)
    family = _family(model)
    assert family[1] is None
    written = _write_teacher(str(tmp_path / "tiny"), *family)
    teacher = load_teacher(load(TrainJob, None, [f"teacher.diffusers.path={tmp_path / 'tiny'}"]
                                ).teacher)
    assert teacher.config.diffusers.model_class == "UNet2DModel"
    assert teacher.conditioning.num_classes == CLASSES and teacher.config.prediction == "v"
    assert teacher.config.diffusers.unet["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert teacher.conditioning.autoencoder_path == "" and written["channels"] == 1


def test_a_full_size_random_teacher_keeps_its_familys_configs(tmp_path):
    """What benchmarks/gpu_scale.py writes: the family's own widths and depths (not shrunk), and a
    text model's empty prompt and prompt table at CLIP's 77 tokens."""
    unet = {**tiny_unet(text=True).config, "_class_name": "UNet2DConditionModel",
            "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 16}
    written = _write_teacher(str(tmp_path / "full"), unet, None, SD15_SCHEDULER, full_size=True)
    saved = json.load(open(tmp_path / "full" / "unet" / "config.json"))
    assert saved["block_out_channels"] == list(unet["block_out_channels"])
    assert saved["layers_per_block"] == unet["layers_per_block"]
    assert written["resolution"] == unet["sample_size"]
    table = load_file(written["prompts"])["encoder_hidden_states"]
    assert tuple(table.shape) == (FULL_PROMPTS, FULL_TOKENS, unet["cross_attention_dim"])
    tiny = _write_teacher(str(tmp_path / "tiny"), unet, None, SD15_SCHEDULER)
    shrunk = json.load(open(tmp_path / "tiny" / "unet" / "config.json"))
    assert (shrunk["block_out_channels"], tiny["resolution"]) == ([16, 32], 8)   # the dry run's


def test_a_dry_run_needs_a_diffusers_teacher_and_a_new_out(tmp_path, cli_stderr):
    digits = os.path.join(ROOT, "configs", "digits", "dmd2.yaml")
    assert main(["train", "--config", digits, "--out", str(tmp_path / "a"), "--dry-run"]) == 2
    err = cli_stderr()
    assert err.endswith("teacher.diffusers: --dry-run swaps a diffusers teacher for a tiny one "
                        "of its family; this job has none") and len(err.splitlines()) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").touch()
    assert main(["train", "--config", CONFIGS["dmd"], "--out", str(tmp_path / "b"),
                 "--dry-run"]) == 2
    assert "is not empty; a dry run needs a new --out" in cli_stderr()
    with pytest.raises(Exception, match="^student: --dry-run builds its own tiny teacher"):
        dry_run_job({"teacher": {"diffusers": {"path": "/x"}}, "student": {"kind": "unet"}},
                    str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
