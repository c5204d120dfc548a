"""A latent teacher: a diffusers pipeline directory with unet/, vae/ (a tiny AutoencoderKL with
random weights, 1x16x16 digits <-> 4x8x8 latents, scaling_factor 0.5) and scheduler/. Real images
are encoded for stage-1 targets (in the pair workers and in the training stream), pair shards and
students work in latents, and samples are decoded for `raydistill sample` and evaluation."""

import json
import os

import diffusers
import numpy as np
import pytest
import ray
import torch
import yaml
from diffusers_models import scheduler, write_model

from raydistill.cli import main
from raydistill.config import ConfigError, PairsJob, TeacherRef, from_dict
from raydistill.data import load_images
from raydistill.models import load_checkpoint
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.generate import ShardMaker
from raydistill.pairs.manifest import read_run
from raydistill.pairs.reader import PairReader
from raydistill.sampling import grid_png
from raydistill.storage import Location

CLASSES, SCALE = 10, 0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vae(seed: int) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=SCALE).eval()


def write_pipeline(directory, vae_seed: int = 0) -> str:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 norm_num_groups=8, num_class_embeds=CLASSES + 1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    write_model(str(directory), unet, scheduler("v_prediction"), pipeline=True)
    tiny_vae(vae_seed).save_pretrained(os.path.join(directory, "vae"))
    return str(directory)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("latent") / "model")


def teacher_ref(path: str, **options) -> dict:
    return {"diffusers": {"path": path, **options}}


def test_a_latent_teacher_is_its_unet_and_its_autoencoder(pipeline, tmp_path):
    """The pipeline's vae/ is found: samples are 4x8x8 latents of 1x16x16 images; encode and decode
    are diffusers' own with the scaling factor; the VAE is part of the teacher's fingerprint; a
    named vae directory that holds none is refused by key."""
    teacher = load_teacher(from_dict(TeacherRef, teacher_ref(pipeline)))
    assert teacher.data_shape == (4, 8, 8) and teacher.conditioning.image_shape == (1, 16, 16)
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(pipeline, "vae"))
    images = load_images(from_dict(PairsJob, {"data": {"resolution": 16}}).data).train.images[:6]
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * SCALE
        decoded = vae.decode(latents / SCALE).sample
    torch.testing.assert_close(teacher.conditioning.autoencoder.encode(images), latents)
    torch.testing.assert_close(teacher.conditioning.images(latents), decoded)
    other = load_teacher(from_dict(TeacherRef, teacher_ref(
        write_pipeline(tmp_path / "other", vae_seed=1))))
    assert other.fingerprint != teacher.fingerprint            # same UNet, another VAE
    with pytest.raises(ConfigError, match="teacher.diffusers.vae: .*config.json is missing"):
        load_teacher(from_dict(TeacherRef, teacher_ref(pipeline, vae=str(tmp_path))))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def write_config(path, **config) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def test_stage1_pairs_hold_targets_at_encoded_images(local_ray, pipeline, tmp_path):
    """Guided (stage-1) pairs from the digits: each z_t is alpha_t E(x) + sigma_t eps for the
    sample's own image x and noise, E being diffusers' encoder (so the shards hold latents)."""
    pairs = dict(mode="guided", teacher=teacher_ref(pipeline),
                 data={"source": "digits", "resolution": 16},
                 guidance={"w_min": 0.0, "w_max": 2.0}, num_shards=1, samples_per_shard=8,
                 batch_size=8, workers={"min": 1, "max": 1})
    out = str(tmp_path / "pairs")
    assert main(["pairs", "--config", write_config(tmp_path / "pairs.yaml", **pairs), "--out",
                 out, "--quiet"]) == 0
    samples = list(PairReader(out))
    z_t = torch.stack([s["z_t"] for s in samples])
    assert z_t.shape == (8, 4, 8, 8)
    job = from_dict(PairsJob, pairs)
    teacher = load_teacher(job.teacher)
    inputs = ShardMaker(job, teacher).inputs(0)
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(pipeline, "vae"))
    with torch.no_grad():
        x = vae.encode(inputs["x"]).latent_dist.mean * SCALE
    alpha, sigma = (v[:, None, None, None] for v in teacher.denoiser.schedule.alpha_sigma(
        inputs["t"]))
    torch.testing.assert_close(z_t, alpha * x + sigma * inputs["eps"], rtol=0, atol=1e-5)


TRAIN = dict(optim={"steps": 4, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": 1,
                    "ema_decay": 0.0},
             workers={"num": 1}, deepspeed={"zero_stage": 2}, checkpoint_every=2, log_every=2,
             data={"source": "digits", "resolution": 16})


