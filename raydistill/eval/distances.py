"""Distances between sample sets: FID and KID through torchmetrics on precomputed features, and,
for the analytic teacher, exact distances to the true class-conditional distribution.

FID / KID: the extractor runs once per image set (raydistill.eval.features); torchmetrics computes
the statistics from the features, fed through an identity 'network', so reference features can be
cached and the same features serve both metrics.

Exact (analytic teacher), per class c and averaged over the classes:
    Frechet  ||m - mu_c||^2 + tr(S + Sigma_c - 2 (S^1/2 Sigma_c S^1/2)^1/2), with (m, S) the
             samples' mean and covariance and (mu_c, Sigma_c) the exact moments of p(x | c);
    sliced Wasserstein-2  sqrt(mean over random unit directions of W2^2 between the projected
             samples and as many exact draws from p(x | c)), each 1-D W2 from sorted values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from raydistill.models.gmm import GaussianMixture


class _Given(nn.Identity):
    """The 'network' torchmetrics runs: the features are computed already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def fid(real: Tensor, fake: Tensor) -> float:
    """FID between feature sets [N, D] and [M, D]."""
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), reset_real_features=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def fid_kid(real: Tensor, fake: Tensor, *, kid_subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID and KID (mean and std over 100 subsets) between feature sets [N, D] and [M, D]. KID's
    subsets are drawn from `seed`, so the numbers repeat."""
    subset = min(kid_subset_size, len(real), len(fake))
    kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subset_size=subset,
                                  reset_real_features=False)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid(real, fake), "kid": float(kid_mean), "kid_std": float(kid_std)}


def class_moments(mixture: GaussianMixture, c: int) -> tuple[Tensor, Tensor]:
    """The exact mean [D] and covariance [D, D] of p(x | c)."""
    member = mixture.classes == c
    weights = mixture.weights[member] / mixture.weights[member].sum()
    means, stds = mixture.means[member], mixture.stds[member]
    mean = weights @ means
    second = torch.einsum("k,kd,ke->de", weights, means, means) + \
        torch.diag(torch.full((mixture.dim,), float(weights @ stds**2), dtype=means.dtype))
    return mean, second - torch.outer(mean, mean)


def frechet(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """The Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b)."""
    root_a = _sqrtm(cov_a)
    cross = _sqrtm(root_a @ cov_b @ root_a)
    return float((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def exact_distances(samples: Tensor, labels: Tensor, mixture: GaussianMixture, *,
                    projections: int = 256, seed: int = 0) -> dict[str, float]:
    """Frechet distance to the exact moments and sliced Wasserstein-2 distance to exact draws of
    p(x | c), per class and averaged over the classes present (see the module docstring)."""
    x = samples.reshape(len(samples), -1).double()
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    fds, swds = [], []
    for c in labels.unique().tolist():
        mine = x[labels == c]
        mean, cov = class_moments(mixture, c)
        fds.append(frechet(mine.mean(0), torch.cov(mine.T).reshape(cov.shape), mean, cov))
        truth = mixture.sample(torch.full((len(mine),), c), generator=g)
        truth = truth.reshape(len(mine), -1).double()
        gaps = (mine @ directions).sort(0).values - (truth @ directions).sort(0).values
        swds.append(float(gaps.pow(2).mean().sqrt()))
    return {"frechet": sum(fds) / len(fds), "sliced_w2": sum(swds) / len(swds)}


def _sqrtm(matrix: Tensor) -> Tensor:
    """The symmetric PSD square root (eigenvalues clamped at 0 against round-off)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
