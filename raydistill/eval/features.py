"""Feature extractors for FID / KID: images [N, C, H, W] in [-1, 1] -> float64 features [N, D].

classifier  the project's domain classifier (its penultimate layer), for digits and users' small
            data: Inception features of 8x8 or 16x16 images blown up to 299x299 say little, and a
            domain classifier is the usual practice for MNIST-like data.
inception   Inception-v3 as a TorchScript file at a local path, never downloaded: the convention of
            StyleGAN2-ADA / EDM's `inception-2015-12-05` detector, called as
            `detector(uint8 images [N, 3, H, W], return_features=True)` -> [N, 2048] (it resizes
            internally). Grayscale images are repeated to three channels.

`Features.identity` names the extractor by kind and the sha256 of its weights, so reference
statistics are cached under it and never reused across extractors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from raydistill.config import ConfigError, FeaturesConfig
from raydistill.models.classifier import load_classifier
from raydistill.sampling import to_uint8
from raydistill.storage import file_sha256


@dataclass
class Features:
    identity: str                                # kind:sha256 of the weights (cache key)
    extract: Callable[[Tensor], Tensor]          # one batch in [-1, 1] -> [B, D]
    batch_size: int

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return torch.cat([self.extract(batch).double().cpu()
                          for batch in images.split(self.batch_size)])


def load_features(config: FeaturesConfig) -> Features:
    if config.kind == "classifier":
        classifier, _ = load_classifier(config.path)
        digest = file_sha256(os.path.join(config.path, "model.safetensors"))
        return Features(f"classifier:{digest}", classifier.features, config.batch_size)
    try:
        detector = torch.jit.load(config.path, map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        raise ConfigError("features.path", f"{config.path} is not a TorchScript Inception-v3 "
                                           f"detector ({str(err).splitlines()[0]})") from None

    def inception(images: Tensor) -> Tensor:
        pixels = to_uint8(images)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return detector(pixels, return_features=True)

    return Features(f"inception:{file_sha256(config.path)}", inception, config.batch_size)
