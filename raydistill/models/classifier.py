"""A small CNN classifier for the project's own data: it scores whether samples show the intended
class, and its penultimate features stand in for Inception features in FID on small images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.models.checkpoint import read_weights_dir, write_weights_dir


class Classifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * width),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, 4 width] of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
        """Fraction of images classified as their label."""
        hits = sum(int((self(x).argmax(1) == y).sum())
                   for x, y in zip(images.split(batch_size), labels.split(batch_size)))
        return hits / len(labels)


CLASSIFIER_FORMAT = "raydistill-classifier/1"


def save_classifier(directory: str, model: Classifier, meta: dict) -> None:
    arch = {"in_channels": model.body[0].in_channels, "num_classes": model.head.out_features,
            "width": model.body[0].out_channels}
    write_weights_dir(directory, model, {"format": CLASSIFIER_FORMAT, "arch": arch, **meta})


def load_classifier(directory: str) -> tuple[Classifier, dict]:
    """The classifier saved in `directory` (eval mode) and its metadata (e.g. test_accuracy)."""
    meta, tensors = read_weights_dir(directory, (CLASSIFIER_FORMAT,))
    model = Classifier(**meta["arch"])
    model.load_state_dict(tensors)
    return model.eval(), meta
