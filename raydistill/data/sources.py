"""Image sources (digits, npz arrays, image folders): every consumer of real data (teacher
training, guided targets, classifiers) reads through `load_images(config)`, which returns a
train / held-out Split of images in [-1, 1] at the configured resolution and channel count, with
labels.

Conversions, in order: to float in [-1, 1] (uint8 0..255, or float already in [0, 1] or [-1, 1]),
channels (grayscale <-> RGB when `channels` asks), then center-crop to a square and bilinear
resize to `resolution` (or, with resize false, a check that every image already has that size).
Unlabelled data gets the single class 0; the null class for guidance is added by the model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.config import ConfigError, DataConfig
from raydistill.data.digits import Split, load_digits, split_labelled
from raydistill.storage import Location


def load_images(config: DataConfig) -> Split:
    """The Split a DataConfig describes (raises ConfigError naming the file and sample at fault)."""
    if config.source == "digits":
        return load_digits(config)
    _, images, labels = read_samples(config)
    return split_labelled(images, labels, config)


def read_samples(config: DataConfig) -> tuple[list[str], Tensor, np.ndarray | None]:
    """Every sample of a file-based source, unsplit: a key naming each sample (`FILE`, or
    `FILE:INDEX` / `SHARD:KEY` inside a file), the conformed images and the labels (or None)."""
    if config.source == "npz":
        images, labels = read_npz(config.path)
        keys = [f"{config.path}:{i}" for i in range(len(images))]
        return keys, conform(images, config, config.path), labels
    if config.source == "folder":
        files, labels = list_folder(config.path)
        return files, conform_each([read_image(file) for file in files], files, config), labels
    if config.source == "webdataset":
        return read_image_shards(config)
    raise ConfigError("data.source", f"{config.source} holds no image files to read")


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` and optional `labels` from an .npz (never unpickling object arrays)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if "images" not in names:
                raise ConfigError(path, f"has no 'images' array (found {sorted(names) or 'none'})")
            images = archive["images"]
            labels = archive["labels"] if "labels" in names else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(path, f"not a readable .npz ({type(exc).__name__}: {exc})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ConfigError(path, f"'images' must be [N,H,W] or [N,C,H,W] with C 1 or 3 and N > 0, "
                                f"got shape {images.shape}")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(path, f"'labels' must be {len(images)} integers, got "
                                    f"{labels.dtype} {labels.shape}")
        if labels.min() < 0:
            bad = int(np.argmin(labels))
            raise ConfigError(path, f"label of sample {bad} is {labels[bad]} (labels must be >= 0)")
    return images, labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_folder(path: str) -> tuple[list[str], np.ndarray | None]:
    """Image files under `path` and their labels: one class per subdirectory (ImageFolder layout,
    classes in sorted name order), or a flat folder of unlabelled images."""
    if not os.path.isdir(path):
        raise ConfigError(path, "is not a directory")
    entries = sorted(os.listdir(path))
    classes = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    loose = [e for e in entries if e.lower().endswith(IMAGE_SUFFIXES)]
    if classes and loose:
        raise ConfigError(path, f"mixes class folders ({classes[0]}/, ...) with loose images "
                                f"({loose[0]}, ...)")
    if not classes:
        files, labels = [os.path.join(path, e) for e in loose], None
    else:
        files, label_list = [], []
        for label, name in enumerate(classes):
            for root, _, names in sorted(os.walk(os.path.join(path, name))):
                for file in sorted(names):
                    if file.lower().endswith(IMAGE_SUFFIXES):
                        files.append(os.path.join(root, file))
                        label_list.append(label)
        labels = np.asarray(label_list, np.int64)
    if not files:
        raise ConfigError(path, f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, labels


def read_image(file: str | io.BytesIO, where: str | None = None) -> np.ndarray:
    """One image (a path or encoded bytes) as uint8 [C, H, W] (C = 1 for grayscale, else 3)."""
    from PIL import Image, UnidentifiedImageError

    where = where or str(file)
    try:
        with Image.open(file) as image:
            image.load()
            gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(image.convert("L" if gray else "RGB"))
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise ConfigError(where, f"unreadable image ({type(exc).__name__}: {exc})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def conform_each(pixels: list[np.ndarray], names: list[str], config: DataConfig) -> Tensor:
    """Images of differing sizes conformed one by one (RGB when grayscale and colour are mixed
    and `channels` does not say)."""
    channels = config.channels or max(p.shape[0] for p in pixels)
    per_image = dataclasses.replace(config, channels=channels)
    return torch.cat([conform(p[None], per_image, name) for p, name in zip(pixels, names)])


IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


def read_image_shards(config: DataConfig) -> tuple[list[str], Tensor, np.ndarray | None]:
    """Keys, images and labels from WebDataset tars under a directory or URI (LAION-style layout: per
    key an image member `jpg` / `jpeg` / `png` / `webp`, and a label in `cls` or in `json` under
    "label" or "cls"; `txt` captions are ignored). Every sample must have a label, or none."""
    location = Location.parse(config.path)
    shards = [name for name in location.list() if name.endswith(".tar")]
    if not shards:
        raise ConfigError(config.path, "holds no .tar shards")
    pixels, names, labels = [], [], []
    for shard in shards:
        where = f"{config.path.rstrip('/')}/{shard}"
        for key, members in tar_samples(location.read(shard), where):
            name = f"{where}:{key}"
            pixels.append(decode_member_image(members, name))
            names.append(name)
            labels.append(member_label(members, name))
    if any(label is None for label in labels):
        if not all(label is None for label in labels):
            missing = names[labels.index(None)]
            raise ConfigError(missing, "has no label while other samples do (cls or json label)")
        return names, conform_each(pixels, names, config), None
    return names, conform_each(pixels, names, config), np.asarray(labels, np.int64)


def decode_member_image(members: dict[str, bytes], name: str) -> np.ndarray:
    """The image member of one WebDataset sample, decoded to uint8 [C, H, W]."""
    image = next((members[ext] for ext in IMAGE_MEMBERS if members.get(ext) is not None), None)
    if image is None:
        raise ConfigError(name, f"has no image member ({', '.join(IMAGE_MEMBERS)})")
    return read_image(io.BytesIO(image), name)


def tar_samples(data: bytes, where: str):
    """(key, {extension: bytes}) per sample of a tar, members grouped by key."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                samples.setdefault(key, {})[ext.lower()] = payload
            if data[tar.offset:tar.offset + 1024] != bytes(1024):
                raise tarfile.ReadError("truncated (no end-of-archive marker)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(where, f"unreadable shard ({type(exc).__name__}: {exc})") from None
    return sorted(samples.items())


def member_label(members: dict[str, bytes], name: str) -> int | None:
    """The label of one WebDataset sample: `cls`, or "label" or "cls" in `json`, or None."""
    try:
        if members.get("cls") is not None:
            label = int(members["cls"].decode().strip())
        elif members.get("json") is not None:
            meta = json.loads(members["json"])
            label = meta.get("label", meta.get("cls"))
            if label is None:
                return None
            label = int(label)
        else:
            return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"label is not an integer ({exc})") from None
    if label < 0:
        raise ConfigError(name, f"label is {label} (labels must be >= 0)")
    return label


