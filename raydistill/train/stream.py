"""Each training rank's endless stream of micro-batches, resumable at any micro-batch.

A stream's position is (epoch, rows consumed in it); every checkpoint records each rank's, and a
restored stream continues at exactly the row the uninterrupted run would have read next:

- the analytic mixture: micro-batch k is drawn from its own generator, seeded (seed, rank, k);
- pair shards and image sources (raydistill.data.units): epoch e reads this rank's units in the
  order a generator seeded (seed, rank, e) gives, through Ray Data (decoding on Ray CPU workers,
  rows kept in unit order); a restored epoch skips the units already consumed without reading
  them, when their row count is known, and the consumed rows of the next one. Rows left over at
  the end of an epoch, fewer than a micro-batch, are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raydistill.data.units import Source
from raydistill.seeds import MIXTURE_STREAM, ORDER_STREAM, derive_seed
from raydistill.train.errors import FatalTrainingError


class DataTooSmall(FatalTrainingError):
    """A rank's part of the data holds no full micro-batch."""


@dataclass
class Position:
    epoch: int = 0
    rows: int = 0                    # rows consumed in this epoch


class Stream:
    """An iterator of micro-batches (dicts of tensors) that knows its position: where the batches it
    has handed out end. `restore` moves it (before the next batch) to a position a checkpoint
    recorded. `on(device)` has it hand out batches on that device, the next one read and its copy
    issued before the current one is handed out: on CUDA from pinned host memory on a copy stream
    of its own, so that the copy overlaps the step and the host never waits for it."""

    def __init__(self, batches: Callable[[Position], Iterator[dict[str, Tensor]]]):
        self._batches, self.position, self._iterator = batches, Position(), None
        self._device, self._copies, self._ahead = torch.device("cpu"), None, None
        self._read = Position()          # where the reader is: one batch past `position`

    def on(self, device: torch.device) -> Stream:
        self._device = torch.device(device)
        if self._device.type == "cuda":
            self._copies = torch.cuda.Stream(self._device)
        return self

    def restore(self, position: Position) -> None:
        self.position, self._iterator, self._ahead = position, None, None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._iterator is None:
            self._read = dataclasses.replace(self.position)
            self._iterator = self._batches(self._read)
            self._ahead = self._fetch()
        batch, self.position = self._ahead
        self._ahead = self._fetch()
        if self._copies is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_stream(self._copies)
            for value in batch.values():      # memory the copy stream allocated, used on this one
                value.record_stream(current)
        return batch

    def _fetch(self) -> tuple[dict[str, Tensor], Position]:
        batch = next(self._iterator)
        if self._copies is not None:
            with torch.cuda.stream(self._copies):
                batch = {key: value.pin_memory().to(self._device, non_blocking=True)
                         for key, value in batch.items()}
        else:
            batch = {key: value.to(self._device) for key, value in batch.items()}
        return batch, dataclasses.replace(self._read)


def mixture_stream(mixture, *, micro: int, seed: int, rank: int) -> Stream:
    """Exact draws (x, c) of an analytic mixture, micro-batch k from its own seeded generator."""
    def batches(position: Position) -> Iterator[dict[str, Tensor]]:
        while True:
            g = torch.Generator().manual_seed(
                derive_seed(seed, rank, MIXTURE_STREAM, position.rows // micro))
            c = torch.randint(0, mixture.num_classes, (micro,), generator=g)
            x = mixture.sample(c, generator=g).float()
            position.rows += micro
            yield {"x": x, "c": c}

    return Stream(batches)


def source_stream(source: Source, *, micro: int, seed: int, rank: int, columns: dict[str, str],
                  name: str) -> Stream:
    """Micro-batches of a rank's Source, `columns` renaming source columns to batch keys (others
    are dropped); `name` says what the data is in the error when it is too small."""
    def batches(position: Position) -> Iterator[dict[str, Tensor]]:
        while True:
            rng = np.random.default_rng(derive_seed(seed, rank, ORDER_STREAM, position.epoch))
            units, skip = source.units(rng), position.rows
            known = sum(unit.rows or 0 for unit in units)
            if all(unit.rows is not None for unit in units) and known < micro:
                raise DataTooSmall(f"{name}: {known} samples for this worker, fewer than one "
                                   f"micro-batch of {micro}")
            while units and units[0].rows is not None and units[0].rows <= skip:
                skip -= units[0].rows
                units = units[1:]
            blocks = source.dataset(units).iter_batches(batch_size=None, batch_format="numpy",
                                                        prefetch_batches=2)
            served = position.rows
            for batch in rebatch(blocks, micro, skip):
                position.rows += micro
                yield {key: torch.from_numpy(batch[column]) for column, key in columns.items()}
            if position.rows == 0 == served:
                raise DataTooSmall(f"{name}: fewer samples for this worker than one micro-batch "
                                   f"of {micro}")
            position.epoch, position.rows = position.epoch + 1, 0

    return Stream(batches)


def rebatch(blocks: Iterator[dict[str, np.ndarray]], size: int,
            skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `size` rows from blocks of any size, after dropping the first `skip`
    rows; a last, partial batch is dropped."""
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for block in blocks:
        n = len(next(iter(block.values())))
        if skip >= n:
            skip -= n
            continue
        if skip:
            block, n, skip = {k: v[skip:] for k, v in block.items()}, n - skip, 0
        pending.append(block)
        have += n
        while have >= size:
            merged = pending[0] if len(pending) == 1 else {
                k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            have -= size
            pending = [{k: v[size:] for k, v in merged.items()}] if have else []
