"""diffusers teachers behind the Denoiser contract: raydistill's DDIM through the adapter equals
diffusers' own DDIM loop for the same noise, with class labels, text embeddings and CFG."""

import numpy as np
import pytest
import torch
from diffusers_models import (
    CLASSES,
    TOKENS,
    WIDTH,
    diffusers_ddim,
    scheduler,
    tiny_unet,
    write_model,
    write_null_embedding,
)
from safetensors.torch import save_file

from raydistill.config import ConfigError, DiffusersTeacher, ModelConfig, TeacherRef, UNetConfig
from raydistill.diffusion import NULL_CLASS, ddim, sample
from raydistill.models.checkpoint import build_network, load_teacher
from raydistill.models.memory import checkpoint_activations, held_activation_bytes

TOLERANCE = 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def teacher_from(directory, **options):
    return load_teacher(TeacherRef(diffusers=DiffusersTeacher(path=str(directory), **options)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_uniform_ddim_equals_diffusers_trailing_loop(tmp_path, prediction):
    """raydistill's `steps`-step DDIM on its uniform t grid is diffusers' DDIM with trailing
    spacing, step for step, for a class-conditional UNet2DModel; guided with w = s - 1 it is
    diffusers' CFG at guidance scale s with the null label."""
    unet, sched = tiny_unet(), scheduler(prediction)
    teacher = teacher_from(write_model(tmp_path, unet, sched, pipeline=True))
    assert teacher.config.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert teacher.conditioning.num_classes == CLASSES and teacher.data_shape == (1, 8, 8)
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(6, 1, 8, 8, generator=g), torch.arange(6) % CLASSES
    schedule = teacher.denoiser.schedule
    with torch.no_grad():
        ours = sample(teacher.denoiser, noise, {"c": labels}, schedule, steps=8)
        guided = sample(teacher.denoiser, noise, {"c": labels}, schedule, steps=8, w=2.0)
    theirs = diffusers_ddim(unet, sched, noise, 8, class_labels=labels)
    theirs_guided = diffusers_ddim(unet, sched, noise, 8, guidance_scale=3.0, class_labels=labels,
                                   null_class_labels=torch.full_like(labels, CLASSES))
    print(f"{prediction}: relative error {relative_error(ours, theirs):.2e}, "
          f"guided {relative_error(guided, theirs_guided):.2e}")
    assert relative_error(ours, theirs) <= TOLERANCE
    assert relative_error(guided, theirs_guided) <= TOLERANCE
    assert relative_error(guided, theirs) > 100 * TOLERANCE      # guidance changed the samples


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_on_diffusers_leading_grid(tmp_path, prediction):
    """Any diffusers grid is a t grid: t = (n + 1) / N for its timesteps, then 0 (set_alpha_to_one):
    10 steps of the default leading spacing (900, 800, ..., 0) with a linear-beta model directory."""
    unet, sched = tiny_unet(channels=3, seed=2), scheduler(prediction, "leading", "linear")
    teacher = teacher_from(write_model(tmp_path, unet, sched))
    g = torch.Generator().manual_seed(1)
    noise, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])
    sched.set_timesteps(10)
    ts = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        ours = ddim(teacher.denoiser, noise, ts, {"c": labels}, teacher.denoiser.schedule)
    theirs = diffusers_ddim(unet, sched, noise, 10, class_labels=labels)
    assert relative_error(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_text_conditioned_teacher_with_null_embedding(tmp_path, prediction):
    """A UNet2DConditionModel on precomputed encoder_hidden_states: the null branch of CFG (and any
    sample whose c is NULL_CLASS) gets the empty prompt's embedding."""
    unet, sched = tiny_unet(text=True, seed=3), scheduler(prediction)
    null = write_null_embedding(str(tmp_path / "null.npy"))
    teacher = teacher_from(write_model(tmp_path / "model", unet, sched, pipeline=True),
                           null_embedding=str(tmp_path / "null.npy"))
    assert teacher.config.diffusers.text_length == TOKENS and teacher.conditioning.text
    with pytest.raises(ConfigError, match="teacher.prompts: is required for a text-conditioned"):
        teacher.conditioning.num_classes                       # noqa: B018
    g = torch.Generator().manual_seed(2)
    noise, states = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, TOKENS, WIDTH, generator=g)
    cond = {"c": torch.zeros(3, dtype=torch.long), "encoder_hidden_states": states}
    with torch.no_grad():
        guided = sample(teacher.denoiser, noise, cond, teacher.denoiser.schedule, steps=4, w=1.5)
    theirs = diffusers_ddim(unet, sched, noise, 4, guidance_scale=2.5, encoder_hidden_states=states,
                            null_encoder_hidden_states=null.expand(3, -1, -1))
    assert relative_error(guided, theirs) <= TOLERANCE


