"""What a sample's condition index c means to a model, and the one place a cond dict is built.

Every path draws or reads an integer c per sample (NULL_CLASS for CFG's null branch) and a
guidance strength w. For a class-conditional or unconditional model c is the class label and
{"c", "w"} is the whole condition. For a text-conditioned model c indexes a prompt table, a file
of precomputed encoder_hidden_states [P, L, D] (the text encoder's output for P prompts), and the
condition adds row c of it under "encoder_hidden_states"; the network puts the empty prompt's
embedding where c is NULL_CLASS. So "classes" are prompts for a text model: pairs draw one
uniformly per sample, DMD draws them for its generator, a data set's labels index the table, and
`raydistill sample` draws one grid row per prompt.

The table is read lazily (memory-mapped, the rows a batch uses), so it may be far larger than
memory: a `.safetensors` file with the tensor under "encoder_hidden_states", or an `.npy`. Pair
shards store the rows they used, so training from pairs reads the condition from the batch
(`batch_cond`) and needs no table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raydistill.config import ConfigError
from raydistill.diffusion.guidance import Cond

TEXT = "encoder_hidden_states"
COND_KEYS = ("c", "w", TEXT)          # what a batch may carry of a condition


class PromptTable:
    """The prompt embeddings [P, L, D] in a .safetensors (key "encoder_hidden_states") or .npy
    file; `key` names the setting that gave the path, for errors."""

    def __init__(self, path: str, key: str):
        self.path, self.key, self._rows = path, key, None
        try:
            shape = self._shape()
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(key, f"{path} is not a prompt table ({str(err).splitlines()[0]})") \
                from None
        if len(shape) != 3 or shape[0] < 1:
            raise ConfigError(key, f"{path} holds shape {list(shape)}, not [prompts, tokens, "
                                   "width] encoder_hidden_states")
        self.count, self.length, self.width = shape

    def _open(self):
        """The table indexable by row, opened once per process (memory-mapped): the .npy array,
        or the safetensors tensor's slice (with the file handle it reads through)."""
        if self._rows is None:
            if self.path.endswith(".npy"):
                self._rows = np.load(self.path, mmap_mode="r", allow_pickle=False)
            else:
                from safetensors import safe_open

                handle = safe_open(self.path, "pt")
                if TEXT not in handle.keys():
                    raise KeyError(f"no tensor {TEXT!r}")
                self._handle, self._rows = handle, handle.get_slice(TEXT)
        return self._rows

    def _shape(self) -> tuple[int, ...]:
        rows = self._open()
        return tuple(rows.shape if isinstance(rows, np.ndarray) else rows.get_shape())

    def __getstate__(self) -> dict:
        """Pickled (to a Ray worker) without the open file: the worker opens its own."""
        return {"path": self.path, "key": self.key, "_rows": None, "count": self.count,
                "length": self.length, "width": self.width}

    def rows(self, index: Tensor) -> Tensor:
        """Rows `index` [B] of the table, [B, L, D] float32 on the CPU."""
        table = self._open()
        rows = [torch.from_numpy(np.array(table[i])) if isinstance(table, np.ndarray)
                else table[i] for i in index.cpu().tolist()]
        return torch.stack(rows).float()

    def digest(self) -> str:
        """sha256 of the file: what a pair set made from it records."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()


@dataclass(frozen=True)
class Conditions:
    """The conditions a model is sampled under: `num_classes` indices c, and for a text model
    the prompt table they index."""

    num_classes: int
    prompts: PromptTable | None = None

    def cond(self, c: Tensor, w: Tensor | None = None) -> Cond:
        """The cond dict for indices c [B] (and guidance strengths w [B]), on c's device."""
        cond = {"c": c} if w is None else {"c": c, "w": w}
        if self.prompts is not None:
            cond[TEXT] = self.prompts.rows(c.clamp(min=0)).to(c.device)
        return cond


def batch_cond(batch: dict[str, Tensor]) -> Cond:
    """The condition a batch of pairs carries (c, w and, for a text model, its embeddings)."""
    return {key: batch[key] for key in COND_KEYS if key in batch}
