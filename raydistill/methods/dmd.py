"""Distribution matching distillation: DMD (Yin et al., CVPR 2024, Alg. 1) and the DMD2 options
(Yin et al., NeurIPS 2024: no regression loss, two time-scale updates, a GAN head).

Notation: the generator G(z, c) = x_hat_G(z, t = 1, c) (raydistill.methods.generator.one_step),
initialised from the teacher; z ~ N(0, I), c uniform over the classes; x_hat_real the frozen
teacher under classifier-free guidance at the job's fixed w, or a w-conditioned teacher (Meng et
al.'s stage 1) fed that w (real score s_real = (alpha_t x_hat_real - z_t) / sigma_t^2); x_hat_fake
the fake score, a copy of the teacher's network trained online to denoise G's samples (s_fake
likewise). Copies of a w-conditioned teacher keep its w input, fed the same w. One training step:

  fake_score phase, dmd.fake_updates times (DMD2's two time-scale rule: 5):
    x = sg(G(z, c)),  t ~ U(0, 1],  z_t = alpha_t x + sigma_t eps
    L_fake = ||out_fake(z_t, t, c) - target(x)||^2  in the fake score's own parameterization
             (dmd.fake_weighting: unit weight, as DMD2; or an x-space weight(lambda_t) J^2)
             + gan_head_weight [softplus(D(z_s)) + softplus(-D(z'_s'))]      (DMD2; x' real data)
    with the GAN's own noise levels s, s' ~ U(0, dmd.gan_t_max] (z_s = alpha_s x + sigma_s eps'):
    DMD2 draws them, as its fake score's, uniformly over its teacher's time grid, which for its
    EDM teachers puts most draws at low noise, where real and generated samples differ
  generator phase (x_hat_fake evaluated in fp32 when the fake score trains in bf16, as in DMD2):
    x = G(z, c),  t ~ U[t_min, t_max],  z_t = alpha_t sg(x) + sigma_t eps
    grad = (x_hat_fake(z_t) - x_hat_real(z_t)) / mean|x - x_hat_real(z_t)|  (per sample, no grad)
    L_G = 0.5 ||x - sg(x - grad)||^2       (its gradient in x is grad / dim: the DM gradient)
          + regression_weight E d(G(z_pair, c), x_ode)     (DMD, on ODE pairs; DMD2 drops it)
          + gan_weight softplus(-D(z''_s)),  z''_s = alpha_s x + sigma_s eps''   (DMD2)

x_hat_fake - x_hat_real = sigma_t^2 / alpha_t (s_real - s_fake), so descending L_G moves G's samples
from where the fake score puts them toward where the real score does. D is a small classifier head
on the fake score's bottleneck features (`FakeScore`); the generator's GAN loss passes through the
fake score, whose parameters the training loop keeps out of that backward.

A multi-step generator (DMD2, `dmd.generator_steps` N > 1) is sampled by the re-noising sampler
of raydistill.diffusion.multistep at t_i = 1 - i/N. Its "G(z, c)" above is its output at an exit
step i of its own sampler chain from z, at the input z_{t_i} the chain reaches (backward
simulation: the chain runs without gradients; only the exit's evaluation takes them), so a step
learns from the inputs it is sampled with rather than from noised real data. `dmd.exit_step`:

  last     i = N - 1: the output the sampler returns, so the fake score tracks exactly the
           distribution that is sampled (the default);
  uniform  i ~ U{0..N-1} per sample, DMD2's rule as published. One fake score then tracks the
           mixture of the N exits' outputs, and the DM gradient vanishes once that mixture matches
           the data, whatever each exit gives. On the analytic mixture this fixed point is what
           training finds: the exits' pooled outputs match the data while the last exit's alone
           does not (tests/test_dmd_oracle.py).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.conditions import Conditions
from raydistill.config import ConfigError, ModelConfig, TrainJob, require
from raydistill.diffusion.guidance import Cond, Denoiser
from raydistill.diffusion.multistep import renoise_states
from raydistill.diffusion.parameterization import broadcast_like
from raydistill.diffusion.schedule import Schedule, uniform_t
from raydistill.methods.base import (
    DATA,
    PAIRS,
    Method,
    MethodSpec,
    Phase,
    Trainable,
    output_loss,
    require_balanced_weighting,
)
from raydistill.methods.generator import (
    Distance,
    RegressionConfig,
    check_generator_job,
    check_ode_pairs,
    generator_meta,
    make_distance,
    one_step,
    pair_regression,
)
from raydistill.models.checkpoint import Checkpoint
from raydistill.models.conditioning import model_data_shape
from raydistill.models.denoiser import denoise
from raydistill.seeds import MODULES_STREAM, derive_seed

EXIT_STEPS = ("last", "uniform")


@dataclass
class DMDConfig(RegressionConfig):
    """dmd's section (`dmd:`): distribution matching distillation (Yin et al., CVPR 2024) and the
    DMD2 options (Yin et al., NeurIPS 2024), with its regression term's distance (`distance`,
    `lpips`). The real score's guidance strength is the job's fixed w (guidance.w_min =
    guidance.w_max)."""

    t_min: float = 0.02              # the DM gradient's noise levels t ~ U[t_min, t_max]
    t_max: float = 0.98
    regression_weight: float = 0.25  # lambda_reg on ODE pairs (`pairs`); 0: none (DMD2)
    fake_updates: int = 1            # fake-score updates per generator update (DMD2: 5)
    gan_weight: float = 0.0          # DMD2's GAN loss on the generator; > 0 adds the head
    gan_head_weight: float = 0.0     # the head's classification loss in the fake score's loss
    gan_head: Literal["mlp", "conv"] = "mlp"   # raydistill.methods.dmd.gan_head (conv: DMD2's)
    gan_t_max: float = 1.0           # the GAN's noise levels: real and generated x at t ~ U(0, gan_t_max]
    gan_head_lr_scale: float = 1.0   # the head's learning rate, as a multiple of the fake score's
    #: the fake score's denoising loss: `output`, unit weight on the network's own output (DMD2),
    #: or an x-space weighting as loss_weighting's (refused where it spreads over 1e4 across t)
    fake_weighting: Literal["output", "snr", "truncated_snr", "snr_plus_one", "constant"] = "output"
    generator_steps: int = 1         # > 1: a multi-step generator trained by backward simulation
    exit_step: str = "last"          # its trained output: the chain's last step, or "uniform"

    def validate(self) -> None:
        super().validate()
        require(0.0 < self.t_min < self.t_max <= 1.0, "t_min",
                f"must satisfy 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        require(0.0 < self.gan_t_max <= 1.0, "gan_t_max", f"must be in (0, 1], got {self.gan_t_max}")
        require(self.gan_head_lr_scale > 0, "gan_head_lr_scale", "must be positive")
        for key in ("regression_weight", "gan_weight", "gan_head_weight"):
            require(getattr(self, key) >= 0, key, "must be non-negative")
        require((self.gan_weight > 0) == (self.gan_head_weight > 0), "gan_weight",
                "and gan_head_weight must both be set (the GAN loss needs a trained head) or both 0")
        require(self.fake_updates >= 1, "fake_updates", "must be at least 1")
        require(self.generator_steps >= 1, "generator_steps", "must be at least 1")
        require(self.exit_step in EXIT_STEPS, "exit_step",
                f"must be one of {', '.join(EXIT_STEPS)}, got {self.exit_step!r}")
        require(self.generator_steps == 1 or self.regression_weight == 0, "regression_weight",
                f"must be 0 for a {self.generator_steps}-step generator (DMD2 trains it by "
                "backward simulation, without ODE-pair regression)")


#: the layer whose output the GAN head reads, by network kind: the UNet's bottleneck (a diffusers
#: UNet's mid block), the MLP's last hidden features
FEATURE_LAYERS = {"unet": lambda net: net.mid[-1], "mlp": lambda net: net.out[0],
                  "diffusers": lambda net: net.unet.mid_block}


def feature_width(config: ModelConfig) -> int:
    if config.kind == "unet":
        return config.unet.base_channels * config.unet.channel_mult[-1]
    if config.kind == "diffusers":
        return config.diffusers.unet["block_out_channels"][-1]
    return config.mlp.width


def feature_map_size(config: ModelConfig) -> tuple[int, int]:
    """(height, width) of a UNet's bottleneck map: the samples' halved at each level but the
    last."""
    levels = len(config.unet.channel_mult if config.kind == "unet"
                 else config.diffusers.unet["block_out_channels"]) - 1
    _, height, width = model_data_shape(config)
    return height >> levels, width >> levels


def gan_head(kind: str, config: ModelConfig) -> nn.Module:
    """The GAN's classifier head on the fake score's features, to one logit per sample:
    mlp    two linear layers on the features (pooled over space: a UNet's bottleneck map);
    conv   DMD2's (Yin et al. 2024, their SD heads): 4x4 convolutions of stride 2 with GroupNorm
           and SiLU that halve the bottleneck map down to 4x4 or less, one convolution over what
           is left, then a 1x1 convolution to the logit."""
    width = feature_width(config)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1),
                             nn.Flatten(0))
    groups, (height, breadth), layers = math.gcd(32, width), feature_map_size(config), []
    while height > 4 and breadth > 4 and height % 2 == 0 and breadth % 2 == 0:
        layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GroupNorm(groups, width),
                   nn.SiLU()]
        height, breadth = height // 2, breadth // 2
    return nn.Sequential(*layers, nn.Conv2d(width, width, (height, breadth)),
                         nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, 1, 1),
                         nn.Flatten(0))


def dm_gradient(*, x: Tensor, x_real: Tensor, x_fake: Tensor) -> Tensor:
    """The normalised distribution-matching gradient (x_fake - x_real) / mean|x - x_real|, the
    mean per sample (DMD Eq. 8); non-finite entries (a zero normaliser) become 0."""
    scale = broadcast_like((x - x_real).abs().flatten(1).mean(1), x)
    return torch.nan_to_num((x_fake - x_real) / scale, nan=0.0, posinf=0.0, neginf=0.0)


class FakeScore(nn.Module):
    """The fake score's network and, for the GAN, a classifier head D on its features (`head`:
    mlp or conv, see gan_head; None: no GAN): `forward(z_t, t, cond)` is the network's output,
    `forward(..., classify=True)` that output and the logit D(z_t) (real vs generated) from the
    same forward pass."""

    def __init__(self, net: nn.Module, config: ModelConfig, head: str | None):
        super().__init__()
        self.net, self.head, self._features, self._tap = net, None, None, None
        self._layer = FEATURE_LAYERS[config.kind] if head else None
        self._pool = head == "mlp"
        if head:
            self.head = gan_head(head, config)

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._features = output

    def forward(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor],
                classify: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if classify and self._tap is None:
            # Tapped at the first use, after the hooks a wrapper registered: ZeRO-3's post-forward
            # hook wraps the layer's output so that its backward gathers the layer's weights
            # again, and the features must be that output.
            self._tap = self._layer(self.net).register_forward_hook(self._keep)
        out = self.net(z_t, t, cond)
        if not classify:
            return out
        features, self._features = self._features, None
        if self._pool and features.dim() > 2:           # [B, C, H, W]: pooled over space
            features = features.flatten(2).mean(2)
        return out, self.head(features).float()


class DistributionMatching(Method):
    student_module = "generator"
    precise_modules = ("fake_score",)         # the DM gradient's x_hat_fake, as DMD2 computes it

    def __init__(self, *, teacher: Denoiser, generator: nn.Module, fake_score: FakeScore,
                 generator_config: ModelConfig, fake_config: ModelConfig, schedule: Schedule,
                 dmd: DMDConfig, w: float, conditions: Conditions, shape: tuple[int, ...],
                 weighting: str, distance: Distance | None, steps: int):
        """`conditions`: the teacher's, from which the generator's c are drawn uniformly."""
        self.teacher = teacher
        self.generator, self.fake_score = Trainable(generator), Trainable(fake_score)
        self.generator_config, self.fake_config, self.schedule = generator_config, fake_config, \
            schedule
        self.dmd, self.w, self.conditions, self.shape = dmd, w, conditions, shape
        self.weighting, self.distance, self.steps = weighting, distance, steps
        self.gan = dmd.gan_weight > 0
        self.regression = dmd.regression_weight > 0
        self.lr_scales = {"fake_score": {"head": dmd.gan_head_lr_scale}} \
            if self.gan and dmd.gan_head_lr_scale != 1.0 else {}

    def trainables(self) -> dict[str, Trainable]:
        return {"generator": self.generator, "fake_score": self.fake_score}

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", "fake_score", reads=(DATA,) if self.gan else (),
                      updates=self.dmd.fake_updates),
                Phase("generator", "generator", reads=(PAIRS,) if self.regression else ())]

    @property
    def total_steps(self) -> int:
        return self.steps

    def loss(self, batch: dict[str, dict[str, Tensor]], phase: Phase) -> dict[str, Tensor]:
        if phase.name == "fake_score":
            return self.fake_score_loss(batch)
        return self.generator_loss(batch)

    # ------------------------------------------------------------------------ draws

    def condition(self, c: Tensor) -> Cond:
        """The condition of classes c at the job's one w: the real score's guidance strength,
        and the input of networks that take w (a w-conditioned teacher's copies: the generator
        and the fake score)."""
        return self.conditions.cond(c, torch.full(c.shape, self.w, device=c.device))

    def draw(self) -> tuple[Tensor, Cond]:
        """A micro-batch of generator inputs: noise z and the condition of a uniform c, from the
        method's generator."""
        g, n = self.rng, self.micro_batch
        c = torch.randint(0, self.conditions.num_classes, (n,), generator=g, device=g.device)
        return torch.randn((n, *self.shape), generator=g, device=g.device), self.condition(c)

    def noised(self, x: Tensor, t: Tensor) -> Tensor:
        """z_t = alpha_t x + sigma_t eps."""
        eps = torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)
        alpha, sigma = (broadcast_like(v.to(x.dtype), x) for v in self.schedule.alpha_sigma(t))
        return alpha * x + sigma * eps

    def times(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """t ~ U[low, high] (U(0, 1] by default)."""
        return low + (high - low) * uniform_t(n, generator=self.rng, device=self.rng.device)

    def generate(self) -> tuple[Tensor, Cond]:
        """(G(z, c), its condition) for a fresh draw; for an N-step generator its output at the
        exit step of its own sampler chain (backward simulation, see the module docstring)."""
        z, cond = self.draw()
        steps = self.dmd.generator_steps
        if steps == 1:
            return one_step(self.generator, self.generator_config, self.schedule, z, cond), cond
        g = self.rng
        if self.dmd.exit_step == "uniform":
            step = torch.randint(0, steps, (len(z),), generator=g, device=g.device)
        else:
            step = torch.full((len(z),), steps - 1, device=g.device)
        xi = torch.randn((len(z), steps - 1, *self.shape), generator=g, device=g.device)
        with torch.no_grad():
            chain = renoise_states(self.generator_x_hat, z, cond, self.schedule, steps=steps,
                                   xi=xi.to(z.dtype))
            states = list(itertools.islice(chain, int(step.max()) + 1))
        rows = torch.arange(len(z), device=z.device)
        t = torch.stack([t for t, _ in states])[step, rows]
        z_t = torch.stack([z_t for _, z_t in states])[step, rows]
        return self.generator_x_hat(z_t, t, cond), cond

    def generator_x_hat(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The generator as a Denoiser: its x_hat at (z_t, t)."""
        return denoise(self.generator, self.schedule, self.generator_config.prediction, z_t, t,
                       cond)

    # ------------------------------------------------------------------------ losses

    def fake_score_loss(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        with torch.no_grad():
            x, cond = self.generate()
        t = self.times(len(x))
        z_t = self.noised(x, t)
        out = self.fake_score(z_t, t, cond)
        denoising = output_loss(out, self.fake_config, self.schedule, self.weighting, z_t, t,
                                x).mean()
        loss, values = denoising, {"loss_denoise": denoising.detach()}
        if self.gan:
            t_fake = self.times(len(x), high=self.dmd.gan_t_max)
            _, fake_logits = self.fake_score(self.noised(x, t_fake), t_fake, cond, classify=True)
            real = batch[DATA]
            t_real = self.times(len(real["x"]), high=self.dmd.gan_t_max)
            _, real_logits = self.fake_score(self.noised(real["x"], t_real), t_real,
                                             self.condition(real["c"]), classify=True)
            head = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            loss = loss + self.dmd.gan_head_weight * head
            values["loss_head"] = head.detach()
        return {"loss": loss, **values}

    def generator_loss(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        x, cond = self.generate()
        t = self.times(len(x), self.dmd.t_min, self.dmd.t_max)
        with torch.no_grad():
            z_t = self.noised(x.detach(), t)
            x_real = self.teacher(z_t, t, cond).to(x.dtype)
            x_fake = denoise(self.precisely("fake_score"), self.schedule,
                             self.fake_config.prediction, z_t, t, cond)
            grad = dm_gradient(x=x.detach(), x_real=x_real, x_fake=x_fake)
        matching = 0.5 * F.mse_loss(x, x.detach() - grad)
        loss, values = matching, {"loss_dm": matching.detach()}
        if self.regression:
            regression = pair_regression(self.generator, self.generator_config, self.schedule,
                                         batch[PAIRS], self.distance)
            loss = loss + self.dmd.regression_weight * regression
            values["loss_reg"] = regression.detach()
        if self.gan:
            t_gan = self.times(len(x), high=self.dmd.gan_t_max)
            _, logits = self.fake_score(self.noised(x, t_gan), t_gan, cond, classify=True)
            adversarial = F.softplus(-logits).mean()
            loss = loss + self.dmd.gan_weight * adversarial
            values["loss_gan"] = adversarial.detach()
        return {"loss": loss, **values}


# ------------------------------------------------------------------------- registry entry


def _check(job: TrainJob, teacher: Checkpoint, student: ModelConfig) -> None:
    check_generator_job(job, teacher, student)
    dmd = job.settings
    if dmd.regression_weight > 0 and not job.pairs:
        raise ConfigError("pairs", f"dmd.regression_weight is {dmd.regression_weight:g}: the "
                                   "regression loss needs ODE pairs (`raydistill pairs --mode "
                                   "ode`); or set dmd.regression_weight=0 (DMD2)")
    if job.pairs and dmd.regression_weight == 0:
        raise ConfigError("pairs", "is given but dmd.regression_weight is 0: nothing would read "
                                   "it")
    fake = _fake_config(teacher, student)
    require_balanced_weighting(dmd.fake_weighting, fake, "dmd.fake_weighting")
    if dmd.gan_weight > 0 and fake.kind not in FEATURE_LAYERS:
        raise ConfigError("dmd.gan_weight", f"the GAN head reads features of a "
                                            f"{', '.join(FEATURE_LAYERS)} fake score, not of a "
                                            f"{fake.kind}")
    if dmd.gan_weight > 0 and dmd.gan_head == "conv" and fake.kind == "mlp":
        raise ConfigError("dmd.gan_head", "conv reads a UNet's bottleneck map; an mlp fake score "
                                          "has feature vectors (use mlp)")


def _fake_config(teacher: Checkpoint, student: ModelConfig) -> ModelConfig:
    """The fake score is the teacher's network, or, for an analytic teacher (no network), the
    generator's."""
    return student if teacher.config.kind == "gmm" else teacher.config


def _streams(job: TrainJob) -> tuple[str, ...]:
    dmd: DMDConfig = job.settings
    return ((PAIRS,) if dmd.regression_weight > 0 else ()) + ((DATA,) if dmd.gan_weight > 0 else ())


def _build(job: TrainJob, teacher: Checkpoint, student_config: ModelConfig,
           student: nn.Module) -> DistributionMatching:
    dmd: DMDConfig = job.settings
    fake_config = _fake_config(teacher, student_config)
    source = student if teacher.config.kind == "gmm" else teacher.network
    net = copy.deepcopy(source).float().requires_grad_(True).train()
    device = next(student.parameters()).device
    with torch.random.fork_rng(devices=[]):      # the head: the same on every rank and attempt
        torch.manual_seed(derive_seed(job.seed, MODULES_STREAM))
        fake_score = FakeScore(net, fake_config,
                               head=dmd.gan_head if dmd.gan_weight > 0 else None).to(device)
    return DistributionMatching(
        teacher=teacher.w_denoiser, generator=student, fake_score=fake_score,
        generator_config=student_config, fake_config=fake_config,
        schedule=teacher.denoiser.schedule, dmd=dmd, w=job.guidance.w_min,
        conditions=teacher.conditioning.conditions, shape=teacher.data_shape,
        weighting=dmd.fake_weighting, steps=job.optim.steps,
        distance=make_distance(dmd.distance, dmd.lpips, device) if job.pairs else None)


SPEC = MethodSpec(name="dmd", pairs_mode="ode",
                  round_length=lambda job: ("optim.steps", job.optim.steps),
                  student=lambda config: config, check=_check, check_pairs=check_ode_pairs,
                  record=lambda job, index: generator_meta("dmd", job.guidance.w_min,
                                                           steps=job.settings.generator_steps),
                  build=_build, modules=("generator", "fake_score"), streams=_streams,
                  section="dmd", settings=DMDConfig,
                  updates=lambda job: {"fake_score": job.settings.fake_updates})
