"""The multi-step generator's sampler (DMD2, Yin et al. 2024, Sec. 4.5; the multistep sampler of
consistency models, Song et al. 2023, Alg. 1).

A generator distilled for N steps is evaluated at the fixed times t_i = 1 - i/N (i = 0..N-1): from
pure noise z_{t_0}, each step takes the generator's clean estimate x_hat = G(z_{t_i}, t_i) and
re-noises it to the next time with fresh noise,

    z_{t_{i+1}} = alpha_{t_{i+1}} x_hat + sigma_{t_{i+1}} xi_i,       xi_i ~ N(0, I)

and the last step's x_hat is the sample. Unlike an ODE solver, a step keeps nothing of z_t but
what the generator read from it. Training a multi-step generator runs this same chain with the
generator itself ("backward simulation", raydistill.methods.dmd), so the inputs it learns from are
the inputs it is sampled with.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from raydistill.diffusion.guidance import Cond, Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule


def generator_times(steps: int) -> Tensor:
    """t_i = 1 - i/N for i = 0..N-1: where an N-step generator is evaluated."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    return 1.0 - torch.arange(steps, dtype=torch.float64) / steps


def renoise_states(denoiser: Denoiser, noise: Tensor, cond: Cond, schedule: Schedule, *,
                   steps: int, xi: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """The chain's inputs (t_i [B], z_{t_i}) for i = 0..N-1, lazily: the denoiser runs once per
    state after the first, so taking k states costs k - 1 evaluations. `xi` [B, N - 1, *sample
    shape] holds each sample's re-noise draws, the first for t_1."""
    if xi.shape != (noise.shape[0], steps - 1, *noise.shape[1:]):
        raise ValueError(f"xi must have shape {(noise.shape[0], steps - 1, *noise.shape[1:])}, "
                         f"got {tuple(xi.shape)}")
    times = [torch.full((noise.shape[0],), float(t), dtype=noise.dtype, device=noise.device)
             for t in generator_times(steps)]
    z = noise
    for i, t in enumerate(times):
        yield t, z
        if i + 1 < steps:
            x_hat = denoiser(z, t, cond)
            alpha, sigma = (broadcast_like(v, z) for v in schedule.alpha_sigma(times[i + 1]))
            z = alpha * x_hat + sigma * xi[:, i].to(z)


def renoise_sample(denoiser: Denoiser, noise: Tensor, cond: Cond, schedule: Schedule, *,
                   steps: int, xi: Tensor) -> Tensor:
    """The N-step sample: the generator's x_hat at the chain's last state (N evaluations)."""
    *_, (t, z) = renoise_states(denoiser, noise, cond, schedule, steps=steps, xi=xi)
    return denoiser(z, t, cond)
