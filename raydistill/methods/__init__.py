"""Distillation methods: losses and targets in pure torch (see base.Method for the contract)."""

from raydistill.methods.base import Method, Phase, Round
from raydistill.methods.guided import GuidedDistillation
from raydistill.methods.progressive import ProgressiveDistillation, round_steps

__all__ = ["GuidedDistillation", "Method", "Phase", "ProgressiveDistillation", "Round", "round_steps"]
