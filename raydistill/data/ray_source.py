"""The same image sources for Ray Data, for consumers at scale (training workers that evaluate the
teacher inline, reference statistics): files are read and decoded by Ray Data tasks on CPU workers,
not on the trainers, unit by unit (raydistill.data.units): blocks of array rows or of image files,
WebDataset tars.

Rows: `key` (str, the same sample names the in-process reader uses), `image` (float32 [C, H, W] in
[-1, 1] at data.resolution) and `label` (int64; 0 for unlabelled data). Every sample of the source
is a row: the in-process train / held-out split is not applied (keep a reference set in its own
location).

Decoding goes through the very functions of the in-process path (`read_image`, `conform`, the
WebDataset label rules), so both paths give the same tensors. Arrays (digits, an npz) are loaded
once and conformed in blocks on the workers. Rows must stack into batches, so `data.channels`
must be set for folder and WebDataset sources (the in-process reader can instead pick the widest
channel count after seeing every image).
"""

from __future__ import annotations

import os

import numpy as np

from raydistill.config import ConfigError, DataConfig
from raydistill.data.digits import digits_arrays
from raydistill.data.sources import (
    conform,
    decode_member_image,
    list_folder,
    member_label,
    read_image,
    read_npz,
    tar_samples,
)
from raydistill.data.units import Source, Unit, require_shards_per_worker, shuffled, split_rows
from raydistill.storage import Location

BLOCK_ROWS = 256                     # array rows per read task
BLOCK_FILES = 64                     # image files per read task


def image_source(config: DataConfig, *, rank: int = 0, world: int = 1) -> Source:
    """Rank `rank` of `world`'s part of an image source (see the module docstring for the rows)."""
    if config.source in ("digits", "npz"):
        return ArrayImages(config, rank, world)
    if not config.channels:
        raise ConfigError("data.channels", f"must be 1 or 3 to read a {config.source} source "
                                           "through Ray Data (batches need one channel count)")
    if config.source == "folder":
        return FolderImages(config, rank, world)
    if config.source == "webdataset":
        return TarImages(config, rank, world)
    raise ConfigError("data.source", f"{config.source} holds no images to read")


def image_dataset(config: DataConfig):
    """A Ray Dataset of every sample of the source, in the source's order."""
    source = image_source(config)
    return source.dataset(source.units(None))


def _row(key: str, pixels: np.ndarray, label: int, config: DataConfig) -> dict:
    image = conform(pixels[None], config, key)[0].numpy()
    return {"key": key, "image": image, "label": np.int64(label)}


def _blocks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class ArrayImages(Source):
    """Digits or an npz: arrays loaded once, conformed in blocks of rows on the workers; an epoch
    visits this rank's rows in a seeded permutation."""

    def __init__(self, config: DataConfig, rank: int, world: int):
        self.config = config
        if config.source == "digits":
            images, labels = digits_arrays(config)
            self.images, self.name, self.conformed = images.numpy(), "digits", True
        else:
            self.images, labels = read_npz(config.path)
            self.name, self.conformed = config.path, False
            if labels is None:
                labels = np.zeros(len(self.images), np.int64)
        self.labels = np.asarray(labels, np.int64)
        self.rows = split_rows(len(self.images), rank, world)

    def units(self, rng: np.random.Generator | None) -> list[Unit]:
        rows = self.rows if rng is None else rng.permutation(self.rows)
        return [Unit({"index": block.tolist()}, len(block)) for block in _blocks(rows, BLOCK_ROWS)]

    def read(self, item: dict) -> list[dict]:
        index = np.asarray(item["index"], np.int64)
        images = self.images[index]
        if not self.conformed:
            images = conform(images, self.config, self.name).numpy()
        return [{"key": f"{self.name}:{i}", "image": image, "label": label}
                for i, image, label in zip(index.tolist(), images, self.labels[index])]


class FolderImages(Source):
    """Image files (ImageFolder layout or flat), decoded in blocks; an epoch visits this rank's
    files in a seeded permutation."""

    def __init__(self, config: DataConfig, rank: int, world: int):
        self.config = config
        files, labels = list_folder(config.path)    # fails early on an empty or mixed folder
        self.files, self.paths = files, [os.path.abspath(f) for f in files]   # keys, reads
        self.labels = np.zeros(len(files), np.int64) if labels is None else labels
        self.rows = split_rows(len(files), rank, world)

    def units(self, rng: np.random.Generator | None) -> list[Unit]:
        rows = self.rows if rng is None else rng.permutation(self.rows)
        return [Unit({"index": block.tolist()}, len(block)) for block in _blocks(rows, BLOCK_FILES)]

    def read(self, item: dict) -> list[dict]:
        return [_row(self.files[i], read_image(self.paths[i], self.files[i]),
                     int(self.labels[i]), self.config) for i in item["index"]]


def tar_shards(config: DataConfig) -> list[str]:
    """The .tar shards of a webdataset image source, by name."""
    shards = [name for name in Location.parse(config.path).list() if name.endswith(".tar")]
    if not shards:
        raise ConfigError(config.path, "holds no .tar shards")
    return shards


class TarImages(Source):
    """WebDataset image tars (LAION-style: per key a jpg / png / webp and a label in cls or json);
    a rank reads whole tars, an epoch visits them and their samples in seeded orders."""

    def __init__(self, config: DataConfig, rank: int, world: int):
        self.config = config
        shards = tar_shards(config)
        require_shards_per_worker(len(shards), world, config.path)
        self.shards = shards[rank::world]

    def units(self, rng: np.random.Generator | None) -> list[Unit]:
        if rng is None:
            return [Unit({"shard": shard, "seed": None}, None) for shard in self.shards]
        return [Unit({"shard": self.shards[i], "seed": int(rng.integers(2**63))}, None)
                for i in rng.permutation(len(self.shards))]

    def read(self, item: dict) -> list[dict]:
        location = Location.parse(self.config.path)
        where = f"{self.config.path.rstrip('/')}/{item['shard']}"
        rows = []
        for key, members in tar_samples(location.read(item["shard"]), where):
            name = f"{where}:{key}"
            label = member_label(members, name)
            rows.append(_row(name, decode_member_image(members, name),
                             0 if label is None else label, self.config))
        return shuffled(rows, item["seed"])

