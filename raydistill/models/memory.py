"""Levers that trade compute for memory in the networks a run trains (TrainJob.memory)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from raydistill.config import ConfigError
from raydistill.models.diffusers_unet import DiffusersUNet
from raydistill.models.unet import UNet

#: what activation checkpointing reaches: the built-in UNet and diffusers UNets
RECOMPUTABLE = (UNet, DiffusersUNet)


def checkpoint_activations(network: nn.Module, name: str) -> None:
    """Make every UNet inside `network` (the trained module `name`: a student, a generator, or a
    fake score with its GAN head) recompute its activations in the backward pass: a diffusers
    UNet's own gradient checkpointing, the built-in UNet's per block. Refused, naming the key,
    for a network without one (an MLP)."""
    unets = [module for module in network.modules() if isinstance(module, RECOMPUTABLE)]
    if not unets:
        raise ConfigError("memory.activation_checkpointing",
                          f"the {name} is a {type(network).__name__}, which has no blocks to "
                          "recompute (the built-in UNet and diffusers UNets have)")
    for unet in unets:
        if isinstance(unet, DiffusersUNet):
            unet.unet.enable_gradient_checkpointing()
        else:
            unet.checkpoint_activations = True


def held_activation_bytes(forward: Callable[[], Tensor], network: nn.Module) -> int:
    """Bytes of the tensors autograd holds from `forward()` for its backward pass, each storage
    counted once, `network`'s parameters left out: what activation checkpointing saves. Measured
    on any device (CUDA's allocator peak is the other measure, and includes the rest)."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    held: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(held.values())
