"""The progressive target and Meng et al.'s stochastic sampler against independent derivations on
the analytic teacher."""

import pytest
import torch

from raydistill.diffusion import broadcast_like, ddim_step, ddim_update, sample, stochastic_sample
from raydistill.methods.progressive import halving_target
from raydistill.models import AnalyticTeacher, GaussianMixture


@pytest.mark.parametrize("student_steps", [1, 2, 8])
@pytest.mark.parametrize("stochastic, teacher_is_stochastic", [(False, False), (True, False),
                                                               (True, True)])
def test_one_student_step_lands_where_the_teacher_steps_land(teacher, schedule, batch,
                                                             student_steps, stochastic,
                                                             teacher_is_stochastic):
    """halving_target's x_tilde takes the student from z_t in one DDIM step exactly to where the
    teacher's own steps go: two of 1/(2N) for a 1/N jump; for the stochastic sampler a 2/N jump
    (four steps of 1/(2N), or two of 1/N from a teacher that is a stochastic student) except
    from t = 1/N. The teacher's path is walked step by step here, independently."""
    noise, cond = batch
    n = student_steps
    i = torch.arange(len(noise)) % n + 1
    x = teacher.mixture.sample(cond["c"])
    z_t, t, x_tilde = halving_target(teacher, x=x, eps=noise, i=i, cond=cond, schedule=schedule,
                                     student_steps=n, stochastic=stochastic,
                                     teacher_is_stochastic=teacher_is_stochastic)
    for k in range(len(noise)):
        jump = 2 / n if stochastic and i[k] > 1 else 1 / n
        step = 1 / n if teacher_is_stochastic else 1 / (2 * n)
        here, z = t[k:k + 1], z_t[k:k + 1]
        row = {key: value[k:k + 1] for key, value in cond.items()}
        for _ in range(round(jump / step)):
            z = ddim_step(teacher, z, here, here - step, row, schedule)
            here = here - step
        alpha_t, sigma_t = (broadcast_like(v, z) for v in schedule.alpha_sigma(t[k:k + 1]))
        alpha_s, sigma_s = (broadcast_like(v, z) for v in schedule.alpha_sigma(here))
        one = ddim_update(z_t=z_t[k:k + 1], x_hat=x_tilde[k:k + 1], alpha_t=alpha_t,
                          sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)
        torch.testing.assert_close(one, z, rtol=0, atol=1e-8)


def test_stochastic_sampler_follows_its_exact_gaussian_recursion(schedule):
    """On 1-D Gaussian data N(mu, s^2) the exact x_hat is linear in z_t, so Meng et al.'s sampler
    (a DDIM jump of 2/N back to u, then forward diffusion to s = u + 1/N; the last step plain
    DDIM) maps N(0, 1) noise to a Gaussian whose mean and variance follow a scalar recursion,
    derived here by hand. Its samples must match it at 4 steps, where 4-step DDIM (no noise
    injected) and jumps of 1/N instead of 2/N give other variances."""
    mu, s = 0.5, 0.3
    mixture = GaussianMixture(torch.tensor([[mu]], dtype=torch.float64),
                              torch.tensor([s], dtype=torch.float64),
                              torch.tensor([1.0], dtype=torch.float64), torch.tensor([0]))
    exact = AnalyticTeacher(mixture, schedule)

    def coeffs(t: float, to: float) -> tuple[float, float]:
        """z_to = A z_t + B for one exact DDIM step (x_hat = a z + b)."""
        (alpha, sigma), (alpha_to, sigma_to) = (
            (float(v) for v in schedule.alpha_sigma(torch.tensor(x, dtype=torch.float64)))
            for x in (t, to))
        a = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
        b = mu - a * alpha * mu
        slope = alpha_to - sigma_to * alpha / sigma
        return slope * a + sigma_to / sigma, slope * b

    def recursion(steps: int, back: int) -> tuple[float, float]:
        mean, var = 0.0, 1.0
        for i in range(steps, 0, -1):
            t = i / steps
            if i == 1:
                A, B = coeffs(t, 0.0)
                return A * mean + B, A * A * var
            u, to = t - back / steps, t - 1 / steps
            A, B = coeffs(t, u)
            mean, var = A * mean + B, A * A * var
            alpha_u, sigma_u = (float(v) for v in schedule.alpha_sigma(torch.tensor(u)))
            alpha_s, sigma_s = (float(v) for v in schedule.alpha_sigma(torch.tensor(to)))
            ratio = alpha_s / alpha_u
            mean, var = ratio * mean, ratio**2 * var + sigma_s**2 - ratio**2 * sigma_u**2
        raise AssertionError("unreachable")

    g = torch.Generator().manual_seed(5)
    noise = torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    cond = {"c": torch.zeros(len(noise), dtype=torch.long)}
    x = stochastic_sample(exact, noise, cond, schedule, steps=4,
                         xi=torch.randn(len(noise), 3, 1, generator=g, dtype=torch.float64))
    want_mean, want_var = recursion(4, back=2)
    ddim_x = sample(exact, noise, cond, schedule, steps=4)
    one_back_var = recursion(4, back=1)[1]
    print(f"\n4 steps: variance {float(x.var()):.5f}, recursion {want_var:.5f}; 4-step DDIM "
          f"{float(ddim_x.var()):.5f}; 1/N jumps {one_back_var:.5f}; data {s**2:.5f}")
    assert abs(float(x.mean()) - want_mean) < 0.003
    assert abs(float(x.var()) / want_var - 1) < 0.01
    assert abs(float(ddim_x.var()) / want_var - 1) > 0.05 and abs(one_back_var / want_var - 1) > 0.05