@pytest.fixture(scope="module")
def distilled(local_ray, pipeline, tmp_path_factory):
    """`raydistill run` distilling the latent teacher where it lies (teacher.pretrained): a
    stage-1 student (targets at encoded digits, inline), a KD generator on ODE pairs the run makes
    (latents) and a DMD2 generator whose GAN head sees encoded digits, scored in the feature
    space of a classifier given as eval.features (so the run trains none). Returns the run's
    directory and its config."""
    directory = tmp_path_factory.mktemp("run")
    classifier = str(directory / "classifier")
    assert main(["classifier", "--config", f"{ROOT}/configs/smoke/classifier.yaml", "--out",
                 classifier, "--quiet"]) == 0
    options = {"guided": dict(guidance={"w_min": 0.0, "w_max": 2.0}),
               "kd": dict(guidance={"w_min": 1.0, "w_max": 1.0}),
               "dmd": dict(guidance={"w_min": 1.0, "w_max": 1.0},
                           dmd={"regression_weight": 0.0, "gan_weight": 0.01, "gan_head_weight": 0.01,
                                "fake_updates": 2})}
    kd_pairs = {"solver": {"solver": "ddim", "steps": 4}, "num_shards": 1, "samples_per_shard": 16,
                "batch_size": 16, "workers": {"max": 1}}
    config = write_config(
        directory / "pipeline.yaml",
        teacher={"pretrained": teacher_ref(pipeline), "data": {"source": "digits", "resolution": 16}},
        students=[{"name": method, "train": {"method": method, **extra, **TRAIN},
                   **({"pairs": kd_pairs} if method == "kd" else {})}
                  for method, extra in options.items()],
        eval={"teacher_steps": 4, "baseline_steps": [1], "baseline_solvers": ["ddim"], "w": 1.0,
              "num_samples": 40, "samples_per_shard": 20, "kid_subset_size": 20,
              "features": {"kind": "classifier", "path": classifier}})
    out = str(directory / "out")
    assert main(["run", "--config", config, "--out", out, "--quiet"]) == 0
    return out, config


@pytest.fixture(scope="module")
def students(distilled):
    return {method: os.path.join(distilled[0], method) for method in ("guided", "dmd")}


@pytest.mark.parametrize("method", ["guided", "dmd"])
def test_latent_students_record_the_autoencoder_and_sample_images(students, pipeline, tmp_path,
                                                                  method):
    """A student denoises latents, records its teacher's autoencoder, and `raydistill sample`
    writes decoded 16x16 images: the decoder's output of the student's own latent samples."""
    student = load_checkpoint(os.path.join(students[method], "student"))
    assert student.conditioning.autoencoder_path == os.path.join(pipeline, "vae")
    assert student.data_shape == (4, 8, 8) and student.conditioning.image_shape == (1, 16, 16)
    grid = str(tmp_path / "grid.npz")
    steps = student.sampling.distilled_sampler.steps if student.sampling.distilled_sampler else 2
    assert main(["sample", "--checkpoint", os.path.join(students[method], "student"),
                 "--steps", str(steps), "--per-class", "1", "--out", grid]) == 0
    images = np.load(grid)["arr_0"]
    assert images.shape == (CLASSES, 16, 16, 1)


def test_the_pipeline_distils_a_pretrained_teacher_and_reports_decoded_grids(distilled, pipeline,
                                                                             capsys):
    """The run's teacher stage records the pretrained teacher's fingerprint (and holds no copy of
    it); every student and the evaluation take the diffusers teacher pinned to that fingerprint;
    FID is taken on decoded images and the grids show 16x16 images; a second run reuses it all."""
    out, config = distilled
    teacher = load_teacher(from_dict(TeacherRef, teacher_ref(pipeline)))
    record = json.load(open(os.path.join(out, "teacher", "lineage.json")))
    assert record["fingerprint"] == teacher.fingerprint
    assert sorted(os.listdir(os.path.join(out, "teacher"))) == ["lineage.json"]
    with open(os.path.join(out, "guided", "train.yaml")) as f:
        ran = yaml.safe_load(f)["teacher"]
    assert ran["diffusers"]["path"] == pipeline and ran["fingerprint"] == teacher.fingerprint
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert list(metrics["stages"]) == ["teacher", "guided", "kd-pairs", "kd", "dmd", "eval"]
    pairs = read_run(Location.parse(os.path.join(out, "kd-pairs")))["identity"]
    assert pairs["teacher_fingerprint"] == teacher.fingerprint           # no classifier stage
    rows = metrics["eval"]
    assert [row["name"] for row in rows] == ["teacher", "ddim", "guided", "kd", "dmd"]
    assert all(np.isfinite(row["fid"]) for row in rows)
    expected = grid_png(torch.zeros(40, 1, 16, 16), 5)           # 5 rows of 8 16x16 images
    for row in rows:
        grid = open(os.path.join(out, "eval", row["grid"]), "rb").read()
        assert grid[:4] == b"\x89PNG" and _png_size(grid) == _png_size(expected)
    capsys.readouterr()
    assert main(["run", "--config", config, "--out", out, "--quiet"]) == 0
    assert "6 stages done (0 ran, 6 reused)" in capsys.readouterr().out


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
