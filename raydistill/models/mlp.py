"""A small conditional MLP: the student architecture for the analytic mixture teacher, where a test
must train students in seconds on a CPU.

It sees z_t flattened, Fourier features of t, a class embedding with a null row (NULL_CLASS, for
classifier-free guidance) and, for w-conditioned students (guided students, Meng et al.), Fourier features of
w through a zero-initialised layer (the same conditioning as the UNet). Output has z_t's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.config import MLPConfig
from raydistill.diffusion.guidance import NULL_CLASS, Cond, fourier_embedding
from raydistill.models.unet import W_SCALE, zero_output_mlp


class MLP(nn.Module):
    #: parameters a w-conditioned student adds to its teacher's (zero-initialised)
    W_INPUTS = ("w_mlp.",)

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(config.num_classes + 1, width)
        self.w_mlp = zero_output_mlp(width, width) if config.w_embedding else None
        self.stem = nn.Linear(config.dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(),
                          nn.Linear(2 * width, width))
            for _ in range(config.depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.dim))

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        width, dtype = self.config.width, self.stem.weight.dtype     # bf16 under mixed precision
        labels = cond["c"].long()
        emb = self.time_mlp(fourier_embedding(1000.0 * t, width).to(dtype))
        emb = emb + self.class_emb(torch.where(labels == NULL_CLASS, self.config.num_classes, labels))
        if self.w_mlp is not None:
            emb = emb + self.w_mlp(fourier_embedding(W_SCALE * cond["w"], width).to(dtype))
        h = self.stem(z_t.reshape(len(z_t), -1).to(dtype)) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).reshape(z_t.shape)
