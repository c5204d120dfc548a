"""Progressive distillation math (Salimans & Ho 2022) and Meng et al.'s (2023) few-step sampler.

Notation: a student with N steps moves from t to t'' = t - 1/N in one DDIM step; the teacher takes
two DDIM steps t -> t' = t - 1/(2N) -> t''. The student's x-target x_tilde is the x_hat for which one
DDIM step from z_t lands exactly on the teacher's z_t'':

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(Salimans & Ho 2022, Algorithm 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.diffusion.guidance import Cond, Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule
from raydistill.diffusion.solvers import ddim_step, ddim_update


def progressive_target(
    *, z_t: Tensor, z_tpp: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_tpp: Tensor,
    sigma_tpp: Tensor,
) -> Tensor:
    """x_tilde: the x_hat that takes one DDIM step from z_t to z_t'' (Salimans & Ho 2022, Alg. 2)."""
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def jump_target(
    teacher: Denoiser, z_t: Tensor, t: Tensor, s: Tensor, cond: Cond, schedule: Schedule, *,
    teacher_steps: int,
) -> Tensor:
    """The x_hat that takes one DDIM step from z_t (time t [B]) to where `teacher_steps` equal
    teacher DDIM steps from t land at time s [B]: x_tilde for any jump. Salimans & Ho's target is
    s = t - 1/N with two teacher steps; Meng et al.'s stochastic sampler needs the student to jump
    2/N for t > 1/N. Call under no_grad when the teacher is frozen."""
    z, here = z_t, t
    for k in range(1, teacher_steps + 1):
        there = t + (s - t) * (k / teacher_steps)
        z = ddim_step(teacher, z, here, there, cond, schedule)
        here = there
    alpha_t, sigma_t = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(t))
    alpha_s, sigma_s = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(s))
    return progressive_target(z_t=z_t, z_tpp=z, alpha_t=alpha_t, sigma_t=sigma_t,
                              alpha_tpp=alpha_s, sigma_tpp=sigma_s)


def stochastic_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Cond,
    schedule: Schedule,
    *,
    steps: int,
    xi: Tensor,
) -> Tensor:
    """Meng et al. (2023, Sec. 4) stochastic N-step sampling of a distilled student.

    From t = i/N (i > 1): one deterministic DDIM step of 2/N to u = (i-2)/N, then forward diffusion
    back to s = (i-1)/N: z_s = (alpha_s / alpha_u) z_u + sigma_{s|u} xi. The last step (t = 1/N) is
    plain DDIM. `xi` [B, N - 1, *sample shape] holds each sample's standard normal re-noise draws,
    the first for t = 1, so a sample depends on its own draws only, never on its batch.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if xi.shape != (noise.shape[0], steps - 1, *noise.shape[1:]):
        raise ValueError(f"xi must have shape {(noise.shape[0], steps - 1, *noise.shape[1:])}, "
                         f"got {tuple(xi.shape)}")
    z = noise
    batch = z.shape[0]
    for i in range(steps, 0, -1):
        t = torch.full((batch,), i / steps, dtype=z.dtype, device=z.device)
        if i == 1:
            return ddim_step(denoiser, z, t, torch.zeros_like(t), cond, schedule)
        u, s = t - 2.0 / steps, t - 1.0 / steps
        alpha_t, sigma_t = (broadcast_like(v, z) for v in schedule.alpha_sigma(t))
        alpha_u, sigma_u = (broadcast_like(v, z) for v in schedule.alpha_sigma(u))
        alpha_s, sigma_s = (broadcast_like(v, z) for v in schedule.alpha_sigma(s))
        z_u = ddim_update(z_t=z, x_hat=denoiser(z, t, cond), alpha_t=alpha_t, sigma_t=sigma_t,
                          alpha_s=alpha_u, sigma_s=sigma_u)
        alpha_su = alpha_s / alpha_u
        sigma_su = (sigma_s**2 - alpha_su**2 * sigma_u**2).clamp(min=0).sqrt()
        z = alpha_su * z_u + sigma_su * xi[:, steps - i].to(z)
    return z
