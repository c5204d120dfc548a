"""The analytic teacher: a class-conditional Gaussian mixture with an exact denoiser.

Components k have mean mu_k, isotropic std s_k, weight pi_k and belong to one class. For data from
the mixture, z_t = alpha_t x + sigma_t eps is again a mixture, so

    p(z_t | k)    = N(z_t; alpha_t mu_k, (alpha_t^2 s_k^2 + sigma_t^2) I)
    r_k(z_t)      = softmax_k(log pi_k + log p(z_t | k))     over c's components (all for null)
    E[x | z_t, k] = mu_k + alpha_t s_k^2 / (alpha_t^2 s_k^2 + sigma_t^2) (z_t - alpha_t mu_k)
    x_hat(z_t, c) = sum_k r_k(z_t) E[x | z_t, k]

which is the exact E[x | z_t, c]: the oracle every solver and distillation test measures against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raydistill.diffusion.guidance import NULL_CLASS, Cond
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule


class GaussianMixture(nn.Module):
    """Mixture parameters as buffers (so they save, hash and move like any model's weights)."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, classes: Tensor,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        num_components, dim = means.shape
        for name, value in (("stds", stds), ("weights", weights), ("classes", classes)):
            if value.shape != (num_components,):
                raise ValueError(f"{name} must have shape ({num_components},), got {tuple(value.shape)}")
        if bool((stds <= 0).any()) or bool((weights <= 0).any()):
            raise ValueError("mixture stds and weights must be positive")
        self.shape = tuple(shape) if shape is not None else (dim,)
        if math.prod(self.shape) != dim:
            raise ValueError(f"shape {self.shape} does not hold {dim} values")
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("classes", classes.long().clone())

    @classmethod
    def random(cls, *, num_classes: int, components_per_class: int, dim: int, seed: int = 0,
               spread: float = 2.0, std_range: tuple[float, float] = (0.1, 0.4),
               shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float64):
        """A reproducible random mixture: means ~ N(0, spread^2 / dim), stds uniform in std_range."""
        g = torch.Generator().manual_seed(seed)
        k = num_classes * components_per_class
        means = torch.randn(k, dim, generator=g, dtype=dtype) * spread / math.sqrt(dim)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(k, generator=g, dtype=dtype)
        weights = 0.5 + torch.rand(k, generator=g, dtype=dtype)
        classes = torch.arange(num_classes).repeat_interleave(components_per_class)
        return cls(means, stds, weights, classes, shape)

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws x ~ p(x | c) for per-sample labels (NULL_CLASS draws from p(x))."""
        logits = self._class_log_weights(labels.to(self.means.device))
        k = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
        noise = torch.randn(len(labels), self.dim, generator=generator, dtype=self.means.dtype)
        x = self.means[k] + self.stds[k, None] * noise.to(self.means.device)
        return x.reshape(len(labels), *self.shape)

    def posterior_mean(self, z_t: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """E[x | z_t, c] for per-sample alpha, sigma [B] and labels [B]."""
        batch = z_t.shape[0]
        z = z_t.reshape(batch, -1).to(self.means.dtype)
        alpha, sigma = alpha.to(z.dtype)[:, None], sigma.to(z.dtype)[:, None]
        var = alpha**2 * self.stds[None] ** 2 + sigma**2                         # [B, K]
        diff = z[:, None, :] - alpha[:, :, None] * self.means[None]               # [B, K, D]
        log_p = -0.5 * (diff.pow(2).sum(-1) / var + self.dim * torch.log(var))    # [B, K]
        r = torch.softmax(self._class_log_weights(labels) + log_p, dim=1)
        gain = alpha * self.stds[None] ** 2 / var                                 # [B, K]
        e_x = self.means[None] + gain[:, :, None] * diff                          # [B, K, D]
        x_hat = torch.einsum("bk,bkd->bd", r, e_x)
        return x_hat.reshape(z_t.shape).to(z_t.dtype)

    def _class_log_weights(self, labels: Tensor) -> Tensor:
        """log pi_k, masked to -inf outside each sample's class ([B, K])."""
        log_w = torch.log(self.weights)[None].expand(len(labels), -1)
        labels = labels.to(self.classes.device)[:, None]
        member = (self.classes[None] == labels) | (labels == NULL_CLASS)
        return log_w.masked_fill(~member, float("-inf"))


class AnalyticTeacher(nn.Module):
    """The exact Denoiser of a GaussianMixture under a schedule: x_hat = teacher(z_t, t, cond)."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t.to(torch.float64))
        return self.mixture.posterior_mean(z_t, alpha, sigma, cond["c"])

    def score(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """grad log p_t(z_t | c) = (alpha_t x_hat - z_t) / sigma_t^2."""
        alpha, sigma = (broadcast_like(v.to(z_t.dtype), z_t) for v in self.schedule.alpha_sigma(t))
        return (alpha * self(z_t, t, cond) - z_t) / sigma**2
