"""Randomness is explicit: each consumer draws from its own seeded stream, never from torch's
global generator, so that a run (or a shard) can be regenerated, and a training run resumed, draw
for draw.

Training streams are derive_seed(job.seed, rank, STREAM, position) with one STREAM per consumer;
pair shards use derive_seed(run_seed, shard) and their samples derive_seed(shard_seed, i).
"""

from __future__ import annotations

import numpy as np

MIXTURE_STREAM = 1       # exact mixture draws, per micro-batch (raydistill.train.stream)
METHOD_STREAM = 2        # a method's t, noise and w, per optimizer step (raydistill.train.loop)
STUDENT_STREAM = 3       # the student's initialisation (raydistill.train.build)
ORDER_STREAM = 4         # the order a rank reads its data units in, per epoch (train.stream)
MODULES_STREAM = 5       # a method's own new layers (e.g. DMD2's GAN head), same on every rank


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence: independent streams for distinct inputs)."""
    words = np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)
    return int(words[0]) << 31 ^ int(words[1])
