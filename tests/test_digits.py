"""The digits pipeline of this issue: data, smoke teacher and classifier, the sample verb, and
(slow) the full teacher whose guided samples a trained classifier must recognise."""

import json
import os

import numpy as np
import pytest
import torch

from raydistill.cli import main
from raydistill.conditions import Conditions
from raydistill.config import ConfigError, DataConfig, SamplerConfig
from raydistill.data import load_digits
from raydistill.models import load_checkpoint, load_classifier
from raydistill.sampling import sample_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_digits_data():
    split = load_digits(DataConfig(resolution=16, holdout_fraction=0.2, seed=0))
    assert split.train.images.shape[1:] == (1, 16, 16) and split.num_classes == 10
    assert len(split.train) + len(split.test) == 1797
    assert abs(len(split.test) - 0.2 * 1797) < 2
    for part in (split.train, split.test):
        assert part.images.min() >= -1 and part.images.max() <= 1
        assert part.images.min() == -1 and part.images.max() > 0.9
        assert torch.bincount(part.labels, minlength=10).min() > 0.09 * len(part) - 2
    native = load_digits(DataConfig(resolution=8))
    assert native.train.images.shape[1:] == (1, 8, 8)
    assert set(native.train.images.unique().mul(8).add(8).round().tolist()) <= set(range(17))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    teacher, classifier = str(out / "teacher"), str(out / "classifier")
    assert main(["teacher", "--config", f"{CONFIGS}/smoke/teacher.yaml", "--out", teacher,
                 "--quiet"]) == 0
    assert main(["classifier", "--config", f"{CONFIGS}/smoke/classifier.yaml", "--out",
                 classifier, "--quiet"]) == 0
    return out, teacher, classifier


def test_smoke_teacher_learns(smoke_run):
    _, teacher, _ = smoke_run
    checkpoint = load_checkpoint(teacher)
    extra = checkpoint.extra
    print(f"smoke teacher held-out loss {extra['eval_loss_start']:.4f} -> "
          f"{extra['eval_loss_end']:.4f}")
    assert extra["eval_loss_end"] < 0.6 * extra["eval_loss_start"]
    log = [json.loads(line) for line in open(os.path.join(teacher, "train_log.jsonl"))]
    assert log[-1]["loss_smooth"] < log[0]["loss_smooth"]
    assert os.path.getsize(os.path.join(teacher, "preview.png")) > 0


def test_sample_verb_writes_a_grid(smoke_run, capsys):
    out, teacher, classifier = smoke_run
    grid = str(out / "grid.png")
    code = main(["sample", "--checkpoint", teacher, "--steps", "4", "--w", "2", "--solver",
                 "dpmpp_2m", "--per-class", "3", "--out", grid, "--classifier", classifier])
    assert code == 0
    assert "classifier recognises" in capsys.readouterr().out
    from matplotlib.image import imread
    image = imread(grid)
    assert image.shape[0] == 4 * (10 * 17 + 1)          # one row per class, 4x upscaled
    stochastic = str(out / "stochastic.png")
    assert main(["sample", "--checkpoint", teacher, "--steps", "4", "--stochastic",
                 "--per-class", "1", "--out", stochastic]) == 0


