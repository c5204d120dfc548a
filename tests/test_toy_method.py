"""A method needs no edit outside its own module: tests/toy_method.py registers one, with a
config section of its own (`baking:`), with a single call, and `raydistill train` on local Ray
trains it, checkpoints, stops at `until`, resumes to the end, and `raydistill sample` samples its
student."""

import json
import os

import numpy as np
import pytest
import ray
import torch
import yaml

from raydistill.cli import main
from raydistill.config import DataConfig
from raydistill.data import load_images
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.methods.registry import METHODS, register
from raydistill.models import load_checkpoint
from raydistill.models.denoiser import denoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from raydistill.cluster import init_ray

    init_ray(num_cpus=3)
    yield
    ray.shutdown()


@pytest.fixture
def toy_method():
    """The toy's module, registered by importing it, and unregistered after the test, so that no
    other test sees a fifth method."""
    import toy_method

    register(toy_method.SPEC)        # again after an earlier test removed it (the same spec)
    yield toy_method
    del METHODS[toy_method.SPEC.name]


def guided_error(model, teacher, x, c, w: float) -> float:
    """Mean squared distance of `model`'s x_hat (fed c, and w if it takes it) from the teacher's
    classifier-free-guided x_hat at w, over x noised at fixed t and noise."""
    g = torch.Generator().manual_seed(0)
    t = 0.05 + 0.9 * torch.rand(len(x), generator=g)
    schedule = teacher.denoiser.schedule
    alpha, sigma = (broadcast_like(v, x) for v in schedule.alpha_sigma(t))
    z_t = alpha * x + sigma * torch.randn(x.shape, generator=g)
    cond = teacher.conditioning.conditions.cond(c, torch.full(c.shape, w))
    with torch.no_grad():
        target = teacher.w_denoiser(z_t, t, cond)
        out = denoise(model.network, schedule, model.config.prediction, z_t, t, cond)
    return float((out - target).pow(2).mean())


def test_a_method_registered_outside_raydistill_trains_resumes_and_samples(toy_method, tmp_path):
    ray.cloudpickle.register_pickle_by_value(toy_method)     # workers cannot import tests/
    teacher_dir, out = str(tmp_path / "teacher"), str(tmp_path / "run")
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "method": "toy-baking",
        "teacher": {"checkpoint": teacher_dir, "build": f"{ROOT}/configs/smoke/teacher.yaml"},
        "data": {"source": "digits", "resolution": 16},
        "baking": {"w": 2.0},
        "optim": {"steps": 40, "batch_size": 32, "lr": 2.0e-3, "warmup_steps": 0,
                  "ema_decay": 0.0},
        "workers": {"num": 2}, "deepspeed": {"zero_stage": 2},
        "checkpoint_every": 20, "log_every": 10}))
    assert main(["train", "--config", str(config), "--out", out, "until=20"]) == 0
    assert yaml.safe_load(open(os.path.join(out, "train.yaml")))["baking"] == {"w": 2.0}
    first = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [row["step"] for row in first] == [10, 20]
    assert main(["train", "--config", str(config), "--out", out, "--resume"]) == 0
    logged = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [row["step"] for row in logged] == [10, 20, 30, 40]
    assert [row["resumes"] for row in logged] == [0, 0, 1, 1]

    student = load_checkpoint(os.path.join(out, "student"))
    assert (student.extra["method"], student.extra["train_steps"]) == ("toy-baking", 40)
    assert student.sampling.built_in_w == 2.0
    # It learned its method's target: the teacher's guided x_hat at w = 2, which the teacher's
    # own conditional x_hat (where the student started) misses.
    teacher = load_checkpoint(teacher_dir)
    images = load_images(DataConfig(source="digits", resolution=16)).train
    x, c = images.images[:256], images.labels[:256]
    start = guided_error(teacher, teacher, x, c, 2.0)
    assert guided_error(student, teacher, x, c, 2.0) < 0.5 * start

    samples = str(tmp_path / "samples.npz")
    assert main(["sample", "--checkpoint", os.path.join(out, "student"), "--steps", "4",
                 "--per-class", "2", "--out", samples]) == 0
    arrays = np.load(samples)
    assert arrays["arr_0"].shape == (20, 16, 16, 1) and arrays["arr_0"].std() > 0
