"""Tiny diffusers models with random weights (fixed seed), written the way users hand them over:
a pipeline directory (unet/, scheduler/) or one model's save_pretrained directory with its
scheduler_config.json beside it."""

from __future__ import annotations

import os

import diffusers
import numpy as np
import torch

CLASSES = 4                   # class-conditional models: 4 classes and the null label (index 4)
TOKENS, WIDTH = 3, 16         # text-conditioned models: encoder_hidden_states [B, 3, 16]


def tiny_unet(*, text: bool = False, channels: int = 1, size: int = 8, seed: int = 0):
    """A UNet2DModel with CLASSES + 1 class embeddings, or a UNet2DConditionModel, whose zero-
    initialised output convolutions are re-drawn so the random network is not trivially zero."""
    torch.manual_seed(seed)
    common = dict(sample_size=size, in_channels=channels, out_channels=channels,
                  block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    if text:
        unet = diffusers.UNet2DConditionModel(
            **common, cross_attention_dim=WIDTH, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    else:
        unet = diffusers.UNet2DModel(**common, num_class_embeds=CLASSES + 1,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return unet.eval()


def scheduler(prediction: str = "epsilon", spacing: str = "trailing",
              beta_schedule: str = "scaled_linear"):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                   beta_start=0.00085, beta_end=0.012, prediction_type=prediction,
                                   clip_sample=False, set_alpha_to_one=True,
                                   timestep_spacing=spacing)


def write_model(directory: str, unet, sched, *, pipeline: bool = False) -> str:
    """save_pretrained the UNet and its scheduler: as a pipeline (unet/, scheduler/) or side by
    side in one directory."""
    unet.save_pretrained(os.path.join(directory, "unet") if pipeline else directory)
    sched.save_pretrained(os.path.join(directory, "scheduler") if pipeline else directory)
    return directory


def write_null_embedding(path: str, seed: int = 1) -> torch.Tensor:
    """An 'empty prompt' embedding [TOKENS, WIDTH] written as .npy."""
    null = torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed))
    np.save(path, null.numpy())
    return null


def diffusers_ddim(unet, sched, noise: torch.Tensor, steps: int, *, guidance_scale: float = 1.0,
                   **inputs) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0) with classifier-free guidance as its pipelines do it:
    `inputs` hold the conditional and (under "null_*" names) the null branch's inputs."""
    sched.set_timesteps(steps)
    cond = {k: v for k, v in inputs.items() if not k.startswith("null_")}
    null = {k[5:]: v for k, v in inputs.items() if k.startswith("null_")}
    z = noise
    with torch.no_grad():
        for n in sched.timesteps:
            out = unet(z, n, **cond).sample
            if guidance_scale != 1.0:
                out_null = unet(z, n, **null).sample
                out = out_null + guidance_scale * (out - out_null)
            z = sched.step(out, n, z, eta=0.0).prev_sample
    return z