def test_sample_verb_writes_arrays_in_the_evaluation_suites_layout(smoke_run):
    """--out FILE.npz: uint8 [N, H, W, C] images as arr_0 (the same samples a grid shows, at the
    same seed) and their labels as arr_1."""
    out, teacher, _ = smoke_run
    arrays = str(out / "samples.npz")
    assert main(["sample", "--checkpoint", teacher, "--steps", "4", "--w", "2", "--per-class",
                 "3", "--seed", "5", "--out", arrays]) == 0
    with np.load(arrays) as saved:
        images, labels = saved["arr_0"], saved["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (30, 16, 16, 1)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    checkpoint = load_checkpoint(teacher)
    want, _ = sample_classes(checkpoint.w_denoiser, checkpoint.denoiser.schedule, shape=(1, 16, 16),
                             conditions=Conditions(10), sampler=SamplerConfig(steps=4, w=2.0, per_class=3),
                             seed=5)
    pixels = ((want.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, pixels.astype(np.uint8))
    assert images.min() < 40 and images.max() > 215       # dark background, bright strokes
    assert main(["sample", "--checkpoint", teacher, "--out", str(out / "samples.jpg")]) == 2


def test_sample_verb_feeds_w_to_w_conditioned_students(tmp_path):
    """A guided student takes w as an input (one call), not classifier-free guidance."""
    from raydistill.config import ModelConfig, UNetConfig
    from raydistill.diffusion import CFG
    from raydistill.models import build_network, save_checkpoint

    config = ModelConfig(unet=UNetConfig(base_channels=8, w_embedding=True, attention_resolutions=[]))
    network = build_network(config)
    for p in network.parameters():          # zero-initialised output and w layers would hide w
        torch.nn.init.normal_(p, std=0.1)
    save_checkpoint(str(tmp_path / "student"), network, config)
    checkpoint = load_checkpoint(str(tmp_path / "student"))
    assert not isinstance(checkpoint.w_denoiser, CFG)
    grids = []
    for w in ("0", "3"):
        path = str(tmp_path / f"w{w}.png")
        assert main(["sample", "--checkpoint", str(tmp_path / "student"), "--steps", "2",
                     "--w", w, "--per-class", "1", "--out", path]) == 0
        grids.append(open(path, "rb").read())
    assert grids[0] != grids[1]
    # Distilled for w in [2, 4]: without --w it samples at w = 2 (1 clamped into its range).
    save_checkpoint(str(tmp_path / "narrow"), network, config,
                    extra={"method": "guided", "w_min": 2.0, "w_max": 4.0})
    assert load_checkpoint(str(tmp_path / "narrow")).sampling.default_w == 2.0
    assert main(["sample", "--checkpoint", str(tmp_path / "narrow"), "--steps", "2",
                 "--per-class", "1", "--out", str(tmp_path / "narrow.png")]) == 0


def test_sample_verb_uses_a_students_built_in_guidance(tmp_path, capsys):
    """A progressive student without a w input has its w built in: sampled as it is (no CFG on
    top), at that w by default; another --w is refused in one line."""
    from raydistill.config import ModelConfig, UNetConfig
    from raydistill.diffusion import CFG
    from raydistill.models import build_network, save_checkpoint

    config = ModelConfig(unet=UNetConfig(base_channels=8, attention_resolutions=[]))
    path = str(tmp_path / "student")
    save_checkpoint(path, build_network(config), config,
                    extra={"method": "progressive", "steps": 2, "stochastic": False, "w_min": 1.5,
                           "w_max": 1.5})
    checkpoint = load_checkpoint(path)
    assert checkpoint.sampling.built_in_w == 1.5 and not isinstance(checkpoint.w_denoiser, CFG)
    with pytest.raises(ConfigError, match="guidance w=1.5 built in"):
        checkpoint.sampling.check_guidance(0.0, 3.0, "guidance")
    out = str(tmp_path / "grid.png")
    assert main(["sample", "--checkpoint", path, "--per-class", "1", "--out", out]) == 0
    assert "2 ddim steps, w=1.5" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", path, "--w", "3", "--out", out]) == 2
    assert "--w: the model is a distilled student with guidance w=1.5" in capsys.readouterr().err


def test_a_distilled_student_is_sampled_only_as_it_was_distilled(tmp_path, capsys):
    """A 2-step deterministic progressive student over w in [0, 2]: `sample` refuses other steps,
    solvers, spacings, the stochastic sampler and w outside its range, each with exit 2 and one
    line naming the flag and what the student was distilled for; --force-sampler samples it
    anyway. A stochastic student refuses --no-stochastic. Pairs from a student teacher follow
    the same rule."""
    from raydistill.config import ModelConfig, UNetConfig
    from raydistill.models import build_network, save_checkpoint

    config = ModelConfig(unet=UNetConfig(base_channels=8, attention_resolutions=[],
                                         w_embedding=True))
    path, out = str(tmp_path / "student"), str(tmp_path / "grid.png")
    meta = {"method": "progressive", "steps": 2, "stochastic": False, "w_min": 0.0, "w_max": 2.0}
    save_checkpoint(path, build_network(config), config, extra=meta)
    base = ["sample", "--checkpoint", path, "--per-class", "1", "--out", out]
    distilled = "but the model is a progressive student distilled for 2 DDIM steps on the " \
                "uniform t grid (--force-sampler samples it anyway)"
    for flags, message in [
            (["--steps", "8"], f"--steps: is 8, {distilled}"),
            (["--solver", "dpmpp_2m"], f"--solver: is dpmpp_2m, {distilled}"),
            (["--spacing", "uniform_logsnr"], f"--spacing: is uniform_logsnr, {distilled}"),
            (["--stochastic"], f"--stochastic: asks for the stochastic sampler, {distilled}"),
            (["--w", "3"], "--w: 3 is outside the guidance range [0, 2] the student was distilled "
                           "for (--force-sampler samples it anyway)")]:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err == f"raydistill sample: error: {message}"
        assert main([*base, *flags, "--force-sampler"]) == 0, flags
    assert main(base) == 0
    assert "2 ddim steps, w=1" in capsys.readouterr().out

    stochastic = str(tmp_path / "stochastic")
    save_checkpoint(stochastic, build_network(config), config, extra={**meta, "stochastic": True})
    assert main([*base[:2], stochastic, *base[3:]]) == 0
    assert "2 stochastic steps" in capsys.readouterr().out
    assert main([*base[:2], stochastic, *base[3:], "--no-stochastic"]) == 2
    assert "--no-stochastic: asks for an ODE solver, but the model is a progressive student " \
           "distilled for Meng et al.'s stochastic sampler with 2 steps" in capsys.readouterr().err

    pairs = ["pairs", "--config", f"{CONFIGS}/smoke/pairs.yaml", "--out", str(tmp_path / "ode"),
             "--quiet", "teacher.analytic=null", f"teacher.checkpoint={path}", "guidance.w_max=2.0"]
    assert main([*pairs, "solver.steps=2"]) == 2
    assert "solver.solver: is dpmpp_2m, but the model is a progressive student" in \
        capsys.readouterr().err
    assert main([*pairs, "mode=progressive", "student_steps=2", "data.source=digits"]) == 2
    assert "student_steps: is 2, but the teacher is a 2-step progressive student (its targets " \
           "are for 1-step students)" in capsys.readouterr().err
    assert main([*pairs, "mode=guided", "data.source=digits"]) == 2
    assert "teacher.checkpoint: is a progressive student distilled for 2 DDIM steps" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ode")


@pytest.mark.slow
def test_full_digits_teacher_samples_are_recognised(tmp_path):
    """The full teacher's CFG 64-step DDIM samples show the intended digit (>= 80%)."""
    teacher, classifier = str(tmp_path / "teacher"), str(tmp_path / "classifier")
    assert main(["teacher", "--config", f"{CONFIGS}/digits/teacher.yaml", "--out", teacher,
                 "--quiet"]) == 0
    assert main(["classifier", "--config", f"{CONFIGS}/digits/classifier.yaml", "--out",
                 classifier, "--quiet"]) == 0
    model, meta = load_classifier(classifier)
    checkpoint = load_checkpoint(teacher)
    images, labels = sample_classes(checkpoint.w_denoiser, checkpoint.denoiser.schedule,
                                    shape=(1, 16, 16),
                                    conditions=Conditions(10), sampler=SamplerConfig(steps=64, w=1.0,
                                                                          per_class=50))
    accuracy = model.accuracy(images.clamp(-1, 1), labels)
    print(f"classifier held-out accuracy {meta['test_accuracy']:.1%}; it recognises "
          f"{accuracy:.1%} of 500 CFG (w=1) 64-step DDIM teacher samples as their class")
    assert meta["test_accuracy"] >= 0.95
    assert accuracy >= 0.80
