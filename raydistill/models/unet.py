"""A compact conditional UNet for pixel teachers and students (Ho et al. 2020; Dhariwal & Nichol 2021).

net(z_t, t, cond) -> raw output in the configured parameterization (eps, x or v); wrap it in
ModelDenoiser to get x_hat. Conditioning, all added to one embedding vector per sample:
  - t: Fourier features of 1000 t, then an MLP;
  - c: a class embedding with one extra row for the null class (NULL_CLASS = -1), for CFG;
  - w (optional, Meng et al. 2023): Fourier features of W_SCALE w, then an MLP whose last layer
    starts at zero, so a w-conditioned student initialised from its teacher starts equal to it.

With `checkpoint_activations` set (training's memory.activation_checkpointing), each down and up
block recomputes its activations in the backward pass instead of holding them (the bottleneck's,
the smallest, are held).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raydistill.config import UNetConfig
from raydistill.diffusion.guidance import NULL_CLASS, Cond, fourier_embedding

W_SCALE = 100.0  # spreads w in [0, ~10] over the Fourier frequencies, as 1000 does for t in [0, 1]


def zero_output_mlp(features: int, dim: int) -> nn.Sequential:
    """Fourier features -> embedding, last layer zero-initialised: a new conditioning input (w)
    that leaves the network's output unchanged until it is trained."""
    mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm, self.heads = _norm(channels), heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Conditional UNet; see the module docstring for the conditioning."""

    #: parameters a w-conditioned student adds to its teacher's (zero-initialised)
    W_INPUTS = ("w_mlp.",)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config, self.checkpoint_activations = config, False
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim)
        self.w_mlp = zero_output_mlp(ch, emb_dim) if config.w_embedding else None

        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        widths = [ch * m for m in config.channel_mult]
        self.down, skips, c_prev, res = nn.ModuleList(), [ch], ch, config.resolution
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                self.down.append(self._block(c_prev, width, emb_dim, res))
                c_prev = width
                skips.append(c_prev)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c_prev, c_prev, 3, stride=2, padding=1))
                skips.append(c_prev)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c_prev, c_prev, emb_dim, config.dropout),
                                  Attention(c_prev),
                                  ResBlock(c_prev, c_prev, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._block(c_prev + skips.pop(), width, emb_dim, res))
                c_prev = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.out = nn.Sequential(_norm(c_prev), nn.SiLU(),
                                 nn.Conv2d(c_prev, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _block(self, c_in: int, c_out: int, emb_dim: int, res: int) -> nn.Module:
        block = ResBlock(c_in, c_out, emb_dim, self.config.dropout)
        if res in self.config.attention_resolutions:
            return nn.ModuleList([block, Attention(c_out)])
        return nn.ModuleList([block])

    def embed(self, t: Tensor, cond: Cond) -> Tensor:
        ch, dtype = self.config.base_channels, self.stem.weight.dtype   # bf16 under mixed precision
        emb = self.time_mlp(fourier_embedding(1000.0 * t, ch).to(dtype))
        labels = cond["c"].long()
        emb = emb + self.class_emb(torch.where(labels == NULL_CLASS, self.config.num_classes, labels))
        if self.w_mlp is not None:
            emb = emb + self.w_mlp(fourier_embedding(W_SCALE * cond["w"], ch).to(dtype))
        return emb

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        emb = self.embed(t, cond)
        h = self.stem(z_t.to(self.stem.weight.dtype))
        hs = [h]
        for layer in self.down:
            h = self._block_output(layer, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, nn.Upsample):
                h = layer(h)
            else:
                h = self._block_output(layer, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def _block_output(self, layer: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._run, layer, h, emb, use_reentrant=False)
        return self._run(layer, h, emb)

    @staticmethod
    def _run(layer: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if isinstance(layer, nn.Conv2d):
            return layer(h)
        h = layer[0](h, emb)
        return layer[1](h) if len(layer) > 1 else h
