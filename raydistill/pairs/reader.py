"""Reading pair shards for training: every shard is checked against the manifest (sha256 and sample
count) as it is read, so a truncated or altered shard raises a ShardError naming it instead of
hanging or silently shortening an epoch.

Two paths, one decoder: `PairReader` streams shards in-process (split across ranks and DataLoader
workers), and `PairShards` / `ray_dataset` read them through Ray Data so decoding runs on Ray CPU
workers (training workers stream their part through raydistill.train.stream).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from raydistill.data.units import Source, Unit, require_shards_per_worker, shuffled
from raydistill.pairs.format import Layout, ShardError, decode_shard
from raydistill.pairs.manifest import Manifest, read_run
from raydistill.storage import Location


def open_pairs(uri: str) -> tuple[Location, Manifest, Layout]:
    """The location, its manifest and its samples' layout; raises ShardError if it holds no
    pairs."""
    location = Location.parse(uri)
    run = read_run(location)
    manifest = Manifest.read(location)
    if run is None or not len(manifest):
        raise ShardError(uri, "no pairs here (missing pairs.json or empty manifest)")
    return location, manifest, Layout.of(run["identity"])


def read_shard(location: Location, row: dict, layout: Layout) -> list[dict]:
    """The verified samples of one manifest row."""
    name = row["shard"]
    try:
        data = location.read(name)
    except FileNotFoundError:
        raise ShardError(name, "listed in the manifest but missing") from None
    if len(data) != row["bytes"]:
        raise ShardError(name, f"has {len(data)} bytes, the manifest says {row['bytes']} "
                               "(truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise ShardError(name, "sha256 differs from the manifest (altered)")
    samples = list(decode_shard(data, name, layout))
    if len(samples) != row["count"]:
        raise ShardError(name, f"has {len(samples)} samples, the manifest says {row['count']}")
    return samples


class PairReader(IterableDataset):
    """Streams verified samples as dicts of tensors; rank r of w reads shards r, r + w, ..."""

    def __init__(self, uri: str, *, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                 seed: int = 0):
        self.location, self.manifest, self.layout = open_pairs(uri)
        names = sorted(self.manifest.rows)
        self.shards = names[rank::world_size]
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        info = get_worker_info()
        if info is not None:
            shards = shards[info.id::info.num_workers]
        for name in shards:
            samples = read_shard(self.location, self.manifest.rows[name], self.layout)
            if self.shuffle:
                random.Random(f"{self.seed}-{self.epoch}-{name}").shuffle(samples)
            for sample in samples:
                yield {k: torch.as_tensor(v) for k, v in sample.items() if k != "__key__"}


class PairShards(Source):
    """Rank `rank` of `world`'s pair shards (every world-th, verified as they are read) for Ray Data;
    an epoch visits them and their samples in seeded orders."""

    CHECKED = ("shard", "bytes", "sha256", "count")        # what read_shard verifies against

    def __init__(self, uri: str, *, rank: int = 0, world: int = 1):
        _, manifest, self.layout = open_pairs(uri)
        names = sorted(manifest.rows)
        require_shards_per_worker(len(names), world, uri)
        self.uri = uri
        self.rows = [{k: manifest.rows[name][k] for k in self.CHECKED}
                     for name in names[rank::world]]

    def units(self, rng: np.random.Generator | None) -> list[Unit]:
        if rng is None:
            return [Unit({**row, "seed": None}, row["count"]) for row in self.rows]
        return [Unit({**self.rows[i], "seed": int(rng.integers(2**63))}, self.rows[i]["count"])
                for i in rng.permutation(len(self.rows))]

    def read(self, item: dict) -> list[dict]:
        samples = read_shard(Location.parse(self.uri), item, self.layout)
        rows = [{k: np.asarray(v) for k, v in sample.items() if k != "__key__"}
                for sample in samples]
        return shuffled(rows, item["seed"])


def ray_dataset(uri: str):
    """A Ray Dataset of verified samples (columns per the mode's schema), decoded on Ray workers."""
    source = PairShards(uri)
    return source.dataset(source.units(None))
