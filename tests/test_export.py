"""Students of diffusers teachers exported to diffusers: diffusers' own DDIM with N steps on the
exported UNet and scheduler equals raydistill's N-step sampling of the student, to 1e-4."""

import json

import diffusers
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

from raydistill.cli import main
from raydistill.config import ConfigError, DiffusersTeacher, TeacherRef, TrainJob, load
from raydistill.diffusion import sample
from raydistill.models import load_checkpoint, save_checkpoint
from raydistill.models.checkpoint import build_network, load_teacher
from raydistill.models.diffusers_unet import guidance_embedding
from raydistill.models.export import export_diffusers
from raydistill.train.build import build_student, student_record

TOLERANCE = 1e-4


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def student_of(teacher_dir, tmp_path, extra, *, w_embedding, null_embedding=""):
    """A student of the teacher as the trainers build it (v prediction, the teacher's weights),
    its w projection drawn at random so guidance matters, saved as a checkpoint with `extra`."""
    teacher = load_teacher(TeacherRef(diffusers=DiffusersTeacher(path=str(teacher_dir),
                                                                 null_embedding=null_embedding)))
    config = teacher.config
    config.prediction, config.diffusers.w_embedding = "v", w_embedding   # as student_config does
    network = build_student(config, teacher, seed=0)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.startswith(network.W_INPUTS):
                p.copy_(0.05 * torch.randn_like(p))
    save_checkpoint(str(tmp_path / "student"), network, config, extra=extra)
    return load_checkpoint(str(tmp_path / "student"))


def record_of(teacher_dir, method, *overrides, w=None):
    """What the checkpoint of a student of `method` records, as the training loop writes it."""
    guidance = [f"guidance.w_min={w}", f"guidance.w_max={w}"] if w is not None else []
    job = load(TrainJob, None, [f"teacher.diffusers.path={teacher_dir}", f"method={method}",
                                *guidance, *overrides])
    return student_record(job, load_teacher(job.teacher), -1)


def exported(out):
    unet_class = json.load(open(out / "unet" / "config.json"))["_class_name"]
    unet = getattr(diffusers, unet_class).from_pretrained(str(out / "unet"),
                                                          low_cpu_mem_usage=False).eval()
    return unet, diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler"))


def test_guided_unet2d_student_exports_with_w_folded_in(tmp_path):
    """A w-conditioned UNet2DModel student exported at w = 2: diffusers' 4-step DDIM on the
    exported model (no guidance input, no CFG) equals raydistill's 4 steps at w = 2."""
    teacher_dir = write_model(tmp_path / "teacher", tiny_unet(), scheduler("v_prediction"))
    student = student_of(teacher_dir, tmp_path,
                         record_of(teacher_dir, "guided", "guidance.w_max=4.0"), w_embedding=True)
    assert main(["export", "--checkpoint", str(tmp_path / "student"), "--format", "diffusers",
                 "--out", str(tmp_path / "out"), "--w", "2"]) == 0
    record = json.load(open(tmp_path / "out" / "raydistill.json"))
    assert record["w_built_in"] == 2.0 and record["fingerprint"] == student.fingerprint
    unet, sched = exported(tmp_path / "out")
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(6, 1, 8, 8, generator=g), torch.arange(6) % CLASSES
    cond = {"c": labels, "w": torch.full((6,), 2.0)}
    with torch.no_grad():
        ours = sample(student.w_denoiser, noise, cond, student.denoiser.schedule, steps=4)
        at_zero = sample(student.w_denoiser, noise, {**cond, "w": torch.zeros(6)},
                         student.denoiser.schedule, steps=4)
    theirs = diffusers_ddim(unet, sched, noise, 4, class_labels=labels)
    print(f"relative error {relative_error(ours, theirs):.2e}")
    assert relative_error(ours, theirs) <= TOLERANCE
    assert relative_error(at_zero, theirs) > 100 * TOLERANCE          # w was folded in


