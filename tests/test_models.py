import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from raydistill import config as config_module
from raydistill.conditions import Conditions
from raydistill.config import (
    ConfigError,
    MixtureConfig,
    ModelConfig,
    SamplerConfig,
    ScheduleConfig,
    TeacherRef,
    UNetConfig,
)
from raydistill.diffusion import NULL_CLASS, CosineSchedule, broadcast_like, x_from_v
from raydistill.models import (
    ModelDenoiser,
    UNet,
    as_denoiser,
    build_network,
    load_checkpoint,
    save_checkpoint,
)
from raydistill.models import checkpoint as checkpoint_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMALL = UNetConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[4], resolution=8,
                   num_classes=3)


def _inputs(n=4, res=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, res, res, generator=g), torch.rand(n, generator=g),
            {"c": torch.tensor([0, 1, 2, NULL_CLASS])[:n], "w": torch.linspace(0, 3, n)})


def test_unet_shapes_and_conditioning():
    net = UNet(SMALL)
    for p in net.parameters():        # zero-initialised output layers would hide conditioning
        torch.nn.init.normal_(p, std=0.05)
    z, t, cond = _inputs()
    out = net(z, t, cond)
    assert out.shape == z.shape
    other = net(z, t, {**cond, "c": torch.tensor([1, 2, 0, 0])})
    assert (out - other).flatten(1).abs().amax(1).min() > 0   # the class (and null) matters


def test_w_embedding_starts_equal_to_the_teacher():
    teacher = UNet(SMALL)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    student = UNet(UNetConfig(**{**vars(SMALL), "w_embedding": True}))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert all(k.startswith("w_mlp.") for k in missing) and not unexpected
    z, t, cond = _inputs()
    torch.testing.assert_close(student(z, t, cond), teacher(z, t, cond))
    torch.nn.init.normal_(student.w_mlp[-1].weight)
    assert not torch.allclose(student(z, t, cond), teacher(z, t, cond))


def test_model_denoiser_converts_v_to_x():
    net = UNet(SMALL)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    schedule = CosineSchedule()
    z, t, cond = _inputs()
    x_hat = ModelDenoiser(net, schedule, "v")(z, t, cond)
    alpha, sigma = (broadcast_like(v, z) for v in schedule.alpha_sigma(t))
    v = net(z, t, cond)
    assert v.abs().mean() > 0.01
    torch.testing.assert_close(x_hat, alpha * z - sigma * v)
    torch.testing.assert_close(x_hat, x_from_v(z=z, v=v, alpha=alpha, sigma=sigma))


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    config = ModelConfig(unet=SMALL)
    net = build_network(config)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    digest = save_checkpoint(str(tmp_path / "ckpt"), net, config)
    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.fingerprint == digest and len(digest) == 64
    z, t, cond = _inputs()
    torch.testing.assert_close(loaded.network(z, t, cond), net(z, t, cond))
    with torch.no_grad():
        next(net.parameters())[0].add_(1e-3)
    assert save_checkpoint(str(tmp_path / "other"), net, config) != digest


def test_fingerprint_is_canonical_for_configs_built_in_python(tmp_path):
    """Ints in float fields (spread=3) hash like the floats they load back as; 0-dim buffers hash."""
    config = ModelConfig(kind="gmm")
    config.gmm.spread, config.schedule.logsnr_min = 3, -15
    network = build_network(config)
    network.register_buffer("step", torch.tensor(7))
    digest = save_checkpoint(str(tmp_path / "gmm"), network, config)
    meta = json.load(open(tmp_path / "gmm" / "config.json"))
    assert meta["fingerprint"] == digest


def test_tampered_checkpoint_is_refused(tmp_path):
    config = ModelConfig(unet=SMALL)
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, build_network(config), config)
    meta_path = os.path.join(path, "config.json")
    meta = json.load(open(meta_path))
    meta["model"]["prediction"] = "eps"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ConfigError, match="fingerprint mismatch"):
        load_checkpoint(path)


def test_gmm_checkpoint_round_trip(tmp_path, batch):
    config = ModelConfig(kind="gmm")
    config.gmm.num_classes, config.gmm.dim = 3, 4
    network = build_network(config)
    save_checkpoint(str(tmp_path / "gmm"), network, config)
    loaded = load_checkpoint(str(tmp_path / "gmm"))
    noise, cond = batch
    t = torch.full((len(noise),), 0.5, dtype=torch.float64)
    torch.testing.assert_close(loaded.denoiser(noise, t, cond),
                               as_denoiser(network, config)(noise, t, cond), rtol=0, atol=0)


def test_checkpoint_does_not_replace_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = ModelConfig(unet=SMALL)
    with pytest.raises(ConfigError, match="not a checkpoint"):
        save_checkpoint(str(tmp_path), build_network(config), config)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture
