"""Classifier-free guidance (Ho & Salimans 2021) in the x-space form used by Meng et al. (2023):

    x_hat_w(z_t, c) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null)

w = 0 is the conditional model, w = -1 the unconditional one. The condition is a dict of per-sample
tensors; class labels live under "c" with NULL_CLASS (-1) meaning "no class", and the guidance
strength under "w".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from raydistill.diffusion.parameterization import broadcast_like

Cond = dict[str, Tensor]
Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]
NULL_CLASS = -1


def cfg_combine(x_cond: Tensor, x_uncond: Tensor, w: Tensor) -> Tensor:
    """(1 + w) x_cond - w x_uncond, with w per sample [B] or a scalar."""
    w = torch.as_tensor(w, dtype=x_cond.dtype, device=x_cond.device)
    if w.ndim:
        w = broadcast_like(w, x_cond)
    return (1 + w) * x_cond - w * x_uncond


def null_cond(cond: Cond) -> Cond:
    """The same condition with every class label replaced by NULL_CLASS."""
    return {**cond, "c": torch.full_like(cond["c"], NULL_CLASS)}


def cfg_x(denoiser: Denoiser, z_t: Tensor, t: Tensor, cond: Cond, w: Tensor) -> Tensor:
    """The CFG x_hat_w with both branches in one batched denoiser call."""
    both = {key: torch.cat([value, null_cond(cond)[key]]) for key, value in cond.items()}
    x_both = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), both)
    x_cond, x_uncond = x_both.chunk(2)
    return cfg_combine(x_cond, x_uncond, w)


class CFG:
    """A Denoiser that applies classifier-free guidance with strength cond["w"] to another."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def __call__(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        inner = {key: value for key, value in cond.items() if key != "w"}
        return cfg_x(self.denoiser, z_t, t, inner, cond["w"])


def fourier_embedding(x: Tensor, dim: int, *, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features [B, dim] of a per-sample scalar [B] (Vaswani et al. 2017; used for t and w)."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    )
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
