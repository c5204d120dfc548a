"""Class-conditional samples (a text model's "classes" are its prompts), written as a PNG grid
(one row per class) or as arrays: an .npz with
uint8 images [N, H, W, C] as `arr_0` and labels as `arr_1`, the layout the guided-diffusion
evaluation suite (openai/guided-diffusion's evaluations/evaluator.py) reads."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from raydistill.conditions import Conditions
from raydistill.config import SamplerConfig
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.schedule import Schedule
from raydistill.diffusion.solvers import sample


@torch.no_grad()
def sample_classes(
    w_denoiser: Denoiser, schedule: Schedule, *, shape: tuple[int, ...], conditions: Conditions,
    sampler: SamplerConfig, seed: int = 0, stochastic: Callable[..., Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """sampler.per_class samples of every class, class-major; returns (samples, labels) on the
    CPU: images as the model gives them (not clamped), or a latent model's latents.

    `w_denoiser` reads the guidance strength from cond["w"] (Checkpoint.w_denoiser). `stochastic`:
    a sampler with re-noise draws (Checkpoint.sampling.stochastic_sampler: Meng et al.'s or a multi-step
    generator's) instead of the ODE solver. The noise is drawn on the CPU from `seed`, so a grid is
    the same on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(conditions.num_classes).repeat_interleave(sampler.per_class)
    noise = torch.randn(len(labels), *shape, generator=generator).to(device)
    labels = labels.to(device)
    cond = conditions.cond(labels, torch.full((len(labels),), float(sampler.w), device=device))
    if stochastic is not None:
        xi = torch.randn(len(labels), sampler.steps - 1, *shape, generator=generator)
        images = stochastic(w_denoiser, noise, cond, schedule, steps=sampler.steps,
                            xi=xi.to(device))
    else:
        images = sample(w_denoiser, noise, cond, schedule, steps=sampler.steps,
                        solver=sampler.solver, spacing=sampler.spacing)
    return images.cpu(), labels.cpu()


def to_uint8(images: Tensor) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] as uint8 pixels in 0..255 (clamped, rounded), on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_png(images: Tensor, rows: int, *, scale: int = 4) -> bytes:
    """PNG bytes of images [N, C, H, W] in [-1, 1] tiled into `rows` rows (nearest upscaling)."""
    from matplotlib.image import imsave

    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 1.0)
    for i, image in enumerate(images.detach().float().cpu()):
        r, col = divmod(i, cols)
        top, left = 1 + r * (h + 1), 1 + col * (w + 1)
        canvas[:, top:top + h, left:left + w] = image
    pixels = to_uint8(canvas[None])[0]
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    if c == 1:
        imsave(buffer, pixels[..., 0], cmap="gray", vmin=0, vmax=255, format="png")
    else:
        imsave(buffer, pixels, format="png")
    return buffer.getvalue()


def save_grid(images: Tensor, rows: int, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(grid_png(images, rows))


def save_arrays(images: Tensor, labels: Tensor, path: str) -> None:
    """images [N, C, H, W] in [-1, 1] and labels [N] as an .npz: `arr_0` uint8 [N, H, W, C],
    `arr_1` int64 [N]. Written under a temporary name and renamed, so a partial file never looks
    complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        np.savez(f, to_uint8(images).permute(0, 2, 3, 1).numpy(), labels.cpu().long().numpy())
    os.replace(partial, path)
