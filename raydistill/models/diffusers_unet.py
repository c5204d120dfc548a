"""diffusers UNets as raydistill networks, and diffusers model directories as teachers.

    net(z_t, t, cond) -> the UNet's raw output at native timestep n(t) = N t - 1

in the scheduler's parameterization (epsilon, sample or v_prediction -> eps, x, v), so that
ModelDenoiser turns it into x_hat like any other network and no other code sees native timesteps
(DiscreteSchedule maps t onto diffusers' grid: t = (n + 1) / N). The condition:

  - class labels: cond["c"] in 0..K-1, NULL_CLASS for CFG's null branch, which becomes the label
    the teacher was trained with as "no class" (`null_class`, by default its last embedding);
  - text: cond["encoder_hidden_states"] [B, L, D], precomputed; where cond["c"] is NULL_CLASS the
    empty prompt's embedding (the `null_embedding` buffer) stands in, so CFG and label dropout
    work on text exactly as on classes;
  - w (a w-conditioned student, Meng et al. 2023): `guidance_embedding(w)` through a projection
    added to the time embedding's input, starting at zero. A UNet2DConditionModel has that input
    (`time_cond_proj_dim`, as LCM); a UNet2DModel gets the same projection through a pre-hook on
    its time embedding, which a fixed w folds into that layer's bias on export.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from raydistill.config import ConfigError, DiffusersConfig, DiffusersTeacher, ModelConfig, ScheduleConfig
from raydistill.diffusion.guidance import NULL_CLASS, Cond
from raydistill.diffusion.schedule import DiscreteSchedule
from raydistill.models.denoiser import make_schedule

PREDICTIONS = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
SCHEDULER_CONFIG, MODEL_CONFIG = "scheduler_config.json", "config.json"


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("teacher.diffusers", "needs the diffusers package (pip install "
                                               "diffusers)") from None
    return diffusers


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [B, dim] of 1000 w (sines, then cosines; frequencies
    10000^(-k / (dim/2 - 1))): what LCM-style pipelines feed a UNet's `time_cond_proj_dim`
    input as `timestep_cond`, so an exported w-conditioned student plugs into them."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=w.device) / (half - 1))
    angles = 1000.0 * w.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel / UNet2DConditionModel behind net(z_t, t, cond)."""

    #: parameters a w-conditioned student adds to its teacher's (zero-initialised)
    W_INPUTS = ("w_proj.", "unet.time_embedding.cond_proj.")

    def __init__(self, config: DiffusersConfig, schedule: DiscreteSchedule,
                 unet: nn.Module | None = None):
        super().__init__()
        self.config, self.schedule = config, schedule
        if unet is None:
            unet_config = dict(config.unet)
            if config.w_embedding and config.model_class == "UNet2DConditionModel":
                unet_config["time_cond_proj_dim"] = config.w_embedding_dim
            unet = getattr(_diffusers(), config.model_class).from_config(unet_config)
        self.unet = unet
        self.text = config.model_class == "UNet2DConditionModel"
        self.class_labels = getattr(unet, "class_embedding", None) is not None
        if self.class_labels:
            count = unet.config.get("num_class_embeds")
            if not isinstance(unet.class_embedding, nn.Embedding) or not count or count < 2:
                raise ConfigError("teacher.diffusers", "class conditioning other than an "
                                                       "embedding of at least 2 labels "
                                                       "(num_class_embeds) is not supported")
            self.null_label = config.null_class % count
        if self.text:
            width = unet.config["cross_attention_dim"]
            self.register_buffer("null_embedding", torch.zeros(config.text_length, width))
        self._w_shift: Tensor | None = None
        if config.w_embedding:
            if self.text:
                nn.init.zeros_(unet.time_embedding.cond_proj.weight)
            else:
                width = unet.time_embedding.linear_1.in_features
                self.w_proj = nn.Linear(config.w_embedding_dim, width, bias=False)
                nn.init.zeros_(self.w_proj.weight)
                unet.time_embedding.register_forward_pre_hook(self._add_w)

    @property
    def num_classes(self) -> int:
        """Class labels raydistill samples: the model's but its null label; 1 for a text or an
        unconditional model (its one "class": the prompt, or nothing)."""
        return self.unet.config["num_class_embeds"] - 1 if self.class_labels else 1

    def _add_w(self, module: nn.Module, args: tuple) -> tuple:
        (sample,) = args
        return (sample + self._w_shift.to(sample.dtype),)

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The UNet's output for z_t at native timestep n(t), computed in the UNet's own dtype
        (bf16 under mixed precision; the caller casts the output back)."""
        n = self.schedule.timestep(t).clamp(min=0)
        c, dtype = cond["c"], self.unet.dtype
        z_t = z_t.to(dtype)
        kwargs: dict[str, Any] = {}
        if self.class_labels:
            kwargs["class_labels"] = torch.where(c == NULL_CLASS, self.null_label,
                                                 c + (c >= self.null_label).long())
        if self.text:
            if "encoder_hidden_states" not in cond:
                raise ValueError("a text-conditioned UNet needs cond['encoder_hidden_states']")
            states = cond["encoder_hidden_states"].to(dtype)
            null = (c == NULL_CLASS)[:, None, None]
            kwargs["encoder_hidden_states"] = torch.where(null, self.null_embedding.to(dtype),
                                                          states)
        if self.config.w_embedding:
            features = guidance_embedding(cond["w"], self.config.w_embedding_dim).to(dtype)
            if self.text:
                kwargs["timestep_cond"] = features
            else:
                self._w_shift = self.w_proj(features)
        try:
            return self.unet(z_t, n, **kwargs).sample
        finally:
            self._w_shift = None


def data_shape(config: DiffusersConfig) -> tuple[int, ...]:
    """(channels, height, width) of the samples a diffusers UNet denoises."""
    size = config.unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return (config.unet["in_channels"], height, width)


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def locate(path: str) -> tuple[str, str]:
    """The UNet's directory and its scheduler config in a pipeline directory (unet/,
    scheduler/) or a model directory with scheduler_config.json beside config.json."""
    for unet_dir, scheduler in ((os.path.join(path, "unet"),
                                 os.path.join(path, "scheduler", SCHEDULER_CONFIG)),
                                (path, os.path.join(path, SCHEDULER_CONFIG))):
        if os.path.isfile(os.path.join(unet_dir, MODEL_CONFIG)):
            if not os.path.isfile(scheduler):
                raise ConfigError("teacher.diffusers.path", f"{scheduler} is missing: the "
                                                            "teacher's noise schedule and "
                                                            "prediction type come from it")
            return unet_dir, scheduler
    raise ConfigError("teacher.diffusers.path", f"{path} holds neither unet/{MODEL_CONFIG} (a "
                                                f"pipeline) nor {MODEL_CONFIG} (a model)")


def schedule_from_scheduler(scheduler: dict[str, Any], key: str) -> tuple[ScheduleConfig, str]:
    """The ScheduleConfig and prediction (eps, x, v) of a diffusers scheduler config."""
    def refuse(message: str) -> ConfigError:
        return ConfigError(key, message)

    if scheduler.get("trained_betas") is not None:
        raise refuse("trained_betas are not supported (beta_schedule linear, scaled_linear or "
                     "squaredcos_cap_v2)")
    if scheduler.get("rescale_betas_zero_snr"):
        raise refuse("rescale_betas_zero_snr (zero terminal SNR) is not supported")
    kind = scheduler.get("beta_schedule", "linear")
    prediction = scheduler.get("prediction_type", "epsilon")
    if kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise refuse(f"beta_schedule {kind!r} is not supported")
    if prediction not in PREDICTIONS:
        raise refuse(f"prediction_type {prediction!r} is not one of {list(PREDICTIONS)}")
    betas = {} if kind == "squaredcos_cap_v2" else {
        "beta_start": float(scheduler.get("beta_start", 1e-4)),
        "beta_end": float(scheduler.get("beta_end", 0.02))}
    schedule = ScheduleConfig(kind=kind, num_timesteps=int(scheduler.get("num_train_timesteps",
                                                                          1000)), **betas)
    return schedule, PREDICTIONS[prediction]


def _null_embedding(path: str, width: int) -> Tensor:
    """The empty prompt's encoder_hidden_states [L, width] stored in `path` (.npy, or
    .safetensors under "encoder_hidden_states"; a leading batch of 1 is dropped)."""
    if path.endswith(".npy"):
        value = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        tensors = load_file(path)
        if "encoder_hidden_states" not in tensors:
            raise ConfigError("teacher.diffusers.null_embedding",
                              f"{path} has no tensor 'encoder_hidden_states'")
        value = tensors["encoder_hidden_states"]
    value = value[0] if value.ndim == 3 and value.shape[0] == 1 else value
    if value.ndim != 2 or value.shape[1] != width:
        raise ConfigError("teacher.diffusers.null_embedding",
                          f"{path} holds shape {list(value.shape)}, not [tokens, "
                          f"cross_attention_dim={width}]")
    return value.float()


def load_diffusers(ref: DiffusersTeacher) -> tuple[DiffusersUNet, ModelConfig, str]:
    """The network and model config of a diffusers directory (weights read locally, no hub),
    and a latent model's autoencoder directory ("" for a pixel model)."""
    unet_dir, scheduler_path = locate(ref.path)
    vae = ref.vae or os.path.join(ref.path, "vae")
    if not os.path.isfile(os.path.join(vae, MODEL_CONFIG)):
        if ref.vae:
            raise ConfigError("teacher.diffusers.vae", f"{vae}/{MODEL_CONFIG} is missing")
        vae = ""
    model = _read_json(os.path.join(unet_dir, MODEL_CONFIG))
    model_class = model.get("_class_name")
    if model_class not in MODEL_CLASSES:
        raise ConfigError("teacher.diffusers.path", f"{unet_dir} holds a {model_class}; "
                                                    f"supported: {list(MODEL_CLASSES)}")
    schedule, prediction = schedule_from_scheduler(_read_json(scheduler_path),
                                                   f"teacher.diffusers.path: {scheduler_path}")
    unet = getattr(_diffusers(), model_class).from_pretrained(unet_dir, low_cpu_mem_usage=False)
    text_length = 0
    if model_class == "UNet2DConditionModel":
        if not ref.null_embedding:
            raise ConfigError("teacher.diffusers.null_embedding",
                              "is required for a text-conditioned UNet: the empty prompt's "
                              "encoder_hidden_states, the null condition of CFG")
        null = _null_embedding(ref.null_embedding, unet.config["cross_attention_dim"])
        text_length = null.shape[0]
    config = ModelConfig(kind="diffusers", prediction=prediction, schedule=schedule,
                         diffusers=DiffusersConfig(
                             model_class=model_class, null_class=ref.null_class,
                             text_length=text_length,
                             unet={k: v for k, v in unet.config.items() if not k.startswith("_")}))
    network = DiffusersUNet(config.diffusers, make_schedule(schedule), unet)
    if text_length:
        network.null_embedding.copy_(null)
    return network.eval(), config, vae
