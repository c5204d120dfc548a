"""A diffusers teacher through the whole path on a local Ray: pairs, a stage-1 (guided) student
and a DMD generator trained from those pairs, each loadable and sampled, from a pipeline
directory the test writes: a tiny class-conditional UNet2DModel, and a tiny text-conditioned
UNet2DConditionModel with a prompt table of CLASSES precomputed embeddings (random weights)."""

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import ray
import torch
import yaml
from diffusers_models import TOKENS, WIDTH, diffusers_ddim, scheduler, write_model
from safetensors.torch import save_file

from raydistill.cli import main
from raydistill.config import TeacherRef, from_dict
from raydistill.models import load_checkpoint
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.reader import PairReader

CLASSES = 10                  # the digits' classes (prompts), so stage 1 trains on the digits


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@dataclass
class Teacher:
    ref: dict                        # the config's `teacher` section
    unet: torch.nn.Module
    sched: object
    prompts: torch.Tensor | None     # a text teacher's prompt table [CLASSES, TOKENS, WIDTH]
    null: torch.Tensor | None        # and its empty prompt [TOKENS, WIDTH]

    def load(self):
        return load_teacher(from_dict(TeacherRef, self.ref))


@pytest.fixture(scope="module", params=["class", "text"])
def teacher(request, tmp_path_factory):
    """A v-prediction teacher (a student predicts v and starts from its weights) on 1x16x16:
    class-conditional, or text-conditioned with a table of CLASSES prompts."""
    import diffusers

    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    common = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                  layers_per_block=1, norm_num_groups=8)
    sched = scheduler("v_prediction")
    if request.param == "class":
        unet = diffusers.UNet2DModel(**common, num_class_embeds=CLASSES + 1,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
        path = write_model(str(directory / "model"), unet, sched, pipeline=True)
        return Teacher({"diffusers": {"path": path}}, unet, sched, None, None)
    unet = diffusers.UNet2DConditionModel(
        **common, cross_attention_dim=WIDTH, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    path = write_model(str(directory / "model"), unet, sched, pipeline=True)
    g = torch.Generator().manual_seed(1)
    prompts, null = torch.randn(CLASSES, TOKENS, WIDTH, generator=g), torch.randn(TOKENS, WIDTH,
                                                                               generator=g)
    save_file({"encoder_hidden_states": prompts}, str(directory / "prompts.safetensors"))
    save_file({"encoder_hidden_states": null[None]}, str(directory / "empty.safetensors"))
    ref = {"diffusers": {"path": path, "null_embedding": str(directory / "empty.safetensors")},
           "prompts": str(directory / "prompts.safetensors")}
    return Teacher(ref, unet, sched, prompts, null)


def write_config(path, **config) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def pairs(teacher, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pairs")
    config = write_config(directory / "pairs.yaml", mode="ode",
                          teacher=teacher.ref, solver={"solver": "ddim", "steps": 4},
                          guidance={"w_min": 1.0, "w_max": 1.0}, num_shards=2,
                          samples_per_shard=8, batch_size=8, workers={"min": 1, "max": 2})
    out = str(directory / "pairs")
    assert main(["pairs", "--config", config, "--out", out, "--quiet"]) == 0
    return out


def test_pairs_are_diffusers_guided_ddim_from_their_noise(teacher, pairs):
    """Each pair's image is diffusers' own 4-step DDIM under CFG at guidance scale 2 (w = 1) from
    the pair's noise and condition: the class label, or the prompt embedding the sample stores,
    which is row c of the prompt table (the empty prompt in the null branch). The pair set
    records the teacher's fingerprint (and the prompt table's digest)."""
    samples = list(PairReader(pairs))
    assert len(samples) == 16
    noise = torch.from_numpy(np.stack([s["noise"] for s in samples]))
    labels = torch.tensor([int(s["c"]) for s in samples])
    image = torch.from_numpy(np.stack([s["image"] for s in samples]))
    if teacher.prompts is None:
        inputs = dict(class_labels=labels, null_class_labels=torch.full_like(labels, CLASSES))
        assert "encoder_hidden_states" not in samples[0]
    else:
        stored = torch.stack([s["encoder_hidden_states"] for s in samples])
        assert torch.equal(stored, teacher.prompts[labels])
        assert len(set(labels.tolist())) > 1               # prompts drawn per sample
        inputs = dict(encoder_hidden_states=stored,
                      null_encoder_hidden_states=teacher.null.expand_as(stored))
    theirs = diffusers_ddim(teacher.unet, teacher.sched, noise, 4, guidance_scale=2.0, **inputs)
    assert float((image - theirs).norm() / theirs.norm()) <= 1e-4
    loaded = teacher.load()
    run = json.load(open(os.path.join(pairs, "pairs.json")))["identity"]
    assert run["teacher_fingerprint"] == loaded.fingerprint
    if teacher.prompts is not None:
        assert run["prompts"] == {"sha256": loaded.conditioning.conditions.prompts.digest(), "count": CLASSES}


TRAIN = dict(optim={"steps": 4, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": 1,
                    "ema_decay": 0.0},
             workers={"num": 1}, deepspeed={"zero_stage": 2}, checkpoint_every=2, log_every=2)


@pytest.mark.parametrize("method", ["guided", "dmd"])
def test_students_of_a_diffusers_teacher_train_and_sample(teacher, pairs, tmp_path, method):
    """Stage 1 on the digits (a w-conditioned diffusers student, w through its time-embedding
    projection) and DMD with the regression loss on the pairs: each student is a diffusers network
    that starts from the teacher's weights, moves off them, and samples."""
    options = {"guided": dict(data={"source": "digits", "resolution": 16},
                              guidance={"w_min": 0.0, "w_max": 4.0}),
               "dmd": dict(pairs=pairs, guidance={"w_min": 1.0, "w_max": 1.0},
                           dmd={"regression_weight": 0.25, "fake_updates": 2})}[method]
    config = write_config(tmp_path / "train.yaml", method=method, teacher=teacher.ref, **options,
                          **TRAIN)
    out = str(tmp_path / "run")
    assert main(["train", "--config", config, "--out", out, "--quiet"]) == 0
    student = load_checkpoint(os.path.join(out, "student"))
    source = teacher.load()
    assert student.config.kind == "diffusers"
    assert student.config.diffusers.unet == source.config.diffusers.unet
    assert student.extra["teacher_fingerprint"] == source.fingerprint
    assert student.config.diffusers.w_embedding == (method == "guided")
    weights, start = student.network.state_dict(), source.network.state_dict()
    moved = max(float((weights[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 0.1                       # started from the teacher, then trained
    if method == "guided":
        w_input = (student.network.unet.time_embedding.cond_proj if teacher.prompts is not None
                   else student.network.w_proj)
        assert float(w_input.weight.detach().abs().max()) > 0     # w reached the network
    if teacher.prompts is not None:                 # sampled with the prompts it distilled
        assert student.extra["prompts"] == teacher.ref["prompts"]
        assert student.conditioning.num_classes == CLASSES
    grid = str(tmp_path / "grid.npz")
    steps = student.sampling.distilled_sampler.steps if student.sampling.distilled_sampler else 2
    assert main(["sample", "--checkpoint", os.path.join(out, "student"), "--steps", str(steps),
                 "--out", grid]) == 0
    images, labels = np.load(grid)["arr_0"], np.load(grid)["arr_1"]
    assert images.shape[1:] == (16, 16, 1) and len(labels) == len(images)
    assert sorted(set(labels.tolist())) == list(range(CLASSES))
