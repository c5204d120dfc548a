"""Class-conditional sample grids: one row per class, written as PNG."""

from __future__ import annotations

import io
import os

import torch
from torch import Tensor

from raydistill.config import SamplerConfig
from raydistill.diffusion.guidance import Denoiser
from raydistill.diffusion.progressive import stochastic_sample
from raydistill.diffusion.schedule import Schedule
from raydistill.diffusion.solvers import sample


@torch.no_grad()
def sample_classes(
    w_denoiser: Denoiser, schedule: Schedule, *, shape: tuple[int, ...], num_classes: int,
    sampler: SamplerConfig, seed: int = 0, stochastic: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """sampler.per_class samples of every class, class-major; returns (images, labels) on the CPU.

    `w_denoiser` reads the guidance strength from cond["w"] (Checkpoint.w_denoiser). The noise is drawn on
    the CPU from `seed`, so a grid is the same on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(sampler.per_class)
    noise = torch.randn(len(labels), *shape, generator=generator).to(device)
    labels = labels.to(device)
    cond = {"c": labels, "w": torch.full((len(labels),), float(sampler.w), device=device)}
    if stochastic:
        images = stochastic_sample(w_denoiser, noise, cond, schedule, steps=sampler.steps,
                                   generator=torch.Generator(device).manual_seed(seed + 1))
    else:
        images = sample(w_denoiser, noise, cond, schedule, steps=sampler.steps,
                        solver=sampler.solver, spacing=sampler.spacing)
    return images.clamp(-1, 1).cpu(), labels.cpu()


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
    pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
