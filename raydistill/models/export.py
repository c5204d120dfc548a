"""Students of diffusers teachers, exported as diffusers pipelines' parts.

    DIR/unet/                     the student's UNet2DModel / UNet2DConditionModel (save_pretrained)
    DIR/scheduler/                a DDIMScheduler config: the teacher's betas, the student's
                                  prediction type, `trailing` spacing and set_alpha_to_one, so
                                  diffusers' DDIM with N steps visits raydistill's uniform N-step
                                  grid (N dividing num_train_timesteps) and ends on x_hat
    DIR/raydistill.json           where it came from and how to sample it: steps, w
    DIR/lora/                     a student trained with adapters (memory.lora) of a
                                  UNet2DConditionModel teacher: the adapters alone, as the LoRA
                                  file diffusers' loaders put on the teacher's UNet (DIR/unet is
                                  the teacher's UNet with them merged). Not for a w-conditioned
                                  student, whose w input is not the teacher's.

Guidance: a w-conditioned UNet2DConditionModel keeps its `time_cond_proj_dim` input (feed it
`timestep_cond = guidance_embedding(w)`, LCM's embedding of w = guidance_scale - 1). A UNet2DModel
has no such input: its w is chosen at export and folded into the time embedding's first bias
(the projection is added to that layer's input, so the fold is exact), and recorded. A student
with its guidance built in (progressive rounds of a fixed w, generators) exports as it is.

Samplers diffusers' DDIM cannot reproduce are refused: Meng et al.'s stochastic sampler and a
multi-step generator's re-noising sampler.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from raydistill.config import ConfigError, ModelConfig
from raydistill.models.checkpoint import Checkpoint, check_replaceable
from raydistill.models.diffusers_unet import PREDICTIONS, guidance_embedding
from raydistill.models.lora import DIFFUSERS_LORA_FILE, write_diffusers_lora

EXPORT_FORMAT = "raydistill-diffusers-export/1"
SCHEDULER_PREDICTIONS = {ours: theirs for theirs, ours in PREDICTIONS.items()}


def scheduler_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The DDIMScheduler config under which diffusers' N-step DDIM is raydistill's N-step DDIM."""
    schedule = checkpoint.config.schedule
    config = {"num_train_timesteps": schedule.num_timesteps, "beta_schedule": schedule.kind,
              "prediction_type": SCHEDULER_PREDICTIONS[checkpoint.config.prediction],
              "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0,
              "clip_sample": False, "thresholding": False}
    if schedule.kind != "squaredcos_cap_v2":
        config.update(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    return config


def _check(checkpoint: Checkpoint, w: float | None) -> None:
    config = checkpoint.config
    if config.kind != "diffusers":
        raise ConfigError("--checkpoint", f"is a {config.kind} model; only students of diffusers "
                                          "teachers export to diffusers")
    distilled = checkpoint.sampling.distilled_sampler
    if distilled is not None and not distilled.ddim_equivalent:
        raise ConfigError("--checkpoint", f"is distilled for {distilled}, which diffusers' DDIM "
                                          "does not reproduce")
    folds = config.w_conditioned and config.diffusers.model_class == "UNet2DModel"
    if folds and w is None:
        raise ConfigError("--w", "is required: a UNet2DModel has no guidance input, so the "
                                 "student's w is built in at export")
    if not folds and w is not None:
        raise ConfigError("--w", "applies only to a w-conditioned UNet2DModel student (others "
                                 "keep their guidance input or have w built in)")
    if folds:
        checkpoint.sampling.check_guidance(w, w, "--w")


def export_diffusers(checkpoint: Checkpoint, out: str, *, w: float | None = None,
                     adapters: dict[str, torch.Tensor] | None = None) -> dict:
    """Write `out` (see the module docstring) for a student of a diffusers teacher, with
    `adapters` (the student's, where it was trained with them) as a diffusers LoRA where that
    applies; returns what raydistill.json records. The directory appears complete or not at all."""
    _check(checkpoint, w)
    check_replaceable(out)
    network, config = checkpoint.network, checkpoint.config
    unet = _folded(network, config, w) if w is not None else network.unet
    distilled = checkpoint.sampling.distilled_sampler
    record = {"format": EXPORT_FORMAT, "fingerprint": checkpoint.fingerprint,
              "method": checkpoint.extra.get("method"),
              "steps": distilled.steps if distilled is not None else None,
              "w_built_in": w if w is not None else checkpoint.sampling.built_in_w,
              "guidance_input": "timestep_cond = guidance_embedding(w), w = guidance_scale - 1"
              if config.w_conditioned and w is None else None}
    lora = adapters is not None and config.diffusers.model_class == "UNet2DConditionModel" \
        and not config.w_conditioned
    record["lora"] = f"lora/{DIFFUSERS_LORA_FILE}" if lora else None
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        unet.save_pretrained(os.path.join(tmp, "unet"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        scheduler = {"_class_name": "DDIMScheduler", **scheduler_config(checkpoint)}
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f, indent=2)
        if lora:
            write_diffusers_lora(os.path.join(tmp, "lora"), adapters, checkpoint.extra["lora"])
        with open(os.path.join(tmp, "raydistill.json"), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


@torch.no_grad()
def _folded(network: torch.nn.Module, config: ModelConfig, w: float) -> torch.nn.Module:
    """A UNet2DModel with the student's weights and w built in: the projection of
    guidance_embedding(w), added to the time embedding's input, becomes part of its first bias."""
    unet = type(network.unet).from_config(network.unet.config)
    unet.load_state_dict(network.unet.state_dict())
    features = guidance_embedding(torch.tensor([w]), config.diffusers.w_embedding_dim)
    shift = network.w_proj(features.to(network.w_proj.weight.dtype))[0]
    layer = unet.time_embedding.linear_1
    layer.bias += layer.weight @ shift
    return unet.eval()
