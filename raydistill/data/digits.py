"""The handwritten digits that scikit-learn ships (1,797 8x8 images, 10 classes): no download.

Pixels 0..16 are scaled to [-1, 1] and the 8x8 images are bilinearly resized to the configured
resolution (16 by default). We resize rather than pad: every pixel then carries digit structure, and
a 16x16 image keeps two levels of the UNet meaningful. The split into train and held-out images is
stratified by class and fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.config import DataConfig


@dataclass
class LabelledImages:
    images: Tensor   # [N, C, H, W] float32 in [-1, 1]
    labels: Tensor   # [N] int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> LabelledImages:
        return LabelledImages(self.images.to(device), self.labels.to(device))


@dataclass
class Split:
    train: LabelledImages
    test: LabelledImages
    num_classes: int

    def to(self, device: torch.device) -> Split:
        return Split(self.train.to(device), self.test.to(device), self.num_classes)


def load_digits(config: DataConfig) -> Split:
    """Digits scaled to [-1, 1] at config.resolution, split into train and held-out parts."""
    return split_labelled(*digits_arrays(config), config)


def digits_arrays(config: DataConfig) -> tuple[Tensor, np.ndarray]:
    """All 1,797 digits scaled to [-1, 1] at config.resolution, and their labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))[:, None] / 8.0 - 1.0
    if config.resolution != images.shape[-1]:
        images = F.interpolate(images, size=(config.resolution, config.resolution),
                               mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    if config.channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return images, bunch.target.astype(np.int64)


def split_labelled(images: Tensor, labels: np.ndarray | None, config: DataConfig) -> Split:
    """A seeded train / held-out split, stratified by class; unlabelled data is class 0."""
    from sklearn.model_selection import train_test_split

    labels = np.zeros(len(images), np.int64) if labels is None else labels.astype(np.int64)
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    n_test = int(np.ceil(config.holdout_fraction * len(labels)))
    stratifiable = counts[counts > 0].min() >= 2 and min(n_test, len(labels) - n_test) >= classes
    stratify = labels if stratifiable else None
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=config.holdout_fraction, random_state=config.seed,
        stratify=stratify)
    labels_t = torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Split(LabelledImages(images[train_idx], labels_t[train_idx]),
                 LabelledImages(images[test_idx], labels_t[test_idx]), int(labels.max()) + 1)
