"""The one place where epsilon-, x- and v-predictions are converted (keyword-only, as in the papers).

    z_t = alpha_t x + sigma_t eps,     v = alpha_t eps - sigma_t x     (Salimans & Ho 2022, App. D)

and the x-space loss weightings of Salimans & Ho (2022, Sec. 4): with lambda the log-SNR,
||x_hat - x||^2 weighted by SNR = exp(lambda) is the epsilon loss, by SNR + 1 the v loss, and by
max(SNR, 1) their "truncated SNR" weighting; `output` is the plain squared error of a network's
own output, whatever it predicts (DMD2's fake-score loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "x", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x", "v")
Weighting = Literal["snr", "truncated_snr", "snr_plus_one", "constant"]
WEIGHTINGS: tuple[str, ...] = ("snr", "truncated_snr", "snr_plus_one", "constant")
OUTPUT = "output"                    # unit weight on the network's own output (output_weight)


def x_from_eps(*, z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - sigma * eps) / alpha


def eps_from_x(*, z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - alpha * x) / sigma


def x_from_v(*, z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * z - sigma * v


def v_from_x(*, z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (alpha * z - x) / sigma


def eps_from_v(*, z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * z + alpha * v


def v_from_eps(*, z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (eps - sigma * z) / alpha


def x_from_prediction(
    prediction: Prediction, *, z: Tensor, out: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """x_hat from a network output in the given parameterization."""
    if prediction == "x":
        return out
    if prediction == "eps":
        return x_from_eps(z=z, eps=out, alpha=alpha, sigma=sigma)
    if prediction == "v":
        return x_from_v(z=z, v=out, alpha=alpha, sigma=sigma)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def prediction_from_x(
    prediction: Prediction, *, z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """The network output that would give x, in the given parameterization (a training target)."""
    if prediction == "x":
        return x
    if prediction == "eps":
        return eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma)
    if prediction == "v":
        return v_from_x(z=z, x=x, alpha=alpha, sigma=sigma)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def prediction_target(
    prediction: Prediction, *, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """The regression target for a network predicting eps, x or v, given the clean x and noise eps
    (computed from x and eps directly, so no division by a small sigma)."""
    if prediction == "x":
        return x
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def x_jacobian(prediction: Prediction, *, alpha: Tensor, sigma: Tensor) -> Tensor:
    """|d x_hat / d output| for a network predicting eps, x or v at (alpha, sigma).

    An x-space loss weight(lambda) ||x_hat - x||^2 equals weight(lambda) J^2 ||out - target||^2 in
    the network's own parameterization, which avoids cancellation in x_hat - x at high SNR.
    """
    if prediction == "x":
        return torch.ones_like(sigma)
    if prediction == "eps":
        return sigma / alpha
    if prediction == "v":
        return sigma
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def loss_weight(weighting: Weighting, logsnr: Tensor) -> Tensor:
    """Per-sample weight of the x-space squared error ||x_hat - x||^2 (Salimans & Ho 2022)."""
    snr = torch.exp(logsnr)
    if weighting == "snr":
        return snr
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    if weighting == "constant":
        return torch.ones_like(snr)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def output_weight(weighting: str, prediction: Prediction, *, logsnr: Tensor, alpha: Tensor,
                  sigma: Tensor) -> Tensor:
    """Per-sample weight [B] of the squared error of a network's own output, ||out - target||^2:
    an x-space weighting times the squared Jacobian (the same loss as in x, without the
    cancellation in x_hat - x at high SNR; see x_jacobian), or 1 for `output`."""
    if weighting == OUTPUT:
        return torch.ones_like(logsnr)
    return loss_weight(weighting, logsnr) * x_jacobian(prediction, alpha=alpha, sigma=sigma) ** 2


def broadcast_like(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample values [B] reshaped to broadcast against a batch like [B, ...]."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
