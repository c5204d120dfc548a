"""Adapters from networks to the Denoiser contract x_hat = denoiser(z_t, t, cond)."""

from __future__ import annotations

from torch import Tensor, nn

from raydistill.config import ScheduleConfig
from raydistill.diffusion.guidance import Cond
from raydistill.diffusion.parameterization import Prediction, broadcast_like, x_from_prediction
from raydistill.diffusion.schedule import CosineSchedule, DiscreteSchedule, Schedule


def make_schedule(config: ScheduleConfig) -> Schedule:
    if config.kind == "cosine":
        return CosineSchedule(config.logsnr_min, config.logsnr_max)
    if config.kind == "squaredcos_cap_v2":
        return DiscreteSchedule.squaredcos_cap_v2(config.num_timesteps)
    if config.kind in ("linear", "scaled_linear"):
        betas = {key: value for key in ("beta_start", "beta_end")
                 if (value := getattr(config, key)) is not None}
        return getattr(DiscreteSchedule, config.kind)(config.num_timesteps, **betas)
    raise ValueError(f"unknown schedule kind {config.kind!r}")


def denoise(net: nn.Module, schedule: Schedule, prediction: Prediction, z_t: Tensor, t: Tensor,
            cond: Cond) -> Tensor:
    """x_hat of a network net(z_t, t, cond) that predicts eps, x or v, in z_t's dtype."""
    out = net(z_t, t, cond).to(z_t.dtype)
    alpha, sigma = (broadcast_like(v.to(z_t.dtype), z_t) for v in schedule.alpha_sigma(t))
    return x_from_prediction(prediction, z=z_t, out=out, alpha=alpha, sigma=sigma)


class ModelDenoiser(nn.Module):
    """Wraps a network net(z_t, t, cond) predicting eps, x or v so that it returns x_hat."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: Prediction):
        super().__init__()
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return denoise(self.net, self.schedule, self.prediction, z_t, t, cond)


class EvaluationCounter:
    """Counts the samples the modules it watches evaluate, through a forward pre-hook on each (a
    Denoiser or a network; a CFG call's [2B] batch counts 2B): what a stage spent, as it ran."""

    def __init__(self):
        self.count = 0

    def watch(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self._add)

    def _add(self, module: nn.Module, args: tuple) -> None:
        self.count += args[0].shape[0]

    def take(self) -> int:
        """The samples counted since the last call, and restart the count."""
        counted, self.count = self.count, 0
        return counted
