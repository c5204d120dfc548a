"""Train a class-conditional diffusion teacher with label dropout, so it supports classifier-free
guidance (Ho & Salimans 2021): with probability p the label is replaced by the null class.

Per step: x ~ data, t ~ U[0, 1], eps ~ N(0, I), z_t = alpha_t x + sigma_t eps; the network output is
regressed on its own parameterization's target with the x-space weighting of Salimans & Ho (2022),
weight(lambda) ||x_hat - x||^2 = weight(lambda) J^2 ||out - target||^2. The EMA of the weights is
the teacher that gets saved.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from raydistill.conditions import Conditions
from raydistill.config import ConfigError, ModelConfig, TeacherJob
from raydistill.data import LabelledImages, Split, load_images
from raydistill.devices import resolve_device
from raydistill.diffusion.guidance import CFG, NULL_CLASS
from raydistill.diffusion.parameterization import (
    broadcast_like,
    output_weight,
    prediction_target,
)
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.models.checkpoint import Checkpoint, planned_checkpoint, save_checkpoint
from raydistill.models.denoiser import ModelDenoiser, make_schedule
from raydistill.models.unet import UNet
from raydistill.sampling import grid_png, sample_classes
from raydistill.schedules import ema_decay, lr_factor


@dataclass
class TeacherResult:
    fingerprint: str
    eval_loss_start: float             # held-out diffusion loss of the initial network
    eval_loss_end: float               # ... and of the saved EMA network
    log: list[dict] = field(default_factory=list)


def diffusion_loss(
    net: nn.Module, schedule: Schedule, prediction: str, weighting: str,
    x: Tensor, c: Tensor, t: Tensor, eps: Tensor,
) -> Tensor:
    """Mean weighted denoising loss of `net` on given (x, c, t, eps)."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha, sigma = broadcast_like(alpha_t, x), broadcast_like(sigma_t, x)
    z_t = alpha * x + sigma * eps
    out = net(z_t, t, {"c": c})
    target = prediction_target(prediction, x=x, eps=eps, alpha=alpha, sigma=sigma)
    weight = output_weight(weighting, prediction, logsnr=schedule.logsnr(t), alpha=alpha_t,
                           sigma=sigma_t)
    return (weight * (out - target).pow(2).flatten(1).mean(1)).mean()


def trained_model(job: TeacherJob, split: Split) -> ModelConfig:
    """The network the teacher trains: the configured UNet with the data's channels, resolution
    and class count (the null class for CFG is added on top)."""
    images = split.train.images
    unet = dataclasses.replace(job.model.unet, in_channels=images.shape[1],
                               resolution=images.shape[-1], num_classes=split.num_classes)
    try:
        unet.validate()
    except ConfigError as err:
        raise err.under("model.unet") from None
    return dataclasses.replace(job.model, unet=unet)


def planned_teacher(job: TeacherJob) -> Checkpoint:
    """The teacher `job` will train, without training it (its network on the meta device): what
    the checks of the jobs that read it see before it exists."""
    return planned_checkpoint(trained_model(job, load_images(job.data)),
                              {"trained_on": job.data.source}, "planned:teacher")


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_teacher(job: TeacherJob, out: str, *, progress: bool = True) -> TeacherResult:
    """Train the teacher `job` describes and save it (EMA weights) as a checkpoint in `out`."""
    if job.threads:
        torch.set_num_threads(job.threads)
    # Zero-initialised output layers make early gradients and Adam moments denormal floats,
    # which run ~20x slower on x86 CPUs; flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    torch.manual_seed(job.seed)
    device = resolve_device(job.device)
    split = load_images(job.data).to(device)
    job = dataclasses.replace(job, model=trained_model(job, split))
    unet = job.model.unet
    schedule = make_schedule(job.model.schedule)
    prediction, weighting = job.model.prediction, job.loss_weighting
    net = UNet(unet).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    optim = torch.optim.AdamW(net.parameters(), lr=job.optim.lr,
                              weight_decay=job.optim.weight_decay)
    g = torch.Generator().manual_seed(job.seed)
    held_out = _fixed_batch(split.test, job.seed + 1, device)

    def eval_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(diffusion_loss(model, schedule, prediction, weighting, *held_out))

    result = TeacherResult("", eval_loss(net), math.nan)
    train = split.train
    bar = tqdm(range(job.optim.steps), desc="teacher", disable=not progress, mininterval=1.0)
    running = 0.0
    for step in bar:
        idx = torch.randint(0, len(train), (job.optim.batch_size,), generator=g).to(device)
        x, c = train.images[idx], train.labels[idx]
        drop = (torch.rand(len(c), generator=g) < job.label_dropout).to(device)
        c = torch.where(drop, NULL_CLASS, c)
        t = uniform_t(len(c), generator=g).to(device)
        eps = torch.randn(x.shape, generator=g).to(device)
        for group in optim.param_groups:
            group["lr"] = job.optim.lr * lr_factor(step, job.optim.warmup_steps, job.optim.steps)
        loss = diffusion_loss(net, schedule, prediction, weighting, x, c, t, eps)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if job.optim.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), job.optim.grad_clip)
        optim.step()
        ema_update(ema, net, ema_decay(job.optim.ema_decay, step))
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == job.optim.steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            result.log.append({"step": step, "loss": loss.item(), "loss_smooth": running,
                               "lr": optim.param_groups[0]["lr"]})

    result.eval_loss_end = eval_loss(ema)
    extra = {"trained_on": job.data.source, "train_steps": job.optim.steps,
             "eval_loss_start": result.eval_loss_start, "eval_loss_end": result.eval_loss_end}
    images, _ = sample_classes(CFG(ModelDenoiser(ema, schedule, prediction)), schedule,
                               shape=(unet.in_channels, unet.resolution, unet.resolution),
                               conditions=Conditions(unet.num_classes), sampler=job.preview,
                               seed=job.seed,
                               device=device)
    files = {"train_log.jsonl": "".join(json.dumps(row) + "\n" for row in result.log).encode(),
             "preview.png": grid_png(images, unet.num_classes)}
    result.fingerprint = save_checkpoint(out, ema, job.model, extra, files)
    return result


def _fixed_batch(data: LabelledImages, seed: int, device: torch.device,
                 size: int = 256) -> tuple[Tensor, ...]:
    """A fixed (x, c, t, eps) batch from held-out data: the same loss before and after training."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (size,), generator=g).to(device)
    x = data.images[idx]
    t, eps = uniform_t(size, generator=g), torch.randn(x.shape, generator=g)
    return x, data.labels[idx], t.to(device), eps.to(device)
