"""Teacher/student checkpoints: a directory with `model.safetensors` and `config.json`.

config.json holds the model config (every field but the sections of the other network kinds:
enough to rebuild the network) plus a fingerprint: the sha256 of that config as written and of
every tensor, in name order. Pair sets and students record the fingerprint of the teacher that made
them, so a mismatch is caught up front.

Identities must survive a schema that grows: the fingerprint is recomputed from the config exactly
as it was written, never from the config re-read into today's dataclasses (which would add every
field added since). Formats:

    raydistill-model/1   wrote every section of ModelConfig, the unused ones included
    raydistill-model/2   leaves out the sections of the other network kinds

Both hash the written dict the same way, so a format-1 checkpoint keeps its fingerprint. A model
that is never written (an analytic teacher described inline) is identified by the fields that
differ from their defaults, which a field added later with a default leaves unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raydistill.config import ConfigError, ModelConfig, TeacherRef, from_dict, to_dict
from raydistill.diffusion.guidance import Denoiser
from raydistill.models.conditioning import Conditioning, model_data_shape
from raydistill.models.denoiser import ModelDenoiser, make_schedule
from raydistill.models.diffusers_unet import DiffusersUNet, load_diffusers
from raydistill.models.gmm import AnalyticTeacher, GaussianMixture
from raydistill.models.mlp import MLP
from raydistill.models.sampling import SamplingPolicy
from raydistill.models.unet import UNet

FORMAT = "raydistill-model/2"
READABLE_FORMATS = ("raydistill-model/1", FORMAT)
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def network_holding(config: ModelConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The network `config` describes, holding `weights` (its whole state dict, in the dtypes
    the network is built with; tensors already in them are taken as they are: pass copies of
    tensors that must stay apart), built without drawing the initial values they replace (at
    Stable Diffusion's size, seconds of a worker's start-up)."""
    if config.kind == "gmm":                 # built from its seed: nothing drawn is replaced
        network = build_network(config)
        network.load_state_dict(weights)
        return network
    network = build_network(config, meta=True)
    dtypes = {name: value.dtype for name, value in network.state_dict().items()}
    network.load_state_dict({name: value.to(dtypes.get(name, value.dtype))
                             for name, value in weights.items()}, assign=True)
    left = [name for name, tensor in itertools.chain(network.named_parameters(),
                                                     network.named_buffers()) if tensor.is_meta]
    if left:
        raise ValueError(f"{left[0]} is not in the state dict (a tensor it does not save)")
    return network


def build_network(config: ModelConfig, *, meta: bool = False) -> nn.Module:
    """The trainable (or analytic) module a ModelConfig describes, freshly initialised; with
    `meta`, its parameters on the meta device (shapes without values, for checks)."""
    if config.kind in ("unet", "mlp", "diffusers"):
        schedule = make_schedule(config.schedule) if config.kind == "diffusers" else None
        with torch.device("meta") if meta else contextlib.nullcontext():
            if config.kind == "unet":
                return UNet(config.unet)
            if config.kind == "mlp":
                return MLP(config.mlp)
            return DiffusersUNet(config.diffusers, schedule)
    gmm = config.gmm
    return GaussianMixture.random(
        num_classes=gmm.num_classes, components_per_class=gmm.components_per_class, dim=gmm.dim,
        seed=gmm.seed, spread=gmm.spread, shape=tuple(gmm.shape) or None)


def as_denoiser(network: nn.Module, config: ModelConfig) -> Denoiser:
    """The Denoiser (x_hat = d(z_t, t, cond)) of a network built from `config`."""
    schedule = make_schedule(config.schedule)
    if config.kind == "gmm":
        return AnalyticTeacher(network, schedule)
    return ModelDenoiser(network, schedule, config.prediction)


def _in_use(key: str, config: ModelConfig) -> bool:
    """Every field of a model config but the sections of the other network kinds."""
    return key == config.kind or key not in typing.get_args(typing.get_type_hints(ModelConfig)["kind"])


def written_config(config: ModelConfig) -> dict[str, Any]:
    """The model config as a checkpoint writes it: every field but the sections of the other
    network kinds, canonical (e.g. 3 -> 3.0 in float fields)."""
    full = to_dict(from_dict(ModelConfig, to_dict(config)))
    return {key: value for key, value in full.items() if _in_use(key, config)}


