"""Low-rank adapters (memory.lora) on the UNets a run trains, through peft.

peft wraps each targeted layer: its weight moves to `<layer>.base_layer.weight` (frozen) beside
`<layer>.lora_A.default.weight` [rank, in] and `<layer>.lora_B.default.weight` [out, rank] (zero at
the start, so the network starts as it was). A network with adapters is trained and checkpointed
as it is; the student a run writes is `merged`: plain weights, the adapters' product added in,
under the network's own names, which every later stage reads as any student's.
"""

from __future__ import annotations

from torch import Tensor, nn

from raydistill.config import ConfigError, LoraConfig, ModelConfig
from raydistill.models.diffusers_unet import DiffusersUNet
from raydistill.models.unet import UNet

#: the layers that get adapters by default, by network kind: the built-in UNet's ResBlock
#: convolutions and time projection, and its attention's qkv and output projections; a diffusers
#: UNet's attention projections, feed-forward layers, ResNet convolutions and time projections,
#: and its down- and up-sampling convolutions
DEFAULT_TARGETS = {
    "unet": ["conv1", "conv2", "emb", "qkv", "proj"],
    "diffusers": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                  "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                  "downsamplers.0.conv", "upsamplers.0.conv"],
}
ADAPTABLE = (UNet, DiffusersUNet)
ADAPTER_FILE = "lora.safetensors"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def peft_config(lora: LoraConfig, kind: str):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.lora_alpha,
                          target_modules=lora.targets or DEFAULT_TARGETS[kind])


def lora_record(lora: LoraConfig, kind: str) -> dict:
    """What a student's checkpoint records of its adapters (`lora`, beside ADAPTER_FILE)."""
    return {"rank": lora.rank, "alpha": lora.lora_alpha,
            "targets": lora.targets or DEFAULT_TARGETS[kind]}


def write_diffusers_lora(directory: str, adapters: dict[str, Tensor], record: dict) -> None:
    """A diffusers UNet2DConditionModel's adapters (a DiffusersUNet's state keys) as the LoRA file
    diffusers' loaders read onto the teacher's UNet (`pipeline.load_lora_weights(directory)`,
    `unet.load_lora_adapter(directory, prefix="unet", weight_name=...)`), its scale in the
    file's metadata."""
    import diffusers

    layers = {key.removeprefix("unet.").replace(".default.", "."): value
              for key, value in adapters.items()}
    config = peft_config(LoraConfig(rank=record["rank"], alpha=record["alpha"],
                                    targets=record["targets"]), "diffusers")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(),
        weight_name=DIFFUSERS_LORA_FILE)


def add_adapters(network: nn.Module, name: str, lora: LoraConfig, kind: str) -> None:
    """Give every UNet inside `network` (the trained module `name`, of network kind `kind`)
    adapters on `lora`'s targets and freeze the UNet's own weights, but for the w inputs a
    w-conditioned student adds (the teacher has none to start them from). What `network` holds
    beside its UNets (DMD2's GAN head) trains in full."""
    from peft import inject_adapter_in_model

    unets = [module for module in network.modules() if isinstance(module, ADAPTABLE)]
    if not unets:
        raise ConfigError("memory.lora", f"the {name} is a {type(network).__name__}; adapters go "
                                         "on the built-in UNet and diffusers UNets")
    for unet in unets:
        try:
            inject_adapter_in_model(peft_config(lora, kind), unet)
        except ValueError as err:          # no layer matched a target
            raise ConfigError("memory.lora.targets", f"{err}".splitlines()[0]) from None
        for key, param in unet.named_parameters():
            if key.startswith(unet.W_INPUTS):
                param.requires_grad_(True)


def is_adapter(key: str) -> bool:
    return ".lora_" in key


def adapters(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters' weights in a state dict of a network with adapters."""
    return {key: value for key, value in state.items() if is_adapter(key)}


def merged(config: ModelConfig, lora: LoraConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The plain weights of the network `config` describes whose state with `lora`'s adapters is
    `state`: each adapted layer's weight plus its adapters' product (peft's merge, computed on a
    CPU fp32 copy, built without drawing initial values), under the names the network has
    without adapters. `state` is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from raydistill.models.checkpoint import build_network

    network = build_network(config, meta=True)
    add_adapters(network, "student", lora, config.kind)
    network.to_empty(device="cpu").load_state_dict(state)
    for layer in network.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    return {key.replace(".base_layer.", "."): value
            for key, value in network.state_dict().items() if not is_adapter(key)}
