"""DMD and KD in the training loop: two engines resume exactly (generator, fake score, both data
streams), and a killed worker costs nothing; the method math on the analytic mixture is in
test_dmd_oracle.py."""

import math
import os

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from resume_harness import run_and_resume, train_in_process
from safetensors.torch import load_file

from raydistill.config import ConfigError, TrainJob, load
from raydistill.train.build import prepare
from raydistill.train.driver import setup_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"


def test_a_restored_dmd_run_continues_exactly(single_process_group, tmp_path):
    """Restored from its step-4 checkpoint, a DMD run (ZeRO-2, two fake-score updates per step, the
    GAN head reading real data) logs the same losses of both phases at steps 5-8 and ends with the
    same generator and fake score as the run that never stopped."""
    job = load(TrainJob, ANALYTIC_DMD, ["workers.num=1", "optim.steps=8", "checkpoint_every=4",
                                        "dmd.gan_weight=0.05", "dmd.gan_head_weight=0.1"])
    plan = prepare(job)
    assert sorted(setup_worker(job, plan.student_config, 0, 1).streams) == ["data"]

    def fake_score(directory):
        return get_fp32_state_dict_from_zero_checkpoint(
            os.path.join(directory, "engines", "fake_score"), tag="state")

    run = run_and_resume(job, plan, str(tmp_path), at=4,
                         losses=lambda m: {k: v for k, v in m.items() if "loss" in k})
    assert {"generator/loss_dm", "generator/loss_gan", "fake_score/loss_head"} <= set(
        run.losses[8])
    assert run.resumed_losses == {step: run.losses[step] for step in (5, 6, 7, 8)}
    generator = load_file(os.path.join(run.checkpoints[8], "student", "model.safetensors"))
    again = load_file(os.path.join(run.resumed, "student", "model.safetensors"))
    assert all(torch.equal(again[name], value) for name, value in generator.items())
    fake, again = fake_score(run.checkpoints[8]), fake_score(run.resumed)
    assert again.keys() == fake.keys() and any(name.startswith("head.") for name in fake)
    assert all(torch.equal(again[name], value) for name, value in fake.items())


def test_an_eps_fake_score_learns_with_unit_weight_on_its_own_output(tmp_path):
    """DMD2 trains the fake score with the plain squared error of its own output. For an eps
    teacher's fake score (Stable Diffusion's schedule here) an x-space weighting is not that: SNR
    + 1 is 1 + 1/SNR on eps (214 at t = 1), truncated SNR max(1, 1/SNR). The default
    dmd.fake_weighting, output, gives weight 1 in eps."""
    from diffusers_models import scheduler, tiny_unet, write_model

    from raydistill.diffusion.parameterization import eps_from_x
    from raydistill.train.build import build_method

    teacher = write_model(str(tmp_path / "teacher"), tiny_unet(), scheduler("epsilon"))
    job = load(TrainJob, None, [f"teacher.diffusers.path={teacher}", "method=dmd",
                                "guidance.w_min=1.0", "guidance.w_max=1.0",
                                "dmd.regression_weight=0", "data.source=digits"])
    plan = prepare(job)
    assert plan.student_config.prediction == "eps"
    cpu = torch.device("cpu")
    method = build_method(job, plan.teacher, plan.student_config, cpu)
    method.micro_batch = 16
    method.seed(0, cpu)
    loss = method.fake_score_loss({})["loss"]
    method.seed(0, cpu)                                 # the same draws, by hand
    with torch.no_grad():
        x, cond = method.generate()
        t = method.times(len(x))
        z_t = method.noised(x, t)
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in method.schedule.alpha_sigma(t))
        eps = eps_from_x(z=z_t, x=x, alpha=alpha, sigma=sigma)
        expected = (method.fake_score(z_t, t, cond) - eps).pow(2).mean()
    assert float(method.schedule.logsnr(t).min()) < -1     # draws where the weightings differ
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_dmd_distils_a_w_conditioned_teacher(single_process_group, tmp_path):
    """Meng et al.'s stage-1 student as DMD's teacher (one evaluation per real score instead of
    CFG's two): the generator and the fake score are copies of it that keep its w input, fed the
    job's one w; the generator is then sampled at that w only."""
    from raydistill.config import MLPConfig, ModelConfig
    from raydistill.models import build_network, load_checkpoint, save_checkpoint

    config = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(
        dim=2, width=64, depth=2, num_classes=3, w_embedding=True))
    teacher = str(tmp_path / "teacher")
    torch.manual_seed(0)
    save_checkpoint(teacher, build_network(config), config,
                    extra={"method": "guided", "w_min": 0.0, "w_max": 4.0})
    job = load(TrainJob, ANALYTIC_DMD, ["teacher.analytic=null", f"teacher.checkpoint={teacher}",
                                        "student=null", "workers.num=1", "guidance.w_min=2.0",
                                        "guidance.w_max=2.0", "optim.steps=4",
                                        "checkpoint_every=4"])
    plan = prepare(job)
    assert plan.student_config.w_conditioned
    saved = {}
    train_in_process(job, plan, lambda metrics, directory: saved.update(
        student=load_checkpoint(os.path.join(directory, "student"))) if directory else None)
    student = saved["student"]
    assert student.extra["w_min"] == student.extra["w_max"] == 2.0
    z, c = torch.randn(5, 2), torch.arange(5) % 3
    with torch.no_grad():
        x = student.w_denoiser(z, torch.ones(5), {"c": c, "w": torch.full((5,), 2.0)})
        other = student.w_denoiser(z, torch.ones(5), {"c": c, "w": torch.zeros(5)})
    assert torch.isfinite(x).all() and not torch.allclose(x, other)   # it reads its w
    student.sampling.check_guidance(2.0, 2.0, "w")
    with pytest.raises(ConfigError, match="outside the guidance range"):
        student.sampling.check_guidance(1.0, 1.0, "w")