def test_a_prompt_table_is_what_c_indexes(tmp_path):
    """A text model's c indexes its prompt table (.safetensors or .npy, the same rows); NULL_CLASS
    rows are left to the network's empty prompt; a table of another shape, or a file without the
    tensor, is refused naming teacher.prompts."""
    write_model(tmp_path / "model", tiny_unet(text=True), scheduler())
    write_null_embedding(str(tmp_path / "null.npy"))
    table = torch.randn(5, TOKENS, WIDTH, generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "prompts.npy", table.numpy())
    save_file({"encoder_hidden_states": table}, str(tmp_path / "prompts.safetensors"))
    c = torch.tensor([2, NULL_CLASS, 4, 0])
    for name in ("prompts.npy", "prompts.safetensors"):
        teacher = teacher_from(tmp_path / "model", null_embedding=str(tmp_path / "null.npy"))
        teacher.conditioning = teacher.conditioning.with_prompts(str(tmp_path / name))
        assert teacher.conditioning.num_classes == 5
        cond = teacher.conditioning.conditions.cond(c, torch.ones(4))
        assert torch.equal(cond["encoder_hidden_states"][[0, 2, 3]], table[[2, 4, 0]])
        assert torch.equal(cond["c"], c) and torch.equal(cond["w"], torch.ones(4))
    save_file({"encoder_hidden_states": torch.zeros(5, TOKENS, WIDTH + 1)},
              str(tmp_path / "wide.safetensors"))
    save_file({"text": table}, str(tmp_path / "other.safetensors"))
    for name, problem in (("wide.safetensors", rf"holds \[{TOKENS}, {WIDTH + 1}\] embeddings"),
                          ("other.safetensors", "no tensor 'encoder_hidden_states'")):
        teacher = teacher_from(tmp_path / "model", null_embedding=str(tmp_path / "null.npy"))
        teacher.conditioning = teacher.conditioning.with_prompts(str(tmp_path / name))
        with pytest.raises(ConfigError, match=f"teacher.prompts: .*{problem}"):
            teacher.conditioning.conditions                    # noqa: B018


def test_bad_diffusers_directories_are_refused_by_key(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "no_scheduler")
    with pytest.raises(ConfigError, match="scheduler_config.json is missing"):
        teacher_from(tmp_path / "no_scheduler")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither unet/config.json"):
        teacher_from(tmp_path / "empty")
    write_model(tmp_path / "zero_snr", unet, scheduler())
    config = (tmp_path / "zero_snr" / "scheduler_config.json")
    config.write_text(config.read_text().replace('"rescale_betas_zero_snr": false',
                                                 '"rescale_betas_zero_snr": true'))
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        teacher_from(tmp_path / "zero_snr")
    write_model(tmp_path / "text", tiny_unet(text=True), scheduler())
    with pytest.raises(ConfigError, match="teacher.diffusers.null_embedding: is required"):
        teacher_from(tmp_path / "text")


@pytest.mark.parametrize("kind", ["unet", "diffusers", "diffusers-text"])
def test_activation_checkpointing_recomputes_the_same_gradients_from_fewer_held_bytes(tmp_path,
                                                                                      kind):
    """The built-in UNet (with dropout) and diffusers UNets (class and text conditioned) give the
    same output and gradients with their activations recomputed, holding under 60% of the bytes
    for the backward pass."""
    if kind == "unet":
        network = build_network(ModelConfig(kind="unet", unet=UNetConfig(
            in_channels=1, resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], dropout=0.1, num_classes=CLASSES)))
    else:
        text = kind == "diffusers-text"
        directory = write_model(tmp_path / "model", tiny_unet(text=text), scheduler())
        if text:
            write_null_embedding(str(tmp_path / "null.npy"))
        network = teacher_from(directory, **({"null_embedding": str(tmp_path / "null.npy")}
                                             if text else {})).network
    network.train()
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g)
    cond = {"c": torch.arange(4) % CLASSES, "w": torch.ones(4)}
    if kind == "diffusers-text":
        cond["encoder_hidden_states"] = torch.randn(4, TOKENS, WIDTH, generator=g)

    def step() -> torch.Tensor:
        torch.manual_seed(1)                        # the same dropout masks in both runs
        network.zero_grad()
        out = network(z, t, cond)
        out.square().mean().backward()
        return out.detach()

    def forward() -> torch.Tensor:
        return network(z, t, cond)

    held, out = held_activation_bytes(forward, network), step()
    grads = [p.grad.clone() for p in network.parameters()]
    checkpoint_activations(network, "student")
    recomputed, again = held_activation_bytes(forward, network), step()
    assert torch.equal(out, again)
    for before, p in zip(grads, network.parameters(), strict=True):
        torch.testing.assert_close(p.grad, before, rtol=1e-5, atol=1e-7)
    assert 0 < recomputed < 0.6 * held
