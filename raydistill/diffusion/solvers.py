"""Deterministic samplers as plain functions over one Denoiser contract:

    x_hat = denoiser(z_t, t, cond)        t: per-sample times [B] in [0, 1]

Notation: a step goes from time t to an earlier time s < t; alpha_t, sigma_t from the schedule;
eps_hat = (z_t - alpha_t x_hat) / sigma_t. Every solver works on the probability-flow ODE, which in
the variables (z / alpha, sigma / alpha) reads d(z/alpha) = eps_hat d(sigma/alpha). DDIM is Euler in
those variables; Heun and DPM-Solver++(2M) are second order.

None of these is wrapped in no_grad: students roll them out differentiably. Wrap teacher calls at
the call site.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from raydistill.diffusion.guidance import CFG, Cond, Denoiser
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule

Solver = Literal["ddim", "heun", "dpmpp_2m"]
SOLVERS: tuple[str, ...] = ("ddim", "heun", "dpmpp_2m")
Spacing = Literal["uniform_t", "uniform_logsnr"]
SPACINGS: tuple[str, ...] = ("uniform_t", "uniform_logsnr")


def time_grid(
    steps: int,
    schedule: Schedule,
    *,
    spacing: Spacing = "uniform_t",
    t_start: float = 1.0,
    t_end: float = 0.0,
) -> Tensor:
    """steps + 1 decreasing times from t_start to t_end, uniform in t or in log-SNR, each at the
    noise level the schedule gives it (a discrete schedule's timesteps: see Schedule.snap)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    grid = schedule.snap(_grid(steps, schedule, spacing, t_start, t_end))
    if not bool((grid.diff() < 0).all()):
        raise ValueError(f"{steps} steps spaced {spacing} put two steps on one of the schedule's "
                         "timesteps; use fewer steps")
    return grid


def _grid(steps: int, schedule: Schedule, spacing: str, t_start: float, t_end: float) -> Tensor:
    if spacing == "uniform_t":
        return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if spacing == "uniform_logsnr":
        ends = torch.tensor([t_start, t_end], dtype=torch.float64)
        if not torch.isfinite(schedule.logsnr(ends[1:])).all():
            # t_end is the clean image (discrete schedules): space the grid up to the last noise
            # level, just after t_end (a billionth of the span: no denormals under flush-to-zero)
            ends[1] = t_end + 1e-9 * (t_start - t_end)
        ends = schedule.logsnr(ends)
        grid = schedule.t_from_logsnr(torch.linspace(ends[0], ends[1], steps + 1, dtype=torch.float64))
        grid[0], grid[-1] = t_start, t_end
        return grid
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")


def _per_sample(value: Tensor, z: Tensor) -> Tensor:
    """A scalar time as a per-sample [B] tensor in z's dtype."""
    return torch.full((z.shape[0],), float(value), dtype=z.dtype, device=z.device)


def ddim_step(
    denoiser: Denoiser, z_t: Tensor, t: Tensor, s: Tensor, cond: Cond, schedule: Schedule
) -> Tensor:
    """One deterministic DDIM step z_t -> z_s (Song et al. 2021, eq. 12 with eta = 0).

    t and s are per-sample [B] times, so a batch may step from different times.
    """
    alpha_t, sigma_t = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(t))
    alpha_s, sigma_s = (broadcast_like(v, z_t) for v in schedule.alpha_sigma(s))
    x_hat = denoiser(z_t, t, cond)
    return ddim_update(z_t=z_t, x_hat=x_hat, alpha_t=alpha_t, sigma_t=sigma_t,
                       alpha_s=alpha_s, sigma_s=sigma_s)


