import pytest
import torch

from raydistill.diffusion import (
    broadcast_like,
    ddim_step,
    ddim_update,
    stochastic_sample,
    two_step_target,
)


@pytest.mark.parametrize("student_steps", [1, 2, 8, 64])
def test_one_step_to_the_target_equals_two_teacher_steps(teacher, schedule, batch, student_steps):
    noise, cond = batch
    t = torch.randint(1, student_steps + 1, (len(noise),)).double() / student_steps
    z_t = broadcast_like(schedule.alpha(t), noise) * teacher.mixture.sample(cond["c"]) \
        + broadcast_like(schedule.sigma(t), noise) * noise
    t_pp = t - 1.0 / student_steps
    two_steps = ddim_step(teacher, ddim_step(teacher, z_t, t, t - 0.5 / student_steps, cond,
                                             schedule), t - 0.5 / student_steps, t_pp, cond, schedule)
    x_tilde = two_step_target(teacher, z_t, t, cond, schedule, student_steps)
    alpha_t, sigma_t = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(t))
    alpha_s, sigma_s = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(t_pp))
    one_step = ddim_update(z_t=z_t, x_hat=x_tilde, alpha_t=alpha_t, sigma_t=sigma_t,
                           alpha_s=alpha_s, sigma_s=sigma_s)
    torch.testing.assert_close(one_step, two_steps, rtol=0, atol=1e-8)


def test_stochastic_sampler_with_exact_denoiser_samples_the_data(teacher, schedule):
    """With the exact x_hat, the 2/N-back, 1/N-forward sampler draws from p(x | c)."""
    mix = teacher.mixture
    g = torch.Generator().manual_seed(5)
    labels = torch.full((20_000,), 1)
    noise = torch.randn(len(labels), mix.dim, generator=g, dtype=torch.float64)
    x = stochastic_sample(teacher, noise, {"c": labels}, schedule, steps=64, generator=g)
    data = mix.sample(labels, generator=g)
    torch.testing.assert_close(x.mean(0), data.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(x.T), torch.cov(data.T), rtol=0, atol=0.03)