def test_text_student_keeps_its_guidance_input(tmp_path):
    """A w-conditioned UNet2DConditionModel student keeps time_cond_proj_dim: diffusers' loop
    fed timestep_cond = guidance_embedding(w) equals raydistill's sampling at that w."""
    write_null_embedding(str(tmp_path / "null.npy"))
    teacher_dir = write_model(tmp_path / "teacher", tiny_unet(text=True), scheduler("epsilon"))
    null = f"teacher.diffusers.null_embedding={tmp_path / 'null.npy'}"
    student = student_of(teacher_dir, tmp_path,
                         record_of(teacher_dir, "guided", "guidance.w_max=4.0", null),
                         w_embedding=True, null_embedding=str(tmp_path / "null.npy"))
    export_diffusers(student, str(tmp_path / "out"))
    unet, sched = exported(tmp_path / "out")
    assert unet.config.time_cond_proj_dim == student.config.diffusers.w_embedding_dim
    assert sched.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(1)
    noise, states = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, TOKENS, WIDTH, generator=g)
    w = torch.full((3,), 1.5)
    cond = {"c": torch.zeros(3, dtype=torch.long), "encoder_hidden_states": states, "w": w}
    with torch.no_grad():
        ours = sample(student.w_denoiser, noise, cond, student.denoiser.schedule, steps=4)
    theirs = diffusers_ddim(unet, sched, noise, 4, encoder_hidden_states=states,
                            timestep_cond=guidance_embedding(w, unet.config.time_cond_proj_dim))
    assert relative_error(ours, theirs) <= TOLERANCE


def test_one_step_generator_exports_as_one_ddim_step(tmp_path):
    """A one-step generator (guidance built in), recorded as training records it: diffusers'
    1-step DDIM from t = 1 is its x_hat."""
    teacher_dir = write_model(tmp_path / "teacher", tiny_unet(), scheduler("v_prediction"))
    student = student_of(teacher_dir, tmp_path, record_of(teacher_dir, "dmd", w=1.0),
                         w_embedding=False)
    assert export_diffusers(student, str(tmp_path / "out"))["steps"] == 1
    unet, sched = exported(tmp_path / "out")
    noise, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    with torch.no_grad():
        ours = student.w_denoiser(noise, torch.ones(4), {"c": labels, "w": torch.ones(4)})
    theirs = diffusers_ddim(unet, sched, noise, 1, class_labels=labels)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_unexportable_students_are_refused(tmp_path):
    teacher_dir = write_model(tmp_path / "teacher", tiny_unet(), scheduler("v_prediction"))
    guided = student_of(teacher_dir, tmp_path,
                        record_of(teacher_dir, "guided", "guidance.w_max=4.0"), w_embedding=True)
    with pytest.raises(ConfigError, match="--w: is required"):
        export_diffusers(guided, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="outside the guidance range"):
        export_diffusers(guided, str(tmp_path / "out"), w=9.0)
    stochastic = student_of(teacher_dir, tmp_path, record_of(
        teacher_dir, "progressive", "halving.start_steps=4", "halving.end_steps=2",
        "halving.stochastic=true", w=1.0), w_embedding=False)
    with pytest.raises(ConfigError, match="stochastic sampler with 2 steps"):
        export_diffusers(stochastic, str(tmp_path / "out"))
    multistep = student_of(teacher_dir, tmp_path, record_of(
        teacher_dir, "dmd", "dmd.regression_weight=0", "dmd.generator_steps=2", w=1.0),
        w_embedding=False)
    with pytest.raises(ConfigError, match="the 2-step re-noising sampler of a multi-step"):
        export_diffusers(multistep, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    from raydistill.config import ModelConfig, UNetConfig

    own = build_network(ModelConfig(unet=UNetConfig(resolution=8, base_channels=16)))
    save_checkpoint(str(tmp_path / "own"), own, ModelConfig(unet=UNetConfig(resolution=8,
                                                                            base_channels=16)))
    with pytest.raises(ConfigError, match="only students of diffusers teachers"):
        export_diffusers(load_checkpoint(str(tmp_path / "own")), str(tmp_path / "out"))
