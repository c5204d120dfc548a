"""The schedules training follows, shared by the teacher's trainer (raydistill.pretrain) and the
distillation loop (raydistill.train): the learning rate's warm-up and decay, and the EMA's decay."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(decay: float, step: int) -> float:
    """The decay of an EMA's update number `step` (0, 1, ...) since it started: min(decay,
    (1 + step) / (10 + step)). Warmed up, the average forgets where it started within tens of
    updates, whatever `decay`: with a fixed 0.999, a student started from its teacher's weights
    would still hold 0.999^500 = 61% of them after 500 steps."""
    return min(decay, (1 + step) / (10 + step))
