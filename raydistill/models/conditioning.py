"""What a model's samples are conditioned on and what they are, apart from its weights' record
(models.checkpoint): the prompt table a text model's condition index c points into
(raydistill.conditions), and the autoencoder a latent model's samples decode through
(models.autoencoder). A teacher gets both from its config (`teacher.prompts`, a diffusers
directory's vae/); a student records them (`record`) and is sampled with the ones it distilled."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raydistill.conditions import Conditions, PromptTable
from raydistill.config import ConfigError, ModelConfig
from raydistill.models.autoencoder import Autoencoder, load_autoencoder
from raydistill.models.autoencoder import image_shape as autoencoder_image_shape
from raydistill.models.diffusers_unet import data_shape as diffusers_data_shape

VAE_KEY, PROMPTS_KEY = "teacher.diffusers.vae", "teacher.prompts"


def model_data_shape(config: ModelConfig) -> tuple[int, ...]:
    """The shape of one sample x a model built from `config` denoises (a latent model's
    latents)."""
    if config.kind == "unet":
        return (config.unet.in_channels, config.unet.resolution, config.unet.resolution)
    if config.kind == "diffusers":
        return diffusers_data_shape(config.diffusers)
    spec = config.gmm if config.kind == "gmm" else config.mlp
    return tuple(spec.shape) or (spec.dim,)


@dataclass
class Conditioning:
    """The conditioning of a model built from `config` (the network answers what only it knows:
    a diffusers model's classes, a text model's empty-prompt embedding): `prompts`, a text model's
    prompt table; `autoencoder_path`, a latent model's AutoencoderKL."""

    config: ModelConfig
    network: nn.Module
    prompts: str = ""
    autoencoder_path: str = ""

    @classmethod
    def recorded(cls, config: ModelConfig, network: nn.Module,
                 extra: dict[str, Any]) -> Conditioning:
        """What a student's record says it is sampled with (see `record`)."""
        return cls(config, network, extra.get("prompts", ""), extra.get("autoencoder", ""))

    def record(self) -> dict[str, str]:
        """What a student distilled under this conditioning records of it (its `extra`)."""
        return {**({"prompts": self.prompts} if self.text else {}),
                **({"autoencoder": self.autoencoder_path} if self.autoencoder_path else {})}

    def with_prompts(self, prompts: str) -> Conditioning:
        """The same conditioning under another prompt table (checked when first used); a loaded
        autoencoder is kept."""
        other = copy.copy(self)
        other.prompts = prompts
        other.__dict__.pop("conditions", None)
        return other

    @property
    def text(self) -> bool:
        """Whether the model is conditioned on text (encoder_hidden_states)."""
        return self.config.kind == "diffusers" and self.config.diffusers.text_length > 0

    @functools.cached_property
    def conditions(self) -> Conditions:
        """What c means to the model (raydistill.conditions): a text model needs its prompt
        table, whose rows must have the width and length of its empty-prompt embedding."""
        config = self.config
        if not self.text:
            if config.kind == "diffusers":
                return Conditions(self.network.num_classes)
            spec = {"gmm": config.gmm, "unet": config.unet, "mlp": config.mlp}[config.kind]
            return Conditions(spec.num_classes)
        if not self.prompts:
            raise ConfigError(PROMPTS_KEY, "is required for a text-conditioned model: the prompt "
                                           "embeddings (encoder_hidden_states [P, L, D]) its "
                                           "samples are conditioned on")
        table = PromptTable(self.prompts, PROMPTS_KEY)
        expected = tuple(self.network.null_embedding.shape)
        if (table.length, table.width) != expected:
            raise ConfigError(PROMPTS_KEY, f"{self.prompts} holds [{table.length}, {table.width}] "
                                           f"embeddings; the model takes [{expected[0]}, "
                                           f"{expected[1]}] (the shape of its empty-prompt "
                                           "embedding)")
        return Conditions(table.count, table)

    @property
    def num_classes(self) -> int:
        """The condition indices c the model is sampled under: its classes, or a text model's
        prompts."""
        return self.conditions.num_classes

    @functools.cached_property
    def autoencoder(self) -> Autoencoder | None:
        """A latent model's autoencoder (on the CPU until moved), None for a pixel model."""
        if not self.autoencoder_path:
            return None
        return load_autoencoder(self.autoencoder_path, VAE_KEY)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image: the model's data shape, or what a latent model's latents
        decode to."""
        data_shape = model_data_shape(self.config)
        if not self.autoencoder_path:
            return data_shape
        return autoencoder_image_shape(self.autoencoder_path, data_shape, VAE_KEY)

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as images: decoded by a latent model's autoencoder, else as they are."""
        autoencoder = self.autoencoder
        return samples if autoencoder is None else autoencoder.decode(samples)
