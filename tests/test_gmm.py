import math

import pytest
import torch

from raydistill.diffusion import NULL_CLASS
from raydistill.models import AnalyticTeacher, GaussianMixture


def test_posterior_mean_matches_monte_carlo(schedule):
    """E[x | z_t, c] by importance weighting of exact samples agrees with the closed form."""
    mix = GaussianMixture.random(num_classes=2, components_per_class=2, dim=2, seed=4)
    teacher = AnalyticTeacher(mix, schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.45], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    z = alpha * mix.means[0:1] + sigma * 0.3
    x = mix.sample(torch.zeros(400_000, dtype=torch.long), generator=g)
    log_lik = -((z - alpha * x) ** 2).sum(1) / (2 * sigma**2)
    weights = torch.softmax(log_lik, 0)
    monte_carlo = (weights[:, None] * x).sum(0)
    exact = teacher(z, t, {"c": torch.tensor([0])})[0]
    torch.testing.assert_close(exact, monte_carlo, rtol=0, atol=0.02)


def test_limits(teacher, schedule, batch):
    noise, cond = batch
    near_zero = torch.full((len(noise),), 1e-4, dtype=torch.float64)
    alpha, _ = schedule.alpha_sigma(near_zero)
    torch.testing.assert_close(teacher(noise, near_zero, cond), noise / alpha[:, None],
                               rtol=0, atol=1e-5)


def test_score_is_the_gradient_of_the_log_density(mixture, schedule):
    teacher = AnalyticTeacher(mixture, schedule)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    z = torch.randn(5, mixture.dim, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, NULL_CLASS])
    logits = mixture._class_log_weights(labels)
    var = alpha[:, None] ** 2 * mixture.stds[None] ** 2 + sigma[:, None] ** 2
    diff = z[:, None] - alpha[:, None, None] * mixture.means[None]
    log_p = (logits - 0.5 * diff.pow(2).sum(-1) / var
             - 0.5 * mixture.dim * torch.log(2 * math.pi * var)).logsumexp(1)
    (grad,) = torch.autograd.grad(log_p.sum(), z)
    torch.testing.assert_close(teacher.score(z.detach(), t, {"c": labels}), grad)


def test_sampling_statistics():
    mix = GaussianMixture.random(num_classes=2, components_per_class=1, dim=3, seed=2)
    x = mix.sample(torch.ones(50_000, dtype=torch.long), torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), mix.means[1], rtol=0, atol=0.01)
    torch.testing.assert_close(x.std(0), mix.stds[1].expand(3), rtol=0.02, atol=0)


def test_image_shape():
    mix = GaussianMixture.random(num_classes=2, components_per_class=1, dim=16, seed=0,
                                 shape=(1, 4, 4))
    x = mix.sample(torch.tensor([0, 1]))
    assert x.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="does not hold"):
        GaussianMixture.random(num_classes=2, components_per_class=1, dim=16, shape=(1, 3, 4))
