"""Each training rank's endless stream of micro-batches, resumable at any micro-batch.

A stream's position is (epoch, rows consumed in it); every checkpoint records each rank's, and a
restored stream continues at exactly the row the uninterrupted run would have read next:

- the analytic mixture: micro-batch k is drawn from its own generator, seeded (seed, rank, k);
- pair shards and image sources (raydistill.data.units): epoch e reads this rank's units in the
  order a generator seeded (seed, rank, e) gives, each unit read and decoded by a Ray task; a
  restored epoch skips the units already consumed without reading them, when their row count is
  known, and the consumed rows of the next one. Rows left over at the end of an epoch, fewer than
  a micro-batch, are dropped.

Units are read by plain Ray tasks, READ_AHEAD of them in flight beyond the one being consumed and
across epoch boundaries, rather than by a Ray Data execution per epoch: starting an execution
cost 0.3-0.5 s (every few dozen steps on a small pair set, most of a fast step's cost), and one
execution over many epochs read without bound, decoding on the core training needed units it
would not use for minutes (smoke UNet steps 40% slower).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raydistill.data.units import Source, Unit
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
        self._map: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
        self._device, self._copies, self._ahead = torch.device("cpu"), None, None
        self._read = Position()          # where the reader is: one batch past `position`

    def on(self, device: torch.device) -> Stream:
        self._device = torch.device(device)
        if self._device.type == "cuda":
            self._copies = torch.cuda.Stream(self._device)
        return self

    def map(self, function: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> Stream:
        """Have it hand out function(batch), applied on the device (e.g. a latent teacher's
        encoder)."""
        self._map = function
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
        return batch if self._map is None else self._map(batch)

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


#: Units in flight beyond the one being consumed: enough that the next unit is decoded while this
#: one's rows train, few enough that reading never runs far ahead of training (a read that runs
#: ahead takes CPU time the step needs and memory for rows not used for minutes).
READ_AHEAD = 2


def source_stream(source: Source, *, micro: int, seed: int, rank: int, columns: dict[str, str],
                  name: str) -> Stream:
    """Micro-batches of a rank's Source, `columns` renaming source columns to batch keys (others
    are dropped); `name` says what the data is in the error when it is too small."""
    def order(epoch: int) -> list[Unit]:
        units = source.units(np.random.default_rng(derive_seed(seed, rank, ORDER_STREAM, epoch)))
        known = sum(unit.rows or 0 for unit in units)
        if all(unit.rows is not None for unit in units) and known < micro:
            raise DataTooSmall(f"{name}: {known} samples for this worker, fewer than one "
                               f"micro-batch of {micro}")
        return units

    def batches(position: Position) -> Iterator[dict[str, Tensor]]:
        units, skip = order(position.epoch), position.rows
        while units and units[0].rows is not None and units[0].rows <= skip:
            skip -= units[0].rows
            units = units[1:]
        later = ((epoch, unit) for epoch in itertools.count(position.epoch + 1)
                 for unit in order(epoch))
        reads = Reads(source, list(columns), itertools.chain(
            ((position.epoch, unit) for unit in units), later), READ_AHEAD)
        while True:
            served = position.rows
            for batch in rebatch(reads.epoch(position.epoch), micro, skip):
                position.rows += micro
                # a block's arrays are read-only views of Ray's object store; a batch cut from
                # one block is copied, one merged from two already is
                yield {key: torch.from_numpy(np.require(batch[column], requirements="W"))
                       for column, key in columns.items()}
            if position.rows == 0 == served:
                raise DataTooSmall(f"{name}: fewer samples for this worker than one micro-batch "
                                   f"of {micro}")
            position.epoch, position.rows, skip = position.epoch + 1, 0, 0

    return Stream(batches)


class Reads:
    """Blocks of (epoch, unit)s read by Ray tasks in order, `ahead` units in flight beyond the
    one being consumed. A block is a dict of the `columns` (source columns) as arrays, one row
    per row of the unit."""

    def __init__(self, source: Source, columns: list[str], units: Iterator[tuple[int, Unit]],
                 ahead: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # On a CPU of the cluster's, never in the placement group of the worker that asks: a
        # worker's bundle holds the worker, and one that captures its children (a Ray Train run
        # inside a Ray Tune trial) would leave the reads nowhere to run.
        self._task = ray.remote(num_cpus=1)(read_block).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        self._source, self._columns = ray.put(source), columns
        self._units, self._ahead, self._flight = units, ahead, deque()

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The blocks of `epoch`'s units that are still to come."""
        import ray

        self._fill(self._ahead + 1)
        while self._flight and self._flight[0][0] == epoch:
            reference = self._flight.popleft()[1]
            self._fill(self._ahead)
            block = ray.get(reference)
            if block is not None:
                yield block

    def _fill(self, size: int) -> None:
        while len(self._flight) < size:
            epoch, unit = next(self._units)
            self._flight.append((epoch, self._task.remote(self._source, unit.item, self._columns)))


def read_block(source: Source, item: dict, columns: list[str]) -> dict[str, np.ndarray] | None:
    """One unit's rows as a block of `columns` (None for a unit without rows)."""
    rows = source.read(item)
    if not rows:
        return None
    return {column: np.stack([row[column] for row in rows]) for column in columns}


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