def test_dmd2s_conv_head_reads_the_bottleneck_map_not_its_mean():
    """dmd.gan_head: conv is DMD2's head: strided 4x4 convolutions with GroupNorm halve the UNet's
    bottleneck map (8x8 for the digits UNet) to 4x4, a 4x4 convolution leaves 1x1, a 1x1
    convolution gives the logit; it sees where features are, which the mlp head, on their mean over
    space, cannot."""
    from torch import nn

    from raydistill.config import ModelConfig, UNetConfig
    from raydistill.methods.dmd import feature_map_size, gan_head

    config = ModelConfig(unet=UNetConfig(resolution=16, base_channels=32, channel_mult=[1, 2]))
    assert feature_map_size(config) == (8, 8)
    conv = gan_head("conv", config)
    kinds = [type(layer) for layer in conv]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.SiLU] * 2 + [nn.Conv2d, nn.Flatten]
    assert [layer.stride for layer in conv if isinstance(layer, nn.Conv2d)] == [(2, 2), (1, 1),
                                                                              (1, 1)]
    features = torch.randn(3, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = features.flip(-1)                       # the same features, elsewhere
    mlp = gan_head("mlp", config)
    with torch.no_grad():
        assert conv(features).shape == (3,)
        torch.testing.assert_close(mlp(features.flatten(2).mean(2)),
                                   mlp(moved.flatten(2).mean(2)))
        assert not torch.allclose(conv(features), conv(moved))


def test_dmd2_trains_with_the_conv_head_on_a_unet(single_process_group, tmp_path):
    """DMD2 steps with the conv head on the smoke teacher's UNet: the head's loss is logged and
    finite. (Its real images are read by Ray tasks: Ray starts for the test and stops after.)"""
    import ray

    from raydistill.config import TeacherJob
    from raydistill.pretrain.teacher import train_teacher

    train_teacher(load(TeacherJob, f"{ROOT}/configs/smoke/teacher.yaml", ["optim.steps=2"]),
                  str(tmp_path / "teacher"), progress=False)
    job = load(TrainJob, f"{ROOT}/configs/smoke/dmd2.yaml", [
        f"teacher.checkpoint={tmp_path / 'teacher'}", "teacher.build=", "workers.num=1",
        "dmd.gan_head=conv", "optim.steps=2", "checkpoint_every=2", "log_every=1",
        "optim.warmup_steps=0", "optim.modules.fake_score.warmup_steps=0"])
    logged = []
    try:
        train_in_process(job, prepare(job), lambda metrics, directory: None,
                         logged=logged.append)
    finally:
        ray.shutdown()
    assert [row["step"] for row in logged] == [1, 2]
    assert all(math.isfinite(row["fake_score/loss_head"]) for row in logged)


@pytest.mark.parametrize("stage", [0, 2])
def test_under_bf16_the_dm_gradient_evaluates_the_fake_score_in_fp32(single_process_group, stage):
    """The fake score trains in bf16, but the DM gradient's x_hat_fake (a difference of two
    predictions that training drives toward each other) is computed in fp32 from its weights, as
    DMD2 computes it; its training forward passes stay bf16."""
    job = load(TrainJob, ANALYTIC_DMD, ["workers.num=1", "optim.steps=2", "checkpoint_every=2",
                                        "optim.warmup_steps=0", "deepspeed.precision=bf16",
                                        f"deepspeed.zero_stage={stage}"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    seen = []
    setup.method.fake_score.network.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    from raydistill.train.loop import WorkerContext, run_worker

    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, lambda metrics, directory: None),
               plan.student_config, setup.teacher)
    # per step: fake_updates (2) training passes with gradients, then one DM evaluation without
    assert seen == [(True, torch.bfloat16)] * 2 + [(False, torch.float32)] + \
        [(True, torch.bfloat16)] * 2 + [(False, torch.float32)]


def test_the_gan_head_has_its_own_learning_rate_and_noise_levels(single_process_group):
    """dmd.gan_head_lr_scale trains the head's parameters at that multiple of the fake score's
    learning rate (an optimizer group of their own); dmd.gan_t_max bounds the noise levels of
    every classified sample, real or generated, while the fake score's denoising keeps U(0, 1]."""
    job = load(TrainJob, ANALYTIC_DMD, [
        "workers.num=1", "optim.steps=2", "checkpoint_every=2", "optim.warmup_steps=0",
        "dmd.gan_weight=0.01", "dmd.gan_head_weight=0.01", "dmd.gan_head_lr_scale=10",
        "dmd.gan_t_max=0.1"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    times = {True: [], False: []}

    def keep(module, args, kwargs, out):
        times[kwargs.get("classify", False)].append(args[1].detach().clone())

    setup.method.fake_score.network.register_forward_hook(keep, with_kwargs=True)
    from raydistill.train.loop import WorkerContext, run_worker

    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, lambda metrics, directory: None),
               plan.student_config, setup.teacher)
    classified, denoised = torch.cat(times[True]), torch.cat(times[False])
    # per step: 2 fake-score updates (generated and real samples classified) and the generator's
    assert len(classified) == 2 * (2 * 2 + 1) * 64 and float(classified.max()) <= 0.1
    assert float(denoised.max()) > 0.5
    net_lr, head_lr = setup.method.fake_score.engine.get_lr()
    assert head_lr == pytest.approx(10 * net_lr) and net_lr > 0
