"""The teacher's work for one shard, in pure torch (Ray workers and the bare benchmark both call it).

Shard k has seed shard_seed(run_seed, k); its sample i draws its inputs from its own generator
seeded with derive_seed(shard_seed, i) (recorded as the sample's `seed`), so a shard, and each
sample in it, can be regenerated and checked independently of batching.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from raydistill.conditions import TEXT
from raydistill.config import ConfigError, PairsJob
from raydistill.data import load_images
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.gmm import GaussianMixture
from raydistill.pairs.modes import MODES, Teacher
from raydistill.seeds import derive_seed


def shard_seed(run_seed: int, shard: int) -> int:
    """The seed of shard k; its samples use derive_seed(shard_seed, i)."""
    return derive_seed(run_seed, shard)


def real_data(job: PairsJob, teacher: Checkpoint) -> Tensor | GaussianMixture:
    """The real x that guided and progressive targets start from: the training images, which must
    fit the teacher, or an analytic teacher's own mixture."""
    if job.data.source == "mixture":
        if teacher.config.kind != "gmm":
            raise ConfigError("data.source", "mixture needs an analytic (gmm) teacher")
        return teacher.network
    images = load_images(job.data).train.images
    image_shape = teacher.conditioning.image_shape
    if tuple(images.shape[1:]) != image_shape:
        raise ConfigError("data.resolution", f"data shape {tuple(images.shape[1:])} does not "
                                             f"match the teacher's {image_shape}")
    return images


class ShardMaker:
    """Computes the columns of shard k for a PairsJob and a loaded teacher (what each column is:
    the job's mode, raydistill.pairs.modes)."""

    def __init__(self, job: PairsJob, teacher: Checkpoint, device: torch.device | str = "cpu"):
        self.job, self.mode, self.device = job, MODES[job.mode], torch.device(device)
        teacher.network.to(self.device)
        policy = teacher.sampling
        self.teacher = Teacher(teacher.w_denoiser, teacher.denoiser.schedule,
                               policy.is_stochastic_student, policy.stochastic_sampler)
        self.shape, self.conditions = teacher.data_shape, teacher.conditioning.conditions
        self.data = real_data(job, teacher) if self.mode.from_data else None
        # real images become a latent teacher's latents (ODE pairs start from noise: no images)
        self.autoencoder = teacher.conditioning.autoencoder if self.data is not None else None
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)

    def inputs(self, shard: int) -> dict[str, Tensor]:
        """The per-sample random inputs of shard k (CPU), each from its own seeded generator
        (an image: a latent teacher's is encoded per batch in `make`)."""
        job, rows = self.job, []
        base = shard_seed(job.seed, shard)
        for i in range(job.samples_per_shard):
            seed = derive_seed(base, i)
            g = torch.Generator().manual_seed(seed)
            c = torch.randint(0, self.conditions.num_classes, (), generator=g)
            w = job.guidance.w_min + (job.guidance.w_max - job.guidance.w_min) \
                * torch.rand((), generator=g)
            drawn = self.mode.draw(job, g, self.shape, functools.partial(self._draw_x, c, g))
            rows.append({"seed": torch.tensor(seed), "c": c, "w": w, **drawn})
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def _draw_x(self, c: Tensor, g: torch.Generator) -> Tensor:
        if isinstance(self.data, GaussianMixture):
            return self.data.sample(c.reshape(1), generator=g)[0].float()
        return self.data[torch.randint(0, len(self.data), (), generator=g)]

    @torch.no_grad()
    def make(self, shard: int) -> dict[str, np.ndarray]:
        """The columns of shard k (see raydistill.pairs.format for the schema per mode), with a
        text model's encoder_hidden_states."""
        inputs = self.inputs(shard)
        columns: dict[str, list[Tensor]] = {}
        for start in range(0, self.job.samples_per_shard, self.job.batch_size):
            batch = {k: v[start:start + self.job.batch_size].to(self.device) for k, v in inputs.items()}
            if "x" in batch and self.autoencoder is not None:
                batch["x"] = self.autoencoder.encode(batch["x"])
            cond = self.conditions.cond(batch["c"], batch["w"])
            for key, value in self.mode.compute(self.job, self.teacher, batch, cond).items():
                columns.setdefault(key, []).append(value.cpu())
            if TEXT in cond:
                columns.setdefault(TEXT, []).append(cond[TEXT].cpu())
        out = {key: torch.cat(parts).numpy() for key, parts in columns.items()}
        out.update(c=inputs["c"].numpy(), w=inputs["w"].numpy(), seed=inputs["seed"].numpy())
        return out
