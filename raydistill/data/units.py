"""Sources read by Ray Data in units: a unit is one read task's worth of a source (a pair shard, an
image tar, a block of images), decoded on a Ray CPU worker into rows (dicts of numpy values).

A Source is split over ranks by unit and lists its part in a seeded order per epoch, so what a
rank reads is a pure function of (seed, rank, world size, epoch): a training stream can stop
anywhere and continue from the same row (raydistill.train.stream), skipping whole units whose row
count is known without decoding them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from raydistill.config import ConfigError


@dataclass(frozen=True)
class Unit:
    """One read task: `item` is what Source.read gets; `rows` how many rows it yields, when known
    without reading it (None: only reading tells)."""

    item: dict
    rows: int | None


class Source(ABC):
    """A rank's part of a data set, read unit by unit (`read` runs on Ray workers: the object is
    pickled to them, so keep it small)."""

    @abstractmethod
    def units(self, rng: np.random.Generator) -> list[Unit]:
        """This rank's units in one epoch's order (`rng` is seeded per rank and epoch)."""

    @abstractmethod
    def read(self, item: dict) -> list[dict]:
        """The rows of one unit, in the order its item says."""

    def dataset(self, units: list[Unit]):
        """A Ray Dataset of the units' rows, in unit order."""
        import ray.data

        items = [unit.item for unit in units]
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(
            self.read)


def shuffled(rows: list[dict], seed: int | None) -> list[dict]:
    """rows in the order a seed gives (as they are for None)."""
    if seed is None:
        return rows
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def split_rows(count: int, rank: int, world: int) -> np.ndarray:
    """The row indices rank `rank` of `world` reads: every world-th row from `rank`."""
    return np.arange(rank, count, world)


def require_shards_per_worker(count: int, world: int, where: str) -> None:
    """Every worker reads whole shards, so a set needs at least one per worker."""
    if count < world:
        raise ConfigError(where, f"holds {count} shards for {world} workers: every worker reads "
                                 "whole shards (make at least one per worker, or use fewer "
                                 "workers)")
