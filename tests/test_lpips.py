"""LPIPS as kd's and dmd's regression distance, from a local TorchScript file (never downloaded):
the tests script a small stand-in with the `lpips` package's call and output shape."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydistill.cli import main
from raydistill.config import ModelConfig, UNetConfig
from raydistill.diffusion import CosineSchedule
from raydistill.methods.base import PAIRS, Phase
from raydistill.methods.generator import lpips_distance, make_distance
from raydistill.methods.kd import KnowledgeDistillation
from raydistill.models import build_network, save_checkpoint

STEPS = 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyLPIPS(nn.Module):
    """LPIPS's shape: unit-normalised features of both images, squared differences weighted per
    channel, averaged over space; [B, 1, 1, 1] like lpips.LPIPS."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(3, 8, 7, stride=4)
        self.weights = nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x), self.features(y)
        fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        return (self.weights * (fx - fy) ** 2).sum(1, keepdim=True).mean((2, 3), keepdim=True)


@pytest.fixture
def lpips_file(tmp_path):
    path = str(tmp_path / "lpips.pt")
    torch.jit.script(TinyLPIPS()).save(path)
    return path


def test_lpips_is_the_local_module_on_rgb_images_of_224_pixels(lpips_file):
    """Greyscale 16 x 16 images are repeated to RGB and resized to 224 x 224 before the module;
    d(x, x) = 0; the gradient reaches x and never the module's weights."""
    d = make_distance("lpips", lpips_file, torch.device("cpu"))
    module = torch.jit.load(lpips_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g).mul(2).sub(1).requires_grad_(True)
    y = torch.rand(3, 1, 16, 16, generator=g).mul(2).sub(1)

    def rgb224(images):
        return F.interpolate(images.repeat(1, 3, 1, 1), size=(224, 224), mode="bilinear")

    want = module(rgb224(x.detach()), rgb224(y)).reshape(3)
    got = d(x, y)
    torch.testing.assert_close(got, want)
    assert torch.equal(d(y, y), torch.zeros(3))
    got.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in d.args[0].parameters())
    assert lpips_distance(module, x, y).shape == (3,)


def test_kd_descends_lpips_onto_its_pairs(lpips_file):
    """KD with distance lpips: Adam on a fixed batch of (noise, image) pairs lowers the LPIPS of
    G(noise) to the images by more than half in 24 steps."""
    config = ModelConfig(unet=UNetConfig(base_channels=8, channel_mult=[1, 2],
                                         attention_resolutions=[]))
    torch.manual_seed(0)
    kd = KnowledgeDistillation(generator=build_network(config), config=config,
                               schedule=CosineSchedule(),
                               distance=make_distance("lpips", lpips_file, torch.device("cpu")),
                               w=1.0, steps=STEPS)
    g = torch.Generator().manual_seed(1)
    pairs = {"noise": torch.randn(4, 1, 16, 16, generator=g), "c": torch.arange(4),
             "image": torch.rand(4, 1, 16, 16, generator=g).mul(2).sub(1)}
    opt = torch.optim.Adam(kd.generator.network.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        loss = kd.loss({PAIRS: pairs}, Phase("generator", "generator", reads=(PAIRS,)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_lpips_is_only_read_from_a_usable_local_file(tmp_path, cli_stderr, lpips_file):
    """One line naming `lpips` (or `distance`) and exit 2, before any worker starts."""
    config = ModelConfig(unet=UNetConfig(base_channels=8, attention_resolutions=[]))
    teacher = str(tmp_path / "teacher")
    save_checkpoint(teacher, build_network(config), config)
    text = tmp_path / "lpips.txt"
    text.write_text("not TorchScript")
    base = ["train", "--config", f"{ROOT}/configs/smoke/kd.yaml", "--out", str(tmp_path / "run"),
            f"teacher.checkpoint={teacher}", "teacher.build=''", f"pairs={tmp_path}"]
    for overrides, message in [
            (["distance=lpips"], "lpips: is required with distance: lpips (a TorchScript LPIPS "
                                 "file on local disk; none is downloaded)"),
            (["distance=lpips", f"lpips={tmp_path / 'none.pt'}"], "lpips: no such file"),
            (["distance=lpips", f"lpips={text}"], f"lpips: {text} is not a TorchScript LPIPS "
                                                  "module"),
            ([f"lpips={lpips_file}"], "lpips: is given but distance is mse")]:
        assert main([*base, *overrides]) == 2
        err = cli_stderr()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", f"{ROOT}/configs/tests/analytic_dmd.yaml", "--out",
                 str(tmp_path / "run"), "distance=lpips", f"lpips={lpips_file}",
                 "dmd.regression_weight=0.25", f"pairs={tmp_path}"]) == 2
    assert "distance: lpips compares images; the teacher's samples have shape [2]" in \
        cli_stderr()
