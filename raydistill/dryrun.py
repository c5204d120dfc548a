"""`raydistill train --dry-run`: a real-scale job run for one step on a tiny random model of its
teacher's family, to prove the config, the wiring and the engines before a cluster's hours go in.

The job's own file is read as written (every key validated at its real value where it does not
name a file), then the dry run swaps in

- a tiny random teacher of the same family in DIR/teacher: the teacher directory's own diffusers
  configs (unet/, vae/, scheduler/) with the widths and depths shrunk; where that directory is
  absent (a cluster path such as /shared/... seen from a laptop), Stable Diffusion 1.5's configs,
  the family raydistill's real-scale configs (configs/sd15/) distil. Text models get an empty-prompt
  embedding and a prompt table of PROMPTS random rows; the weights are seeded;
- DATA_SAMPLES random images of the autoencoder's size, labelled by prompt or class, as an npz;
- one worker (one GPU where the job asks for GPUs and the node has one), one optimizer step (each
  progressive round: one round of one step), a batch of two per micro-batch, no warm-up;

and trains into DIR/run. bf16, the ZeRO stage, the method and its options stay as configured.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import numpy as np
import torch

from raydistill.config import ConfigError, TrainJob, from_dict
from raydistill.methods.registry import METHODS

#: Stable Diffusion 1.5's diffusers configs (runwayml/stable-diffusion-v1-5): what a dry run
#: shrinks when the teacher's own directory is not on this machine.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4,
    "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "sample_size": 512, "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "act_fn": "silu", "scaling_factor": 0.18215,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "steps_offset": 1,
    "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False,
}

LATENT_SIZE = 8                  # the tiny UNet's sample size
TOKENS, PROMPTS = 4, 4
FULL_TOKENS, FULL_PROMPTS = 77, 64   # a full-size teacher's: CLIP's sequence length
DATA_SAMPLES = 16
SEED = 0


def dry_run_job(data: dict[str, Any], out: str, *,
                full_size: bool = False) -> tuple[TrainJob, str]:
    """The TrainJob of a dry run of the job `data` (a config file's mapping with its overrides
    applied), its tiny teacher written to OUT/teacher; and a line saying what was built. With
    `full_size`, the random teacher has its family's own size (benchmarks/gpu_scale.py)."""
    data = copy.deepcopy(data)
    teacher = data.get("teacher") or {}
    if not isinstance(teacher, dict) or not isinstance(teacher.get("diffusers"), dict):
        raise ConfigError("teacher.diffusers", "--dry-run swaps a diffusers teacher for a tiny "
                                               "one of its family; this job has none")
    for key in ("student", "pairs"):
        if data.get(key):
            raise ConfigError(key, "--dry-run builds its own tiny teacher, so it cannot take a "
                                   f"configured {key}; leave it unset for the dry run")
    source = teacher["diffusers"].get("path", "")
    family = _family(source)
    directory = os.path.join(out, "teacher")
    built = _write_teacher(directory, *family, full_size=full_size)
    options = {k: v for k, v in teacher["diffusers"].items() if k == "null_class"}
    data["teacher"] = {"diffusers": {**options, "path": directory, **built["diffusers"]},
                       **({"prompts": built["prompts"]} if "prompts" in built else {})}
    data["data"] = {**{k: v for k, v in (data.get("data") or {}).items()
                       if k in ("holdout_fraction", "seed")},
                    "source": "npz", "path": built["data"], "resolution": built["resolution"],
                    "channels": built["channels"]}
    _shrink_training(data)
    try:
        job = from_dict(TrainJob, data)
    except ConfigError:
        shutil.rmtree(directory)     # nothing half-made stays behind
        raise
    unet = family[0]["_class_name"]
    origin = f"{source}'s configs" if os.path.isdir(source) else \
        f"Stable Diffusion 1.5's configs ({source or 'no path'} is not on this machine)"
    size = "full-size" if full_size else "tiny"
    line = (f"dry run: a {size} random {unet}{' + AutoencoderKL' if family[1] else ''} "
            f"({built['parameters']:,} parameters) from {origin} in {directory}")
    return job, line


