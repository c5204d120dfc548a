"""Multi-step generators (DMD2's backward simulation): the re-noising sampler, the chain the
training draws its inputs from, and how such a checkpoint is sampled, paired and evaluated. The
method on the analytic mixture is in test_dmd_oracle.py."""

import itertools
import os
import shutil

import pytest
import torch
from resume_harness import train_in_process

from raydistill.cli import main
from raydistill.conditions import Conditions
from raydistill.config import (
    MLPConfig,
    ModelConfig,
    PairsJob,
    TrainJob,
    UNetConfig,
    from_dict,
    load,
)
from raydistill.diffusion import CosineSchedule, renoise_sample, renoise_states, sample
from raydistill.eval.evaluate import network_evaluations
from raydistill.methods.dmd import DistributionMatching, DMDConfig, FakeScore
from raydistill.models import AnalyticTeacher, GaussianMixture, build_network, save_checkpoint
from raydistill.models.checkpoint import as_denoiser, load_checkpoint, load_teacher
from raydistill.pairs.generate import ShardMaker
from raydistill.train.build import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = CosineSchedule()


def counted(denoiser):
    calls = []

    def call(z_t, t, cond):
        calls.append(float(t[0]))
        return denoiser(z_t, t, cond)
    return call, calls


def test_the_renoising_sampler_is_x_hat_then_fresh_noise():
    """N = 1 is the denoiser's x_hat at t = 1 (what one-step generators are trained on; one DDIM
    step to t = 0 differs by sigma_0 eps_hat, sigma_0 > 0 under a clipped log-SNR); N = 3
    evaluates at t = 1, 2/3, 1/3 and re-noises each x_hat to the next time with that step's draw;
    taking k states of the chain costs k - 1 evaluations."""
    mixture = GaussianMixture.random(num_classes=2, components_per_class=2, dim=4, seed=0)
    exact = AnalyticTeacher(mixture, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    cond = {"c": torch.tensor([0, 1, 0, 1, 1])}
    one = renoise_sample(exact, z, cond, SCHEDULE, steps=1, xi=torch.zeros(5, 0, 4))
    torch.testing.assert_close(one, exact(z, torch.ones(5, dtype=torch.float64), cond))
    assert not torch.equal(one, sample(exact, z, cond, SCHEDULE, steps=1))

    xi = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    want = z
    for i, t in enumerate((1.0, 2 / 3)):
        x_hat = exact(want, torch.full((5,), t, dtype=torch.float64), cond)
        alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor(t - 1 / 3, dtype=torch.float64))
        want = alpha * x_hat + sigma * xi[:, i]
    want = exact(want, torch.full((5,), 1 / 3, dtype=torch.float64), cond)
    denoiser, calls = counted(exact)
    torch.testing.assert_close(renoise_sample(denoiser, z, cond, SCHEDULE, steps=3, xi=xi), want)
    assert calls == pytest.approx([1.0, 2 / 3, 1 / 3])
    calls.clear()
    states = list(itertools.islice(renoise_states(denoiser, z, cond, SCHEDULE, steps=3, xi=xi), 2))
    assert [float(t[0]) for t, _ in states] == pytest.approx([1.0, 2 / 3]) and calls == [1.0]


def generator_method(exit_step: str) -> DistributionMatching:
    config = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(dim=4, width=16, depth=2,
                                                                   num_classes=2))
    torch.manual_seed(0)
    generator = build_network(config)
    mixture = GaussianMixture.random(num_classes=2, components_per_class=2, dim=4, seed=0)
    method = DistributionMatching(
        teacher=AnalyticTeacher(mixture, SCHEDULE), generator=generator,
        fake_score=FakeScore(build_network(config), config, head=None), generator_config=config,
        fake_config=config, schedule=SCHEDULE,
        dmd=DMDConfig(regression_weight=0.0, generator_steps=3, exit_step=exit_step), w=0.0,
        conditions=Conditions(2), shape=(4,), weighting="snr_plus_one", distance=None, steps=1)
    method.micro_batch = 64
    return method


def test_backward_simulation_trains_on_the_chain_the_sampler_runs():
    """A 3-step generator's training output is the sampler's: with exit_step last, for the same
    noise and re-noise draws, exactly the checkpoint sampler's sample; with uniform, each sample's
    output is the sampler chain's x_hat at that sample's exit (all three exits occur)."""
    for exit_step in ("last", "uniform"):
        method = generator_method(exit_step)
        denoiser = as_denoiser(method.generator.network, method.generator_config)
        method.seed(7, torch.device("cpu"))
        with torch.no_grad():
            x, cond = method.generate()
        method.seed(7, torch.device("cpu"))
        z, cond_again = method.draw()
        c = cond["c"]
        g = method.rng
        step = (torch.randint(0, 3, (64,), generator=g) if exit_step == "uniform"
                else torch.full((64,), 2))
        xi = torch.randn(64, 2, 4, generator=g)
        assert torch.equal(c, cond_again["c"])
        with torch.no_grad():
            exits = torch.stack([denoiser(z_t, t, {"c": c}) for t, z_t in
                                 renoise_states(denoiser, z, {"c": c}, SCHEDULE, steps=3, xi=xi)])
            if exit_step == "last":
                torch.testing.assert_close(x, renoise_sample(denoiser, z, {"c": c}, SCHEDULE,
                                                             steps=3, xi=xi))
        torch.testing.assert_close(x, exits[step, torch.arange(64)])
        assert sorted(set(step.tolist())) == ([0, 1, 2] if exit_step == "uniform" else [2])