def to_unit_range(images: np.ndarray, where: str) -> Tensor:
    """uint8 0..255 or float in [0, 1] / [-1, 1] -> float32 in [-1, 1]."""
    if images.dtype == np.uint8:
        return torch.from_numpy(images.astype(np.float32)) / 127.5 - 1.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ConfigError(where, f"images must be uint8 or float, got {images.dtype}")
    x = torch.from_numpy(images.astype(np.float32))
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(where, f"sample {int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])} "
                                 "has non-finite values")
    low, high = float(x.min()), float(x.max())
    if low >= 0.0 and high <= 1.0:
        return x * 2.0 - 1.0
    if low >= -1.0 and high <= 1.0:
        return x
    raise ConfigError(where, f"float images must lie in [0, 1] or [-1, 1], found [{low:g}, {high:g}]")


def conform(images: np.ndarray, config: DataConfig, where: str) -> Tensor:
    """Scale, convert channels and size images [N, C, H, W] as the DataConfig asks."""
    x = to_unit_range(images, where)
    if config.channels == 1 and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    elif config.channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = config.resolution
    if not config.resize:
        if x.shape[-2:] != (size, size):
            raise ConfigError(where, f"images are {x.shape[-2]}x{x.shape[-1]}, data.resolution is "
                                     f"{size} and data.resize is false")
        return x.contiguous()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=side > size)
    return x.clamp(-1.0, 1.0).contiguous()
