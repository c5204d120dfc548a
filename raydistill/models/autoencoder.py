"""A latent teacher's autoencoder: a diffusers AutoencoderKL between images and the latents the
teacher denoises (Rombach et al. 2022):

    latents = scaling_factor (E(x).mean - shift_factor),    x = D(latents / scaling_factor
                                                                  + shift_factor)

for images x in [-1, 1]. The posterior mean rather than a draw from it: every path that encodes
(stage-1 and progressive targets from real images, a DMD discriminator's real batch) must give
the same latents on every worker and every retry, so that a regenerated shard has the same bytes;
the posterior's spread is small next to the noise the targets add. Everything else in raydistill
works in latent space (pair shards hold latents), and decodes only to look at samples: evaluation
features, report grids and `raydistill sample`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from raydistill.config import ConfigError

#: decoded or encoded at most this many samples at a time (an SD VAE decoder's activations at
#: 512 x 512 are ~1.5 GB per sample in fp32)
CHUNK = 16


class Autoencoder(nn.Module):
    """An AutoencoderKL as the map between images [B, C, H, W] in [-1, 1] and latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents of images in [-1, 1], in the images' dtype and on their device."""
        parts = [self.vae.encode(chunk.to(self.device, self._dtype)).latent_dist.mean
                 for chunk in images.split(CHUNK)]
        return ((torch.cat(parts) - self.shift) * self.scale).to(images.device, images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (nominally in [-1, 1]) of latents, in the latents' dtype and on their device."""
        parts = [self.vae.decode((chunk.to(self.device, self._dtype) / self.scale)
                                 + self.shift).sample for chunk in latents.split(CHUNK)]
        return torch.cat(parts).to(latents.device, latents.dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def image_shape(path: str, latent_shape: tuple[int, ...], key: str) -> tuple[int, ...]:
    """(C, H, W) of the images whose latents have `latent_shape`, from the config of the
    AutoencoderKL in `path` alone (its weights are not read)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(key, f"{path} holds no autoencoder (config.json is missing)")
    with open(config_path) as f:
        config = json.load(f)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    _, height, width = latent_shape
    return (config["in_channels"], height * factor, width * factor)


def load_autoencoder(path: str, key: str) -> Autoencoder:
    """The AutoencoderKL saved (save_pretrained) in directory `path`; `key` names the setting
    that gave it, for errors."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(key, f"{path} holds no autoencoder (config.json is missing)")
    import diffusers

    try:
        vae = diffusers.AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise ConfigError(key, f"{path} is not an AutoencoderKL ({str(err).splitlines()[0]})") \
            from None
    return Autoencoder(vae)