def test_a_multistep_generator_is_sampled_paired_and_evaluated_with_its_chain(tmp_path, capsys):
    """A 2-step dmd generator's checkpoint: `sample` uses the re-noising sampler at 2 steps by
    default and refuses an ODE solver or another step count; its eval rows are `renoise` at 2
    network evaluations; its sample pairs are the sampler's output on each row's own noise and
    re-noise draws; progressive distillation refuses it as a teacher."""
    config = ModelConfig(unet=UNetConfig(base_channels=8, attention_resolutions=[]))
    path, out = str(tmp_path / "generator"), str(tmp_path / "grid.png")
    meta = {"method": "dmd", "steps": 2, "stochastic": True, "sampler": "renoise", "w_min": 1.0,
            "w_max": 1.0}
    save_checkpoint(path, build_network(config), config, extra=meta)
    model = load_checkpoint(path)
    distilled = model.sampling.distilled_sampler
    assert (distilled.solver, distilled.steps, model.sampling.is_stochastic_student) == (
        "renoise", 2, False)
    assert model.sampling.stochastic_sampler is renoise_sample
    assert network_evaluations(model, "renoise", 2) == 2

    base = ["sample", "--checkpoint", path, "--per-class", "1", "--out", out]
    assert main(base) == 0
    assert "2 renoise steps, w=1" in capsys.readouterr().out
    for flags, message in [
            (["--no-stochastic"], "--no-stochastic: asks for an ODE solver"),
            (["--steps", "4"], "--steps: is 4")]:
        assert main([*base, *flags]) == 2
        assert f"{message}, but the model is a dmd student distilled for the 2-step re-noising " \
               "sampler of a multi-step generator" in capsys.readouterr().err

    spec = from_dict(PairsJob, {"mode": "ode", "teacher": {"checkpoint": path},
                                "stochastic": True, "solver": {"solver": "ddim", "steps": 2},
                                "guidance": {"w_min": 1.0, "w_max": 1.0},
                                "samples_per_shard": 4, "batch_size": 4})
    teacher = load_teacher(spec.teacher)
    cols = {k: torch.as_tensor(v) for k, v in ShardMaker(spec, teacher).make(0).items()}
    want = []
    for i in range(4):
        g = torch.Generator().manual_seed(int(cols["seed"][i]))
        c, _ = torch.randint(0, 10, (1,), generator=g), torch.rand((1,), generator=g)
        noise = torch.randn(1, 1, 16, 16, generator=g)
        xi = torch.randn(1, 1, 1, 16, 16, generator=g)
        with torch.no_grad():
            want.append(renoise_sample(teacher.w_denoiser, noise, {"c": c}, teacher.denoiser.schedule,
                                       steps=2, xi=xi)[0])
    torch.testing.assert_close(cols["image"], torch.stack(want), rtol=0, atol=1e-5)

    pairs = ["pairs", "--config", f"{ROOT}/configs/smoke/pairs.yaml", "--out",
             str(tmp_path / "halving"), "--quiet", "teacher.analytic=null",
             f"teacher.checkpoint={path}", "mode=progressive", "student_steps=1",
             "data.source=digits", "guidance.w_min=1.0", "guidance.w_max=1.0"]
    assert main(pairs) == 2
    assert "student_steps: cannot be halved from a teacher distilled for the 2-step re-noising " \
           "sampler" in capsys.readouterr().err


def test_a_trained_multistep_generator_records_its_sampler(single_process_group, tmp_path):
    """Through the training loop (ZeRO-2), a 3-step dmd generator's checkpoint records the
    re-noising sampler at 3 steps and its built-in w."""
    job = load(TrainJob, f"{ROOT}/configs/tests/analytic_dmd.yaml",
               ["workers.num=1", "optim.steps=2", "optim.warmup_steps=0", "checkpoint_every=2",
                "dmd.generator_steps=3"])
    out = str(tmp_path / "run")

    def keep(metrics, directory):
        shutil.copytree(directory, out, dirs_exist_ok=True)

    train_in_process(job, prepare(job), keep)
    model = load_checkpoint(os.path.join(out, "student"))
    assert (str(model.sampling.distilled_sampler), model.sampling.built_in_w) == (
        "the 3-step re-noising sampler of a multi-step generator", 0.0)