def _family(path: str) -> tuple[dict, dict | None, dict]:
    """(unet config, vae config or None, scheduler config) of the teacher directory `path`, or
    Stable Diffusion 1.5's where it is absent."""
    if not os.path.isdir(path):
        return SD15_UNET, SD15_VAE, SD15_SCHEDULER
    from raydistill.models.diffusers_unet import locate

    unet_dir, scheduler = locate(path)
    vae = os.path.join(path, "vae", "config.json")
    return (_read(os.path.join(unet_dir, "config.json")),
            _read(vae) if os.path.isfile(vae) else None, _read(scheduler))


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def tiny_unet_config(config: dict) -> dict:
    """The same blocks at widths 16 and 32, one layer each, a LATENT_SIZE sample and a text
    width of 16; everything else (block types, conditioning, channels) as given."""
    tiny = {k: v for k, v in config.items() if not k.startswith("_")}
    levels = len(config["block_out_channels"])
    tiny.update(block_out_channels=[16] + [32] * (levels - 1), layers_per_block=1,
                norm_num_groups=8, sample_size=LATENT_SIZE)
    if config["_class_name"] == "UNet2DConditionModel":
        tiny.update(cross_attention_dim=16, attention_head_dim=4,
                    transformer_layers_per_block=1)
    elif "attention_head_dim" in tiny:
        tiny["attention_head_dim"] = 8
    return tiny


def tiny_vae_config(config: dict) -> dict:
    """The same down/up blocks (so the same downsampling factor) at width 8, one layer each."""
    tiny = {k: v for k, v in config.items() if not k.startswith("_")}
    levels = len(config["block_out_channels"])
    tiny.update(block_out_channels=[8] * levels, layers_per_block=1, norm_num_groups=4,
                sample_size=LATENT_SIZE * 2 ** (levels - 1))
    return tiny


def _write_teacher(directory: str, unet_config: dict, vae_config: dict | None,
                   scheduler: dict, *, full_size: bool = False) -> dict[str, Any]:
    """Write the tiny pipeline (unet/, vae/, scheduler/), or with `full_size` one of the configs'
    own size, its text inputs and its data."""
    def as_given(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    unet_size = as_given if full_size else tiny_unet_config
    vae_size = as_given if full_size else tiny_vae_config
    import diffusers
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = getattr(diffusers, unet_config["_class_name"])(**unet_size(unet_config))
        # diffusers zero-initialises the output convolution; a random teacher should not be 0
        torch.nn.init.normal_(unet.conv_out.weight, std=0.02)
        unet.save_pretrained(os.path.join(directory, "unet"))
        vae = diffusers.AutoencoderKL(**vae_size(vae_config)) if vae_config else None
        if vae is not None:
            vae.save_pretrained(os.path.join(directory, "vae"))
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    built: dict[str, Any] = {"diffusers": {}, "parameters": sum(
        p.numel() for module in (unet, vae) if module is not None for p in module.parameters())}
    text = unet_config["_class_name"] == "UNet2DConditionModel"
    tokens, prompts = (FULL_TOKENS, FULL_PROMPTS) if full_size else (TOKENS, PROMPTS)
    if text:
        width = unet.config.cross_attention_dim
        null = os.path.join(directory, "null_embedding.safetensors")
        table = os.path.join(directory, "prompts.safetensors")
        save_file({"encoder_hidden_states": torch.randn(tokens, width, generator=generator)},
                  null)
        save_file({"encoder_hidden_states": torch.randn(prompts, tokens, width,
                                                        generator=generator)}, table)
        built["diffusers"]["null_embedding"], built["prompts"] = null, table
    if vae is not None:
        channels, size = vae.config.in_channels, vae.config.sample_size
    else:
        channels, size = unet.config.in_channels, unet.config.sample_size
    labels = prompts if text else max((unet.config.get("num_class_embeds") or 2) - 1, 1)
    rng = np.random.default_rng(SEED)
    path = os.path.join(directory, "data.npz")
    np.savez(path, images=rng.integers(0, 256, (DATA_SAMPLES, channels, size, size), np.uint8),
             labels=np.arange(DATA_SAMPLES) % labels)
    built.update(data=path, resolution=size, channels=channels)
    return built


def _shrink_training(data: dict[str, Any]) -> None:
    """One worker, one round of one step, two samples per micro-batch, no warm-up."""
    workers = data.setdefault("workers", {})
    gpus = 1.0 if workers.get("gpus", 0) and torch.cuda.is_available() else 0.0
    workers.update(num=1, gpus=gpus, cpus=1.0)
    accumulation = (data.get("deepspeed") or {}).get("grad_accum", 1)
    optim = data.setdefault("optim", {})
    optim.update(steps=1, batch_size=2 * accumulation, warmup_steps=0)
    for module in (optim.get("modules") or {}).values():
        if isinstance(module, dict) and "warmup_steps" in module:
            module["warmup_steps"] = 0
    spec = METHODS.get(data.get("method", TrainJob.method))
    if spec is not None and spec.shortest:
        data.setdefault(spec.section, {}).update(spec.shortest)
    data.update(checkpoint_every=1, log_every=1)
