"""How a model may be sampled, from what its checkpoint records (`extra`): a distilled student's
built-in guidance strength or the range it was distilled for, and the one sampler a progressive
student or a generator was distilled for, and the denoiser that honours a guidance strength.
`sample`, `eval`, pair workers, training and `export` all ask this policy (Checkpoint.sampling)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raydistill.config import ConfigError
from raydistill.diffusion.guidance import CFG, Denoiser
from raydistill.diffusion.multistep import renoise_sample
from raydistill.diffusion.progressive import stochastic_sample


@dataclass(frozen=True)
class DistilledSampler:
    """How a distilled student must be sampled: `steps` DDIM steps on the uniform t grid, Meng et
    al.'s stochastic sampler with `steps` steps (a progressive student), or a generator's (kd,
    dmd) re-noising sampler (`renoise`, raydistill.diffusion.multistep; one step: its x_hat at
    t = 1). Generators written before the re-noising sampler recorded one DDIM step from t = 1."""

    steps: int
    stochastic: bool
    renoise: bool = False

    @property
    def ddim_equivalent(self) -> bool:
        """Whether `steps` DDIM steps on the uniform grid are this sampler: for a progressive
        student, and for a one-step generator (its x_hat at t = 1 is one DDIM step to t = 0, where
        alpha = 1); not for Meng et al.'s stochastic sampler or a multi-step generator's
        re-noising one."""
        return not self.stochastic or (self.renoise and self.steps == 1)

    @property
    def solver(self) -> str:
        """Its name in an evaluation's rows: ddim, stochastic or renoise."""
        return "renoise" if self.renoise else "stochastic" if self.stochastic else "ddim"

    def __str__(self) -> str:
        if self.renoise and self.steps == 1:
            return "one step from t = 1 (a one-step generator)"
        if self.renoise:
            return f"the {self.steps}-step re-noising sampler of a multi-step generator"
        if self.stochastic:
            return f"Meng et al.'s stochastic sampler with {self.steps} steps"
        return f"{self.steps} DDIM steps on the uniform t grid"


@dataclass(frozen=True)
class SamplingPolicy:
    """A model's sampling rules: `w_conditioned`, whether it takes w as an input; `extra`, what
    its checkpoint records (a student's method, guidance range and sampler)."""

    w_conditioned: bool
    extra: dict[str, Any]

    @property
    def built_in_w(self) -> float | None:
        """The guidance strength a distilled student without a w input learned: its outputs are
        already guided. None for a w-conditioned student or a model that was not distilled."""
        if self.w_conditioned or "method" not in self.extra:
            return None
        return float(self.extra["w_min"])

    @property
    def default_w(self) -> float:
        """The guidance strength to sample with when none is given: a student's built-in w, else
        1 (clamped into the range a w-conditioned student was distilled for)."""
        if self.built_in_w is not None:
            return self.built_in_w
        if self.w_conditioned and "method" in self.extra:
            return min(max(1.0, float(self.extra["w_min"])), float(self.extra["w_max"]))
        return 1.0

    def w_denoiser(self, denoiser: Denoiser) -> Denoiser:
        """The model's `denoiser` made to honour cond["w"]: a w-conditioned student takes w as an
        input and a student with guidance built in is used as it is (see check_guidance); any
        other model gets classifier-free guidance (both branches in one batched call)."""
        if self.w_conditioned or self.built_in_w is not None:
            return denoiser
        return CFG(denoiser)

    def check_guidance(self, w_min: float, w_max: float, key: str, *, force: bool = False,
                       force_key: str = "") -> None:
        """Refuse guidance strengths other than the one a student has built in, or (unless
        `force`, the flag or config key `force_key`) outside the range a w-conditioned student was
        distilled for."""
        w = self.built_in_w
        if w is not None and not w_min == w_max == w:
            raise ConfigError(key, f"the model is a distilled student with guidance w={w:g} built "
                                   f"in (no w input); it cannot give w in [{w_min:g}, {w_max:g}]")
        if self.w_conditioned and "method" in self.extra and not force:
            lo, hi = float(self.extra["w_min"]), float(self.extra["w_max"])
            if w_min < lo or w_max > hi:
                span = f"{w_min:g}" if w_min == w_max else f"[{w_min:g}, {w_max:g}]"
                raise ConfigError(key, f"{span} is outside the guidance range [{lo:g}, {hi:g}] "
                                       f"the student was distilled for{_forcing(force_key)}")

    @property
    def distilled_sampler(self) -> DistilledSampler | None:
        """How a student distilled for one sampler (its record names the steps: a progressive
        student, a generator) must be sampled; None for any other model, which samples with any
        solver and step count."""
        if "method" not in self.extra or "steps" not in self.extra:
            return None
        return DistilledSampler(int(self.extra["steps"]), bool(self.extra.get("stochastic")),
                                self.extra.get("sampler") == "renoise")

    def default_steps(self, otherwise: int) -> int:
        """The steps to sample with when none are given: those a student was distilled for, else
        `otherwise`."""
        distilled = self.distilled_sampler
        return distilled.steps if distilled else otherwise

    @property
    def default_solver(self) -> str:
        """The solver a model is sampled with unless asked otherwise (a row's name in an
        evaluation): a distilled student's sampler, else ddim."""
        distilled = self.distilled_sampler
        return distilled.solver if distilled else "ddim"

    @property
    def default_stochastic(self) -> bool:
        """Whether a model is sampled with a stochastic sampler unless asked otherwise."""
        distilled = self.distilled_sampler
        return distilled is not None and distilled.stochastic

    @property
    def is_stochastic_student(self) -> bool:
        """Whether the model is a progressive student distilled for Meng et al.'s stochastic
        sampler (its 2/N jumps)."""
        distilled = self.distilled_sampler
        return distilled is not None and distilled.stochastic and not distilled.renoise

    @property
    def stochastic_solver(self) -> str:
        """The name of `stochastic_sampler` (a row's solver): renoise or stochastic."""
        distilled = self.distilled_sampler
        return "renoise" if distilled is not None and distilled.renoise else "stochastic"

    @property
    def stochastic_sampler(self) -> Callable[..., torch.Tensor]:
        """The sampler with re-noise draws xi this model is sampled with when asked for a
        stochastic one: a multi-step generator's re-noising sampler, else Meng et al.'s (the two
        take the same arguments)."""
        distilled = self.distilled_sampler
        return renoise_sample if distilled is not None and distilled.renoise else stochastic_sample

    def check_sampler(self, *, steps: int, solver: str, spacing: str, stochastic: bool,
                      keys: dict[str, str], force: bool = False, force_key: str = "") -> None:
        """Refuse sampling a distilled student with settings it was not distilled for, unless
        `force` (the flag or config key `force_key`): ConfigError naming the setting by `keys`
        (steps, solver, spacing, stochastic -> its flag or config key)."""
        distilled = self.distilled_sampler
        if distilled is None or force:
            return
        problems = {"steps": f"is {steps}" if steps != distilled.steps else "",
                    "stochastic": "" if stochastic == distilled.stochastic else
                    "asks for the stochastic sampler" if stochastic else "asks for an ODE solver"}
        if not stochastic:
            problems["solver"] = f"is {solver}" if solver != "ddim" else ""
            problems["spacing"] = f"is {spacing}" if spacing != "uniform_t" else ""
        for name, problem in problems.items():
            if problem:
                raise ConfigError(keys[name], f"{problem}, but the model is a "
                                              f"{self.extra['method']} student "
                                              f"distilled for {distilled}{_forcing(force_key)}")


def _forcing(force_key: str) -> str:
    return f" ({force_key} samples it anyway)" if force_key else ""
