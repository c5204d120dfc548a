"""Solvers against the exact mixture teacher: convergence order to a 2048-step Heun reference."""

import pytest
import torch

from raydistill.diffusion import (
    SOLVERS,
    DiscreteSchedule,
    ddim,
    sample,
    solve,
    stochastic_sample,
    time_grid,
)
from raydistill.models import AnalyticTeacher, GaussianMixture

W = 1.0   # every check runs under classifier-free guidance, as teachers are used


@pytest.fixture(scope="module")
def problem(teacher, schedule):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(96, teacher.mixture.dim, generator=g, dtype=torch.float64)
    cond = {"c": torch.randint(0, teacher.mixture.num_classes, (96,), generator=g)}
    reference = sample(teacher, noise, cond, schedule, steps=2048, solver="heun", w=W,
                       spacing="uniform_logsnr")
    return noise, cond, reference


def error(problem, teacher, schedule, solver, steps, spacing, reduce=torch.mean):
    noise, cond, reference = problem
    x = sample(teacher, noise, cond, schedule, steps=steps, solver=solver, w=W, spacing=spacing)
    return reduce((x - reference).norm(dim=1)).item()


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_order_of_convergence(problem, teacher, schedule, solver, order):
    """Doubling the steps divides the error by about 2^order (uniform log-SNR grid).

    The median over samples: trajectories that pass near a class boundary under guidance stay
    pre-asymptotic for longer and would make the mean's ratios depend on which noise was drawn.
    """
    errors = [error(problem, teacher, schedule, solver, n, "uniform_logsnr", torch.median)
              for n in (64, 128, 256)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    print(f"{solver}: errors {['%.2e' % e for e in errors]} ratios {['%.2f' % r for r in ratios]}")
    for ratio in ratios:
        assert 2**order * 0.8 < ratio < 2**order * 1.3
    assert errors[-1] < 0.02


@pytest.mark.parametrize("steps", [4, 8, 16])
def test_second_order_solvers_are_stable_at_few_uniform_t_steps(problem, teacher, schedule, steps):
    """The clipped cosine schedule starts at sigma / alpha = e^10: no blow-up at few steps."""
    ddim_err = error(problem, teacher, schedule, "ddim", steps, "uniform_t")
    for solver in ("heun", "dpmpp_2m"):
        assert error(problem, teacher, schedule, solver, steps, "uniform_t") < ddim_err


@pytest.mark.parametrize("spacing", ["uniform_t", "uniform_logsnr"])
def test_dpmpp_2m_beats_ddim_at_16_steps(problem, teacher, schedule, spacing):
    dpm = error(problem, teacher, schedule, "dpmpp_2m", 16, spacing)
    ddim_err = error(problem, teacher, schedule, "ddim", 16, spacing)
    print(f"{spacing}: 16 steps DPM-Solver++(2M) {dpm:.3e} vs DDIM {ddim_err:.3e}")
    assert dpm < 0.9 * ddim_err


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_differentiable(teacher, schedule, batch, solver):
    """No solver blocks gradients: students roll them out inside their loss."""
    noise, cond = batch
    z = noise.clone().requires_grad_(True)
    ts = time_grid(4, schedule)
    solve(teacher, z, ts, cond, schedule, solver).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_time_grids(schedule):
    t = time_grid(8, schedule)
    torch.testing.assert_close(t, torch.linspace(1, 0, 9, dtype=torch.float64))
    lam = schedule.logsnr(time_grid(8, schedule, spacing="uniform_logsnr"))
    torch.testing.assert_close(lam.diff(), torch.full((8,), 5.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps must be positive"):
        time_grid(0, schedule)


def test_ddim_one_step_from_pure_noise_gives_the_prior_mean(teacher, schedule, batch):
    """At t = 1 (alpha ~ 0) x_hat is the class mean, so one DDIM step lands there."""
    noise, cond = batch
    x = ddim(teacher, noise, torch.tensor([1.0, 0.0], dtype=torch.float64), cond, schedule)
    mix = teacher.mixture
    w = mix.weights * (mix.classes[None] == cond["c"][:, None])
    class_mean = (w / w.sum(1, keepdim=True)) @ mix.means
    torch.testing.assert_close(x, class_mean, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("sampler, spacing", [
    ("ddim", "uniform_t"), ("ddim", "uniform_logsnr"), ("heun", "uniform_t"),
    ("heun", "uniform_logsnr"), ("dpmpp_2m", "uniform_t"), ("dpmpp_2m", "uniform_logsnr"),
    ("stochastic", "uniform_t")])
def test_discrete_schedules_end_on_the_clean_image(kind, sampler, spacing):
    """Data on four points (std 1e-4): every sampler's last step must land on them (x_hat), not
    on alpha_0 x_hat + sigma_0 eps_hat at the first training timestep (sigma_0 ~ 0.01 for the
    linear betas, ~ 0.03 for scaled-linear: a median miss of ~ 0.02 / 0.06 in 4-D)."""
    schedule = getattr(DiscreteSchedule, kind)()
    mixture = GaussianMixture.random(num_classes=2, components_per_class=2, dim=4, seed=1,
                                     std_range=(1e-4, 2e-4))
    teacher = AnalyticTeacher(mixture, schedule)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(512, 4, generator=g, dtype=torch.float64)
    cond = {"c": torch.randint(0, 2, (512,), generator=g)}
    if sampler == "stochastic":
        x = stochastic_sample(teacher, noise, cond, schedule, steps=16,
                             xi=torch.randn(512, 15, 4, generator=g, dtype=torch.float64))
    else:
        x = sample(teacher, noise, cond, schedule, steps=16, solver=sampler, spacing=spacing)
    miss = (x[:, None] - mixture.means[None]).norm(dim=2).amin(1)
    print(f"{kind} {sampler} {spacing}: median distance to the nearest point {miss.median():.2e}")
    assert torch.isfinite(x).all() and miss.median() < 1e-3


def test_a_grid_finer_than_a_discrete_schedules_timesteps_is_refused():
    """Log-SNR-uniform steps crowd the low-noise end, where Stable Diffusion's timesteps 0 and 1
    are 0.7 apart in log-SNR: 64 such steps would put two on one timestep, and are refused rather
    than taken as a zero-length step (uniform t grids land on distinct timesteps up to N steps)."""
    schedule = DiscreteSchedule.scaled_linear()
    assert len(time_grid(16, schedule, spacing="uniform_logsnr")) == 17
    with pytest.raises(ValueError, match="64 steps spaced uniform_logsnr put two steps on one"):
        time_grid(64, schedule, spacing="uniform_logsnr")
    grid = time_grid(1000, schedule)
    torch.testing.assert_close(schedule.timestep(grid[:-1]),
                               torch.arange(999, -1, -1, dtype=torch.float64))