def ddim_update(
    *, z_t: Tensor, x_hat: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> Tensor:
    """z_s = alpha_s x_hat + sigma_s eps_hat, the DDIM update for a given x_hat."""
    eps_hat = (z_t - alpha_t * x_hat) / sigma_t
    return alpha_s * x_hat + sigma_s * eps_hat


def ddim(denoiser: Denoiser, z: Tensor, ts: Tensor, cond: Cond, schedule: Schedule) -> Tensor:
    """DDIM over a decreasing time grid ts (Song et al. 2021)."""
    for t, s in zip(ts[:-1], ts[1:]):
        z = ddim_step(denoiser, z, _per_sample(t, z), _per_sample(s, z), cond, schedule)
    return z


def heun(denoiser: Denoiser, z: Tensor, ts: Tensor, cond: Cond, schedule: Schedule) -> Tensor:
    """Heun's predictor-corrector (Karras et al. 2022, Algorithm 1) in exponential-integrator form.

    With l = lambda / 2 = log(alpha / sigma) and h = l_s - l_t, the PF-ODE solution is
    z_s = (sigma_s / sigma_t) z_t + sigma_s int e^l x_hat dl (Lu et al. 2022). The predictor is DDIM
    (x_hat constant); the corrector takes x_hat linear in l between x_hat(z_t) and x_hat at the
    prediction, which integrates exactly to

        z_s = (sigma_s / sigma_t) z_t + alpha_s (1 - e^-h) x_t + alpha_s (h - 1 + e^-h) / h (x_s - x_t)

    Second order, and stable across the huge sigma / alpha range of a clipped schedule, where the
    textbook trapezoid in sigma / alpha is not. A step to sigma = 0 (the clean image of a discrete
    schedule) is the predictor alone, x_t, as in Karras et al.
    """
    half_lambda = 0.5 * schedule.logsnr(ts)
    alphas, sigmas = schedule.alpha_sigma(ts)
    for i in range(len(ts) - 1):
        t, s = _per_sample(ts[i], z), _per_sample(ts[i + 1], z)
        h = half_lambda[i + 1] - half_lambda[i]
        x_t = denoiser(z, t, cond)
        z_pred = (sigmas[i + 1] / sigmas[i]) * z - alphas[i + 1] * torch.expm1(-h) * x_t
        if sigmas[i + 1] == 0:
            z = z_pred.to(z.dtype)
            continue
        x_s = denoiser(z_pred.to(z.dtype), s, cond)
        correction = alphas[i + 1] * (h + torch.expm1(-h)) / h
        z = (z_pred + correction * (x_s - x_t)).to(z.dtype)
    return z


def dpmpp_2m(denoiser: Denoiser, z: Tensor, ts: Tensor, cond: Cond, schedule: Schedule) -> Tensor:
    """DPM-Solver++(2M), the multistep data-prediction solver (Lu et al. 2022, Algorithm 2).

    The last step is first order (as diffusers' `lower_order_final`): it ends at t = 0 where the
    log-SNR jumps (to +inf for a discrete schedule, where it lands on x_hat), and a second-order
    correction across that jump is unstable at few steps.
    """
    logsnr = schedule.logsnr(ts)
    alphas, sigmas = schedule.alpha_sigma(ts)
    half_lambda = 0.5 * logsnr                  # the paper's lambda = log(alpha / sigma)
    x_prev, h_prev = None, None
    for i in range(len(ts) - 1):
        x_hat = denoiser(z, _per_sample(ts[i], z), cond)
        h = half_lambda[i + 1] - half_lambda[i]
        if x_prev is None or i == len(ts) - 2:
            d = x_hat                           # first and last steps are first order
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x_hat - (1 / (2 * r)) * x_prev
        z = (sigmas[i + 1] / sigmas[i]) * z - alphas[i + 1] * torch.expm1(-h) * d
        z = z.to(x_hat.dtype)
        x_prev, h_prev = x_hat, h
    return z


_SOLVERS = {"ddim": ddim, "heun": heun, "dpmpp_2m": dpmpp_2m}


def solve(
    denoiser: Denoiser, z: Tensor, ts: Tensor, cond: Cond, schedule: Schedule, solver: Solver
) -> Tensor:
    """Integrate the PF-ODE from ts[0] to ts[-1] with the named solver."""
    if solver not in _SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    return _SOLVERS[solver](denoiser, z, ts, cond, schedule)


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Cond,
    schedule: Schedule,
    *,
    steps: int,
    solver: Solver = "ddim",
    w: float | Tensor | None = None,
    spacing: Spacing = "uniform_t",
) -> Tensor:
    """Sample x from noise z_1 in `steps` solver steps; with w, under classifier-free guidance."""
    ts = time_grid(steps, schedule, spacing=spacing).to(noise.device)
    if w is not None:
        w = torch.as_tensor(w, dtype=noise.dtype, device=noise.device).expand(noise.shape[0])
        denoiser, cond = CFG(denoiser), {**cond, "w": w}
    return solve(denoiser, noise, ts, cond, schedule, solver)
