"""The same image sources as a Ray Dataset, for consumers at scale (training workers that evaluate
the teacher inline, reference statistics): files are read by Ray Data and decoded and conformed on
CPU workers, not on the trainers.

Rows: `key` (str, the same sample names the in-process reader uses), `image` (float32 [C, H, W] in
[-1, 1] at data.resolution) and `label` (int64; 0 for unlabelled data). Every sample of the source
is a row: the in-process train / held-out split is not applied (keep a reference set in its own
location).

Decoding goes through the very functions of the in-process path (`read_image`, `conform`, the
WebDataset label rules), so both paths give the same tensors. Folders are read with
`read_binary_files` rather than `read_images`, because `read_images` keeps PIL's native mode
(palette images come out as palette indices, RGBA as four channels). Arrays (digits, an npz)
are loaded by the driver and conformed in batches on the workers. Rows must stack into batches,
so `data.channels` must be set for folder and WebDataset sources (the in-process reader can
instead pick the widest channel count after seeing every image).
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
)
from raydistill.storage import Location


def image_dataset(config: DataConfig):
    """A Ray Dataset of every sample of the source (see the module docstring for the columns)."""
    import ray.data

    if config.source in ("digits", "npz"):
        return _array_dataset(config)
    if not config.channels:
        raise ConfigError("data.channels", f"must be 1 or 3 to read a {config.source} source "
                                           "through Ray Data (batches need one channel count)")
    if config.source == "folder":
        files, labels = list_folder(config.path)        # fails early on an empty or mixed folder
        label_of = dict(zip(files, labels.tolist())) if labels is not None else {}
        paths = [os.path.abspath(f) for f in files]
        by_abspath = {p: f for p, f in zip(paths, files)}

        def decode_file(row: dict) -> dict:
            import io

            key = by_abspath[row["path"]]
            pixels = read_image(io.BytesIO(row["bytes"]), key)
            return _row(key, pixels, label_of.get(key, 0), config)

        return ray.data.read_binary_files(paths, include_paths=True).map(decode_file)
    if config.source == "webdataset":
        location = Location.parse(config.path)
        shards = [name for name in location.list() if name.endswith(".tar")]
        if not shards:
            raise ConfigError(config.path, "holds no .tar shards")
        base = config.path.rstrip("/")

        def decode_sample(row: dict) -> dict:
            shard = os.path.basename(row["__url__"])
            name = f"{base}/{shard}:{os.path.basename(row['__key__'])}"
            members = {k.lower(): v for k, v in row.items() if not k.startswith("__")}
            label = member_label(members, name)
            return _row(name, decode_member_image(members, name), 0 if label is None else label,
                        config)

        return ray.data.read_webdataset([location.path(s) for s in shards], filesystem=location.fs,
                                        decoder=None).map(decode_sample)
    raise ConfigError("data.source", f"{config.source} holds no images to read")


def _row(key: str, pixels: np.ndarray, label: int, config: DataConfig) -> dict:
    image = conform(pixels[None], config, key)[0].numpy()
    return {"key": key, "image": image, "label": np.int64(label)}


def _array_dataset(config: DataConfig):
    """Digits or an npz: arrays already in driver memory, conformed in batches on the workers."""
    import ray.data

    if config.source == "digits":
        images, labels = digits_arrays(config)
        images, labels, name = images.numpy(), labels.astype(np.int64), "digits"

        def prepare(batch: np.ndarray) -> np.ndarray:
            return batch
    else:
        images, labels = read_npz(config.path)
        labels = np.zeros(len(images), np.int64) if labels is None else labels.astype(np.int64)
        name = config.path

        def prepare(batch: np.ndarray) -> np.ndarray:
            return conform(batch, config, name).numpy()

    def conform_batch(batch: dict) -> dict:
        return {"key": np.asarray([f"{name}:{i}" for i in batch["index"]]),
                "image": prepare(batch["image"]), "label": batch["label"]}

    rows = [{"index": i, "image": image, "label": label}
            for i, (image, label) in enumerate(zip(images, labels))]
    return ray.data.from_items(rows).map_batches(conform_batch, batch_format="numpy")
