"""memory.lora: adapters on the trained UNets, the teacher's weights frozen under them; the student
a run writes has them merged in, and exports as a diffusers LoRA too."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from raydistill.cli import main
from raydistill.config import LoraConfig, ModelConfig, TrainJob, UNetConfig, load, to_dict
from raydistill.models import build_network, load_checkpoint, save_checkpoint
from raydistill.models.lora import ADAPTER_FILE, add_adapters, merged
from raydistill.train.build import prepare
from raydistill.train.driver import setup_worker
from raydistill.train.engine import full_state_dict, gathered
from raydistill.train.loop import WorkerContext, run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"
UNET = ModelConfig(kind="unet", unet=UNetConfig(
    in_channels=1, resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
    attention_resolutions=[4], num_classes=10))


@pytest.fixture(scope="module")
def local_ray():
    """The Ray instance the GAN head's real digits are read with, shut down after this module."""
    import ray

    from raydistill.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def random_network(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A network with every weight drawn (a fresh UNet's zero-initialised layers would hide a
    merge that drops them)."""
    network = build_network(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return network


def outputs(network: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    z, t = torch.randn(6, 1, 8, 8, generator=generator), torch.rand(6, generator=generator)
    with torch.no_grad():
        return network.eval()(z, t, {"c": torch.arange(6)})


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_the_merged_network_computes_what_the_network_with_adapters_does(alpha):
    """W + (alpha / rank) B A in place of each adapted layer: the plain network with merged
    weights gives the adapted network's output (and a merge at another scale does not)."""
    lora = LoraConfig(rank=4, alpha=alpha)
    network = random_network(UNET)
    add_adapters(network, "student", lora, "unet")
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    plain = build_network(UNET)
    plain.load_state_dict(merged(UNET, lora, network.state_dict()))
    torch.testing.assert_close(outputs(plain), outputs(network), rtol=1e-5, atol=1e-6)
    plain.load_state_dict(merged(UNET, LoraConfig(rank=4, alpha=2.0), network.state_dict()))
    assert not torch.allclose(outputs(plain), outputs(network), atol=1e-4)


def lora_job(tmp_path, overrides=()) -> TrainJob:
    """DMD2 (GAN head included) of a built-in-UNet teacher on the 8x8 digits, one worker."""
    teacher = str(tmp_path / "teacher")
    save_checkpoint(teacher, random_network(UNET), UNET)
    return load(TrainJob, ANALYTIC_DMD, [
        "teacher.analytic=null", f"teacher.checkpoint={teacher}", "student=null",
        "data={source: digits, resolution: 8}", "dmd.gan_weight=0.01", "dmd.gan_head_weight=0.01",
        "dmd.gan_head=conv", "workers.num=1", "optim.steps=3", "optim.batch_size=8",
        "checkpoint_every=3", *overrides])


def train(job: TrainJob, tmp_path, probe=outputs):
    """Train `job` in this process: its networks' full states and trained parameters' names, the
    generator's outputs (`probe`), the first logged metrics and the written student."""
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    logged, student = [], str(tmp_path / f"student-{job.memory.lora.rank}")
    networks = setup.method.modules()
    trained = {name: {key for key, p in network.named_parameters() if p.requires_grad}
               for name, network in networks.items()}

    def report(metrics: dict, directory: str) -> None:
        if os.path.isdir(os.path.join(directory, "student")):
            os.replace(os.path.join(directory, "student"), student)

    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, report, logged=logged.append),
               plan.student_config, setup.teacher)
    with gathered(networks["generator"]):
        generated = probe(networks["generator"]) if probe else None
    return ({name: full_state_dict(network) for name, network in networks.items()}, trained,
            generated, logged[0], student)


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_trains_the_adapters_and_writes_the_student_with_them_merged(
        local_ray, single_process_group, tmp_path, stage):
    """With memory.lora the generator's and the fake score's UNet weights stay the teacher's (the
    GAN head trains in full), the adapters move, the optimizer holds a fraction of the state, and
    the written student is the generator with its adapters merged, the adapters kept beside it."""
    job = lora_job(tmp_path, [f"deepspeed.zero_stage={stage}", "memory.lora.rank=4"])
    full = lora_job(tmp_path, [f"deepspeed.zero_stage={stage}"])
    teacher = load_checkpoint(job.teacher.checkpoint).network
    states, trained, generated, metrics, written = train(job, tmp_path)
    *_, full_metrics, _ = train(full, tmp_path)

    for name, state in states.items():
        frozen = {key.replace(".base_layer.", ".").removeprefix("net."): value
                  for key, value in state.items()
                  if ".lora_" not in key and not key.startswith("head.")}
        assert frozen.keys() == teacher.state_dict().keys()
        for key, value in frozen.items():
            assert torch.equal(value, teacher.state_dict()[key]), f"{name}.{key} moved"
        assert any(".lora_B." in key and value.abs().max() > 0 for key, value in state.items())
        assert all(".lora_" in key or key.startswith("head.") for key in trained[name])
        assert metrics[f"bytes/{name}"] < 0.7 * full_metrics[f"bytes/{name}"]
    assert any(key.startswith("head.") for key in trained["fake_score"])

    student = load_checkpoint(written)
    assert student.extra["lora"]["rank"] == 4 and student.extra["lora"]["alpha"] == 4
    torch.testing.assert_close(outputs(student.network), generated, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs(student.network), outputs(teacher), atol=1e-5)
    kept = load_file(os.path.join(written, ADAPTER_FILE))
    assert kept.keys() == {key for key in states["generator"] if ".lora_" in key}


