"""Noise schedules in one convention: continuous t in [0, 1], variance preserving.

    alpha_t^2 + sigma_t^2 = 1,   lambda_t = log(alpha_t^2 / sigma_t^2)  (log-SNR, decreasing in t)

so alpha_t^2 = sigmoid(lambda_t) and sigma_t^2 = sigmoid(-lambda_t). Every schedule only has to say
lambda(t) and its inverse t(lambda); alpha and sigma follow. Discrete DDPM teachers (1000 steps) are
mapped onto the same t so solvers never see native timesteps.

Training draws t from U(0, 1] (`uniform_t`): t = 0 is where samplers end, the clean image (exactly
so for discrete schedules, whose log-SNR is infinite there), not a noise level to learn.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Schedule(ABC):
    """A VP schedule given by its log-SNR lambda(t) on t in [0, 1]."""

    @abstractmethod
    def logsnr(self, t: Tensor) -> Tensor:
        """lambda(t), elementwise."""

    @abstractmethod
    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """The inverse t(lambda), elementwise."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        logsnr = self.logsnr(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def snap(self, t: Tensor) -> Tensor:
        """The time whose noise level t stands for: t itself on a continuous schedule, a native
        timestep's on a discrete one (DiscreteSchedule)."""
        return t

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[1]


def uniform_t(n: int, *, generator: torch.Generator | None = None, device=None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """n training times t ~ U(0, 1] (never 0, the clean image)."""
    return 1.0 - torch.rand(n, generator=generator, device=device, dtype=dtype)


class CosineSchedule(Schedule):
    """Cosine VP schedule with log-SNR clipped to [logsnr_min, logsnr_max].

    lambda(t) = -2 log tan(a t + b), with b, a chosen so lambda(0) = logsnr_max and
    lambda(1) = logsnr_min (Nichol & Dhariwal 2021; the clipped form of Salimans & Ho 2022).
    """

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})")
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self._b = math.atan(math.exp(-0.5 * logsnr_max))
        self._a = math.atan(math.exp(-0.5 * logsnr_min)) - self._b

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-0.5 * logsnr)) - self._b) / self._a


class DiscreteSchedule(Schedule):
    """The N-step DDPM schedule of a discrete teacher, on its own timesteps.

    Native timestep n in {0, ..., N-1} has alpha_bar_n = prod_{i<=n} (1 - beta_i). Time t stands
    for the native timestep n(t) = round(N t) - 1 (t = (n + 1) / N), the convention of diffusers'
    "trailing" timestep spacing: t = 1 is the last timestep N - 1 (alpha_1 small but not zero),
    and `steps` uniform steps in t land on the native timesteps diffusers' DDIM visits with
    `steps` inference steps (999, 749, 499, 249 for 4 of 1000; 999, 666, 332 for 3, rounded as
    diffusers rounds). Every t > 0 is a native timestep's noise level, at least timestep 0's: the
    network is evaluated only at the timesteps it was trained on, at exactly the noise level it
    sees, as DMD2 draws integer timesteps. t = 0 is n = -1, the clean image: alpha = 1, sigma = 0,
    lambda = +inf, as diffusers' DDIM ends with `set_alpha_to_one`, so every sampler ends on x_hat.
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = len(betas)
        self.logsnr_table = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        self._sigma2_first = float(1.0 - alpha_bar[0])

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. (2020) linear betas."""
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ):
        """Stable Diffusion's betas: linear in sqrt(beta)."""
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        return cls(root**2)

    @classmethod
    def squaredcos_cap_v2(cls, num_timesteps: int = 1000):
        """Nichol & Dhariwal's (2021) cosine alpha_bar discretised, betas capped at 0.999
        (diffusers' `squaredcos_cap_v2`)."""
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return cls((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999))

    def timestep(self, t: Tensor) -> Tensor:
        """The native timestep n(t) = round(N t) - 1 in {0, ..., N - 1} for t > 0, -1 at t = 0
        (the clean image, where no network is evaluated); what adapters feed the teacher."""
        n = (torch.round(t * self.num_timesteps) - 1).clamp(0, self.num_timesteps - 1)
        return torch.where(t > 0, n, -torch.ones_like(n))

    def snap(self, t: Tensor) -> Tensor:
        return (self.timestep(t) + 1) / self.num_timesteps

    def logsnr(self, t: Tensor) -> Tensor:
        table = self.logsnr_table.to(device=t.device)
        n = self.timestep(t.to(torch.float64)).long()
        inf = torch.full_like(table[:1], torch.inf)
        return torch.where(n >= 0, table[n.clamp(min=0)], inf).to(t.dtype)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """t for lambda between the native timesteps' (n interpolated in the table; below
        timestep 0's, sigma^2 falling linearly to 0 at t = 0): `logsnr` maps it to a neighbouring
        timestep's level, and a timestep's own lambda back to it exactly."""
        # lambda is strictly decreasing in n: search the negated (increasing) table.
        table = (-self.logsnr_table).to(device=logsnr.device)
        x = (-logsnr.to(torch.float64)).clamp(max=table[-1])
        hi = torch.searchsorted(table, x).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        n = lo + (x - table[lo]) / (table[hi] - table[lo])
        below = torch.sigmoid(x) / self._sigma2_first - 1          # sigma^2 = sigmoid(-lambda)
        n = torch.where(x >= table[0], n, below)
        return ((n + 1) / self.num_timesteps).to(logsnr.dtype)
