"""Knowledge distillation into a one-step generator (Luhman & Luhman 2021).

Notation: z ~ N(0, I) the noise at t = 1; x_ode = Solve_{1 -> 0}(z; teacher, c, w), the teacher's
ODE solution under guidance w, precomputed by `raydistill pairs --mode ode`; the generator
G(z, c) = x_hat_G(z, t = 1, c), its network's x-prediction at the highest noise level (so it
starts as the teacher's one-step DDIM when initialised from the teacher).

    L_KD = E d(G(z, c), x_ode),    d = mean squared error, the pseudo-Huber distance
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
this loss: DMD's regression term (raydistill.methods.dmd) calls them too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.conditions import batch_cond
from raydistill.config import ConfigError, ModelConfig, TrainJob
from raydistill.diffusion.guidance import Cond
from raydistill.diffusion.schedule import Schedule
from raydistill.methods.base import PAIRS, Method, MethodSpec, Phase
from raydistill.methods.guided import check_continuous_teacher
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.denoiser import denoise


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


class KnowledgeDistillation(Method):
    student_module = "generator"

    def __init__(self, *, generator: nn.Module, config: ModelConfig, schedule: Schedule,
                 distance: Distance, w: float, steps: int):
        self.generator, self.config, self.schedule = generator, config, schedule
        self.distance, self.w, self.steps = distance, w, steps

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def phases(self) -> list[Phase]:
        return [Phase("generator", "generator", reads=(PAIRS,))]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        return {"loss": pair_regression(self.generator, self.config, self.schedule, batch[PAIRS],
                                        self.distance)}


# ------------------------------------------------------------------------- registry entry


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
    if job.distance == "lpips":
        if len(teacher.data_shape) != 3:
            raise ConfigError("distance", f"lpips compares images; the teacher's samples have "
                                          f"shape {list(teacher.data_shape)}")
        if teacher.autoencoder_path:
            raise ConfigError("distance", "lpips compares images; a latent teacher's samples are "
                                          "latents (use pseudo_huber or mse)")
        load_lpips(job.lpips)
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


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_generator_job(job, teacher, student)
    if not job.pairs:
        raise ConfigError("pairs", "kd trains on ODE pairs: make them with `raydistill pairs "
                                   "--mode ode` and give their directory")


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> KnowledgeDistillation:
    return KnowledgeDistillation(generator=student, config=student_config,
                                 schedule=teacher.denoiser.schedule,
                                 distance=make_distance(job.distance, job.lpips,
                                                        next(student.parameters()).device),
                                 w=job.guidance.w_min, steps=job.optim.steps)


SPEC = MethodSpec(name="kd", pairs_mode="ode",
                  round_length=lambda job: ("optim.steps", job.optim.steps),
                  student=lambda config: config, check=_check, check_pairs=check_ode_pairs,
                  record=lambda job, index: generator_meta("kd", job.guidance.w_min, steps=1),
                  build=_build, modules=("generator",), streams=lambda job: (PAIRS,))