def grown_schema(monkeypatch):
    """The config schema after a release that adds defaulted fields to the UNet, schedule and
    mixture sections (as the diffusers adapter will): the dataclasses the loader builds gain them."""
    grown = {}
    for name, base, field in (("UNetConfig", UNetConfig, "attention_heads"),
                              ("ScheduleConfig", ScheduleConfig, "timestep_spacing"),
                              ("MixtureConfig", MixtureConfig, "covariance")):
        grown[name] = dataclasses.make_dataclass(name, [(field, str, dataclasses.field(
            default="default"))], bases=(base,))
        monkeypatch.setattr(config_module, name, grown[name])
    return grown


def test_a_format_1_checkpoint_loads_and_samples_after_the_schema_grows(grown_schema):
    """tests/data/unet-v1 was written by raydistill 5cc79d4 (format 1, every config section). With
    defaulted fields added to the schema it still verifies, keeps its fingerprint, and samples as
    it did then."""
    from raydistill.sampling import sample_classes

    path = os.path.join(DATA, "unet-v1")
    stored = json.load(open(os.path.join(path, "config.json")))
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint.config.unet, grown_schema["UNetConfig"])
    assert checkpoint.fingerprint == stored["fingerprint"]
    images, _ = sample_classes(checkpoint.w_denoiser, checkpoint.denoiser.schedule, shape=(1, 8, 8),
                               conditions=Conditions(3), sampler=SamplerConfig(steps=4, w=1.0, per_class=2))
    expected = torch.from_numpy(np.load(os.path.join(DATA, "unet-v1-samples.npy")))
    torch.testing.assert_close(images.clamp(-1, 1), expected, rtol=0, atol=1e-5)


def test_written_checkpoints_hold_only_the_sections_they_use(tmp_path, grown_schema):
    """Format 2 writes kind, prediction, schedule and the section of its kind; re-saving the same
    network after the schema grew gives a checkpoint that verifies under the grown schema."""
    config = ModelConfig(unet=SMALL)
    path = str(tmp_path / "ckpt")
    digest = save_checkpoint(path, build_network(config), config)
    model = json.load(open(os.path.join(path, "config.json")))["model"]
    assert set(model) == {"kind", "prediction", "schedule", "unet"}
    assert load_checkpoint(path).fingerprint == digest


def test_a_top_level_model_field_added_later_is_written_and_hashed(tmp_path, monkeypatch):
    """Only the other kinds' sections are left out: a new top-level field (a latent scale, say) is
    written, read back and part of the fingerprint."""
    grown = dataclasses.make_dataclass("ModelConfig", [("latent_scale", float, dataclasses.field(
        default=1.0))], bases=(ModelConfig,))
    monkeypatch.setattr(config_module, "ModelConfig", grown)
    monkeypatch.setattr(checkpoint_module, "ModelConfig", grown)
    digests = []
    for scale in (1.0, 0.18):
        config = grown(unet=SMALL, latent_scale=scale)
        path = str(tmp_path / f"ckpt-{scale}")
        digests.append(save_checkpoint(path, build_network(config), config))
        model = json.load(open(os.path.join(path, "config.json")))["model"]
        assert set(model) == {"kind", "prediction", "schedule", "unet", "latent_scale"}
        assert load_checkpoint(path).config.latent_scale == scale
    assert digests[0] != digests[1]


def test_analytic_teacher_identity_survives_schema_growth(monkeypatch):
    """An analytic teacher is never written: its fingerprint hashes the fields that differ from
    their defaults, so fields added with defaults (to its section or any other) leave it alone."""
    from raydistill.models.checkpoint import load_teacher

    before = load_teacher(TeacherRef(analytic=MixtureConfig(num_classes=3, dim=4, spread=3))).fingerprint
    for name, base in (("MixtureConfig", MixtureConfig), ("ScheduleConfig", ScheduleConfig),
                       ("UNetConfig", UNetConfig)):
        monkeypatch.setattr(config_module, name, dataclasses.make_dataclass(
            name, [("added", int, dataclasses.field(default=0))], bases=(base,)))
    grown = config_module.from_dict(TeacherRef, {"analytic": {"num_classes": 3, "dim": 4,
                                                              "spread": 3}})
    assert load_teacher(grown).fingerprint == before
    changed = config_module.from_dict(TeacherRef, {"analytic": {"num_classes": 3, "dim": 4,
                                                                "spread": 3, "added": 1}})
    assert load_teacher(changed).fingerprint != before


def test_a_network_holding_given_weights_takes_them_whole_in_its_own_dtypes():
    """network_holding builds a network around its weights without drawing initial values:
    every tensor is the given one (cast to the network's dtype), trainable, and a missing one is
    refused rather than left unset."""
    config = ModelConfig(kind="unet", unet=UNetConfig(
        in_channels=1, resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
        attention_resolutions=[4], num_classes=3))
    weights = {name: torch.randn_like(value)
               for name, value in build_network(config).state_dict().items()}
    network = checkpoint_module.network_holding(
        config, {name: value.bfloat16() for name, value in weights.items()})
    for name, value in network.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, weights[name].bfloat16().float())
    assert all(param.requires_grad for param in network.parameters())
    with pytest.raises(RuntimeError, match='Missing key.*"stem.weight"'):
        checkpoint_module.network_holding(config, {name: value for name, value in weights.items()
                                                   if name != "stem.weight"})
