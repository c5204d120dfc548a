"""What every one-step (or few-step re-noising) generator method shares: kd and dmd both train a
generator G(z, c) = x_hat_G(z, t = 1, c), regress it onto the teacher's ODE pairs (KD's whole loss,
DMD's regression term), record it the same way and check its job the same way.

    L_reg = E d(G(z, c), x_ode),   d = mean squared error, the pseudo-Huber distance
            sqrt(||G - x_ode||^2 + c_H^2) - c_H with c_H = 0.00054 sqrt(dim) (Song & Dhariwal 2023),
            or LPIPS (Zhang et al. 2018; DMD's distance for its regression loss)

LPIPS comes only from a local file (`lpips:`), never downloaded: a TorchScript module called as
`lpips(x, y)` on images in [-1, 1] with 3 channels, returning the per-sample distance ([B] or
[B, 1, 1, 1], the `lpips` package's output; a spatial map is averaged). Greyscale images are
repeated to 3 channels and images under 224 pixels are resized to 224 x 224 (bilinear), as
Song et al. (2023) do. Export one where weights can be fetched, e.g.
`torch.jit.trace(lpips.LPIPS(net="vgg"), (x, y)).save("lpips_vgg.pt")` with x, y two
[1, 3, 224, 224] images.

`one_step` and `pair_regression` are the one implementation of the generator's evaluation and of
the regression loss.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.conditions import batch_cond
from raydistill.config import ConfigError, ModelConfig, TrainJob, require
from raydistill.diffusion.guidance import Cond
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.guided import check_continuous_teacher
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.denoiser import denoise


@dataclass
class RegressionConfig:
    """How a generator is regressed onto the teacher's ODE pairs: kd's section (`kd:`), and part
    of dmd's (`dmd:`, for its regression term)."""

    #: mean squared error, the pseudo-Huber distance, or LPIPS from the TorchScript module at
    #: `lpips` (see the module docstring)
    distance: Literal["mse", "pseudo_huber", "lpips"] = "mse"
    lpips: str = ""                  # a local TorchScript LPIPS file, for distance: lpips

    def validate(self) -> None:
        if self.distance == "lpips":
            require(bool(self.lpips), "lpips", "is required with distance: lpips (a TorchScript "
                                               "LPIPS file on local disk; none is downloaded)")
            require(os.path.isfile(self.lpips), "lpips", f"no such file: {self.lpips}")
        else:
            require(not self.lpips, "lpips", f"is given but distance is {self.distance}")


def one_step(generator: nn.Module, config: ModelConfig, schedule: Schedule, z: Tensor,
             cond: Cond) -> Tensor:
    """G(z, c): the generator's x_hat from pure noise z at t = 1 under condition `cond`."""
    t = torch.ones(len(z), device=z.device, dtype=z.dtype)
    return denoise(generator, schedule, config.prediction, z, t, cond)


#: per-sample d(x, y) [B] of two batches
Distance = Callable[[Tensor, Tensor], Tensor]
LPIPS_RESOLUTION = 224


def distance(x: Tensor, y: Tensor, kind: str) -> Tensor:
    """Per-sample d(x, y): "mse" (mean over elements) or "pseudo_huber" (see the docstring)."""
    squared = (x - y).pow(2).flatten(1)
    if kind == "mse":
        return squared.mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(squared.shape[1])
        return (squared.sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown distance {kind!r} (expected mse or pseudo_huber)")


def lpips_distance(lpips: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample LPIPS(x, y) of images [B, C, H, W] in [-1, 1] (see the docstring)."""
    pair = torch.cat([x, y]).float()
    if pair.shape[1] == 1:
        pair = pair.repeat(1, 3, 1, 1)
    if min(pair.shape[-2:]) < LPIPS_RESOLUTION:
        pair = F.interpolate(pair, size=(LPIPS_RESOLUTION, LPIPS_RESOLUTION), mode="bilinear",
                             align_corners=False)
    x, y = pair.chunk(2)
    return lpips(x, y).reshape(len(x), -1).mean(1)


def load_lpips(path: str) -> nn.Module:
    """The frozen TorchScript LPIPS module at `path` (ConfigError naming `lpips` otherwise)."""
    try:
        module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ConfigError("lpips", f"{path} is not a TorchScript LPIPS module "
                                   f"({str(err).splitlines()[0]})") from None
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def make_distance(kind: str, lpips: str, device: torch.device) -> Distance:
    """The job's `distance` as a function: LPIPS built once, on `device`."""
    if kind == "lpips":
        return functools.partial(lpips_distance, load_lpips(lpips).to(device))
    return functools.partial(distance, kind=kind)


def pair_regression(generator: nn.Module, config: ModelConfig, schedule: Schedule,
                    pairs: dict[str, Tensor], d: Distance) -> Tensor:
    """E d(G(noise, c), image) over a batch of ODE pairs, made at the job's one w (a generator of
    a w-conditioned teacher takes it as its input; any other has it built in)."""
    x = one_step(generator, config, schedule, pairs["noise"], batch_cond(pairs))
    return d(x, pairs["image"]).mean()



def generator_meta(method: str, w: float, steps: int) -> dict:
    """What a generator's checkpoint records: sampled by the re-noising sampler of
    raydistill.diffusion.multistep in `steps` steps (one step: its x_hat at t = 1), with guidance
    w built in."""
    return {"method": method, "steps": steps, "stochastic": True, "sampler": "renoise",
            "w_min": w, "w_max": w}


def check_generator_job(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    """A generator (kd, dmd) takes (z, c) and has its teacher's one guidance strength built in
    (a w-conditioned teacher's generator is fed that w); an LPIPS distance loads, for images."""
    check_continuous_teacher(teacher, "teacher.checkpoint")
    if job.loss_weighting != TrainJob.loss_weighting:
        raise ConfigError("loss_weighting", f"does not apply to method {job.method}: dmd's fake "
                                            "score is weighted by dmd.fake_weighting (default "
                                            "output, unit weight on its own output as in DMD2; "
                                            "for a v-prediction fake score that is what "
                                            "snr_plus_one was)")
    regression: RegressionConfig = job.settings
    if regression.distance == "lpips":
        key = f"{job.method}.distance"
        if len(teacher.data_shape) != 3:
            raise ConfigError(key, f"lpips compares images; the teacher's samples have shape "
                                   f"{list(teacher.data_shape)}")
        if teacher.conditioning.autoencoder_path:
            raise ConfigError(key, "lpips compares images; a latent teacher's samples are latents "
                                   "(use pseudo_huber or mse)")
        try:
            load_lpips(regression.lpips)
        except ConfigError as err:
            raise err.under(job.method) from None
    if student.w_conditioned and not teacher.config.w_conditioned:
        raise ConfigError("student", "a generator takes no w input (its guidance strength is "
                                     "built in); only a w-conditioned teacher's generator keeps "
                                     "its w input, fed the job's one w")
    if job.guidance.w_min != job.guidance.w_max:
        raise ConfigError("guidance", "a generator distils one guidance strength: set "
                                      "w_min = w_max")


def check_ode_pairs(job: TrainJob, identity: dict) -> None:
    """ODE pairs from the deterministic solver: a stochastic sampler's image is not a function of
    the noise."""
    if identity.get("stochastic"):
        raise ConfigError("pairs", f"{job.pairs} was sampled with the stochastic sampler; "
                                   "regression needs ODE pairs (pairs --mode ode, stochastic false)")