@pytest.mark.parametrize("overrides,message", [
    (["memory.lora.rank=4", "optim.ema_decay=0.99"],
     "optim.ema_decay: must be 0 with memory.lora"),
    (["memory.lora.rank=4", "memory.lora.modules=[student]"],
     "memory.lora.modules: student is not a module of method dmd"),
    (["memory.lora.rank=4", "memory.lora.targets=[no_such_layer]"],
     "memory.lora.targets: Target modules {'no_such_layer'} not found in the base model"),
    (["memory.lora.rank=4", "memory.lora.alpha=0"], "memory.lora.alpha: must be positive"),
    (["memory.lora.rank=4", "teacher.checkpoint=null",
      "teacher.analytic={num_classes: 3, components_per_class: 2, dim: 2, seed: 3}",
      "student={kind: mlp, mlp: {dim: 2, width: 64, depth: 2, num_classes: 3}}"],
     "memory.lora: the student is a mlp network; adapters go on the built-in UNet and diffusers "
     "UNets"),
])
def test_bad_lora_configs_are_one_line_before_workers_start(cli_stderr, tmp_path, overrides,
                                                            message):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(to_dict(lora_job(tmp_path))))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 *overrides]) == 2
    err = cli_stderr()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_lora_generator_of_a_text_teacher_exports_as_a_diffusers_lora(single_process_group,
                                                                        tmp_path):
    """A DMD generator trained with adapters on a UNet2DConditionModel teacher, written by the
    training loop and exported: diffusers' own loader puts lora/ on the teacher's UNet and gives
    the exported (merged) UNet's output; the teacher's UNet alone does not."""
    import diffusers
    import numpy as np
    from diffusers_models import TOKENS, WIDTH, scheduler, tiny_unet, write_model, write_null_embedding

    teacher_dir = write_model(tmp_path / "teacher", tiny_unet(text=True), scheduler())
    write_null_embedding(str(tmp_path / "null.npy"))
    prompts = tmp_path / "prompts.npy"
    np.save(prompts, np.random.default_rng(0).standard_normal((4, TOKENS, WIDTH), np.float32))
    job = load(TrainJob, ANALYTIC_DMD, [
        "teacher.analytic=null", f"teacher.prompts={prompts}", "student=null",
        f"teacher.diffusers={{path: {teacher_dir}, null_embedding: {tmp_path / 'null.npy'}}}",
        "guidance={w_min: 1.0, w_max: 1.0}", "data.source=digits", "workers.num=1",
        "optim.steps=3", "optim.batch_size=4", "checkpoint_every=3", "memory.lora.rank=2",
        "memory.lora.alpha=4"])
    *_, written = train(job, tmp_path, probe=None)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", written, "--format", "diffusers", "--out",
                 str(out)]) == 0
    assert json.loads((out / "raydistill.json").read_text())["lora"] == \
        "lora/pytorch_lora_weights.safetensors"

    merged_unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    with_lora = diffusers.UNet2DConditionModel.from_pretrained(teacher_dir).eval()
    with_lora.load_lora_adapter(str(out / "lora"), prefix="unet",
                                weight_name="pytorch_lora_weights.safetensors")
    teacher = diffusers.UNet2DConditionModel.from_pretrained(teacher_dir).eval()
    generator = torch.Generator().manual_seed(2)
    z, text = torch.randn(3, 1, 8, 8, generator=generator), torch.randn(3, TOKENS, WIDTH,
                                                                          generator=generator)
    t = torch.tensor([999, 500, 20])
    with torch.no_grad():
        ours, theirs, plain = (unet(z, t, encoder_hidden_states=text).sample
                               for unet in (merged_unet, with_lora, teacher))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, ours, atol=1e-4)


def test_a_restored_lora_run_continues_exactly(local_ray, single_process_group, tmp_path):
    """Restored from its step-2 checkpoint (the engines' adapters and their optimizer state), a
    LoRA run logs the same losses at steps 3-4 and writes the same merged student."""
    from resume_harness import run_and_resume

    job = lora_job(tmp_path, ["memory.lora.rank=4", "optim.steps=4", "checkpoint_every=2",
                              "log_every=1"])
    run = run_and_resume(job, prepare(job), str(tmp_path), at=2,
                         losses=lambda m: {k: v for k, v in m.items() if "loss" in k})
    assert run.resumed_losses == {step: run.losses[step] for step in (3, 4)}
    student = load_file(os.path.join(run.checkpoints[4], "student", "model.safetensors"))
    again = load_file(os.path.join(run.resumed, "student", "model.safetensors"))
    assert again.keys() == student.keys()
    assert all(torch.equal(again[name], value) for name, value in student.items())