def sparse_config(config: ModelConfig) -> dict[str, Any]:
    """written_config without the fields that hold their defaults: the identity of a model that is
    never written, unchanged when the schema gains a field with a default."""
    def non_default(section: Any) -> dict[str, Any]:
        default, out = type(section)(), {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                value = non_default(value)
                if value:
                    out[f.name] = value
            elif value != getattr(default, f.name):
                out[f.name] = value
        return out

    canonical = from_dict(ModelConfig, to_dict(config))
    return {key: value for key, value in non_default(canonical).items() if _in_use(key, config)}


def fingerprint(network: nn.Module, model: dict[str, Any]) -> str:
    """sha256 over a model config dict (as written, or `sparse_config`) and every tensor's name,
    dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
    for name, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A model's record: its network, config, fingerprint and what its checkpoint records beside
    them (`extra`: a student's method, guidance range and sampler); with the policies read from
    it: how it may be sampled (`sampling`) and what it is conditioned on (`conditioning`)."""

    network: nn.Module
    config: ModelConfig
    fingerprint: str
    extra: dict[str, Any]
    conditioning: Conditioning

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one sample x the model denoises (a latent model's latents)."""
        return model_data_shape(self.config)

    @functools.cached_property
    def denoiser(self) -> Denoiser:
        """One Denoiser per checkpoint (w_denoiser wraps this same one, so a hook on it sees
        every evaluation)."""
        return as_denoiser(self.network, self.config)

    @functools.cached_property
    def sampling(self) -> SamplingPolicy:
        """How the model may be sampled: its built-in or distilled guidance range, the sampler a
        distilled student was distilled for (raydistill.models.sampling)."""
        return SamplingPolicy(self.config.w_conditioned, self.extra)

    @property
    def w_denoiser(self) -> Denoiser:
        """The denoiser that honours cond["w"] (SamplingPolicy.w_denoiser)."""
        return self.sampling.w_denoiser(self.denoiser)


def check_replaceable(directory: str) -> None:
    """Refuse an output directory that holds something other than a checkpoint."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(directory, "exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.isfile(os.path.join(directory, CONFIG)):
            raise ConfigError(directory, "exists and is not a checkpoint; refusing to replace it")


def write_weights_dir(directory: str, module: nn.Module, meta: dict[str, Any],
                      extra_files: dict[str, bytes] | None = None) -> None:
    """Write `model.safetensors`, `config.json` and any extra files into a temp dir, then move it
    into place, so a directory under that name is always complete. An existing checkpoint is moved
    aside first and deleted only once the new one is in place."""
    directory = os.path.abspath(directory)
    check_replaceable(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    old = None
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS))
        files = {CONFIG: json.dumps(meta, indent=2).encode(), **(extra_files or {})}
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(directory):
            old = tempfile.mkdtemp(prefix=".old-ckpt-", dir=parent)
            os.replace(directory, os.path.join(old, "checkpoint"))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(directory):
            os.replace(os.path.join(old, "checkpoint"), directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_weights_dir(directory: str, formats: tuple[str, ...]) -> tuple[dict[str, Any], dict]:
    """The metadata and tensors of a directory written by write_weights_dir in one of `formats`."""
    expected_format = formats[-1]
    config_path, weights_path = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ConfigError(directory, f"not a {expected_format} checkpoint: missing {path}")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") not in formats:
        raise ConfigError(config_path, f"format {meta.get('format')!r} is not one of {list(formats)}")
    return meta, load_file(weights_path)


def save_checkpoint(directory: str, network: nn.Module, config: ModelConfig,
                    extra: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> str:
    """Save a teacher or student (plus extra files such as logs); returns its fingerprint."""
    model = written_config(config)
    digest = fingerprint(network, model)
    meta = {"format": FORMAT, "model": model, "fingerprint": digest, "extra": extra or {}}
    write_weights_dir(directory, network, meta, extra_files)
    return digest


def load_checkpoint(directory: str, *, verify: bool = True) -> Checkpoint:
    """Rebuild the network from `directory`; with verify, check the stored fingerprint (recomputed
    from the config as written: format 1's unused sections are read and ignored)."""
    meta, tensors = read_weights_dir(directory, READABLE_FORMATS)
    config = from_dict(ModelConfig, meta["model"])
    network = network_holding(config, tensors)
    digest = fingerprint(network, meta["model"])
    if verify and digest != meta["fingerprint"]:
        raise ConfigError(directory, "fingerprint mismatch: weights or config were modified")
    return _checkpoint(network, config, digest, meta.get("extra", {}))


def planned_checkpoint(config: ModelConfig, extra: dict[str, Any], digest: str) -> Checkpoint:
    """What a checkpoint with this config and record is, without its weights (the network on the
    meta device): what a pipeline's checks see of a model an earlier stage will write."""
    return _checkpoint(build_network(config, meta=True), config, digest, extra)


def as_planned(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint without its weights (see planned_checkpoint), its fingerprint kept."""
    planned = planned_checkpoint(checkpoint.config, checkpoint.extra, checkpoint.fingerprint)
    planned.conditioning = dataclasses.replace(checkpoint.conditioning, network=planned.network)
    return planned


def _checkpoint(network: nn.Module, config: ModelConfig, digest: str,
                extra: dict[str, Any]) -> Checkpoint:
    """A checkpoint whose record says what it is sampled with (a student's prompts and
    autoencoder: Conditioning.recorded)."""
    return Checkpoint(network.eval(), config, digest, extra,
                      Conditioning.recorded(config, network, extra))


def load_teacher(ref: TeacherRef) -> Checkpoint:
    """The configured teacher (a checkpoint, a diffusers directory, or the analytic mixture
    described inline); a fingerprint pin must match."""
    if ref.analytic is not None:
        config = ModelConfig(kind="gmm", gmm=ref.analytic)
        network = build_network(config)
        checkpoint = Checkpoint(network, config, fingerprint(network, sparse_config(config)), {},
                                Conditioning(config, network))
    elif ref.diffusers is not None:
        network, config, vae = load_diffusers(ref.diffusers)
        conditioning = Conditioning(config, network, autoencoder_path=vae)
        digest = fingerprint(network, written_config(config))
        if vae:          # a latent teacher is its UNet and its autoencoder
            digest = fingerprint(conditioning.autoencoder, {"unet": digest})
        checkpoint = Checkpoint(network, config, digest, {}, conditioning)
    else:
        checkpoint = load_checkpoint(ref.checkpoint)
    if ref.prompts:
        checkpoint.conditioning = checkpoint.conditioning.with_prompts(ref.prompts)
    if ref.fingerprint and not checkpoint.fingerprint.startswith(ref.fingerprint):
        raise ConfigError("teacher.fingerprint", f"the teacher has fingerprint "
                                                 f"{checkpoint.fingerprint[:16]}, config pins "
                                                 f"{ref.fingerprint}")
    return checkpoint
