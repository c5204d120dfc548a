"""The shard format: a WebDataset tar per shard, one sample per key, never pickle.

Per sample `<key>` (`s<shard:06d>_<i:05d>`), members `<key>.<array>.npy` (float32, np.save without
pickle) and `<key>.json` (scalars). Schemas per mode (raydistill.pairs.modes):

| mode          | arrays            | json fields            |
| ------------- | ----------------- | ---------------------- |
| `ode`         | `noise`, `image`  | `c`, `w`, `seed`       |
| `guided`      | `z_t`, `target`   | `c`, `w`, `t`, `seed`  |
| `progressive` | `z_t`, `target`   | `c`, `w`, `t`, `N`, `seed` |

A text model's pairs (their run identity records its prompt table, `prompts`) add the array
`encoder_hidden_states` [L, D] to every sample: the prompt embedding its c indexes
(raydistill.conditions), so training from them needs no table.

`ode`: image = the teacher's ODE solution from noise z_1 under guidance w (class c). `guided`:
target = x_hat_w(z_t, c), the guided teacher's prediction (methods.guided.guided_target).
`progressive`: target = x_tilde, the x_hat for which one student DDIM step from z_t lands where the
teacher's own steps do (methods.progressive.halving_target: a jump of 1/N, or 2/N for Meng et
al.'s stochastic sampler). `c = -1` is the null class. Tar members carry fixed metadata, so
regenerating a shard gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from raydistill.conditions import TEXT
from raydistill.pairs.modes import MODES

#: (arrays, json fields) per mode, from the mode table
SCHEMAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (mode.arrays, mode.fields) for name, mode in MODES.items()}


@dataclass(frozen=True)
class Layout:
    """What each sample of a pair set holds: its mode's arrays and fields, plus a text model's
    embeddings."""

    mode: str
    text: bool = False

    @classmethod
    def of(cls, identity: dict) -> Layout:
        """The layout of a pair set with this run identity (pairs.json)."""
        return cls(identity["mode"], "prompts" in identity)

    @property
    def arrays(self) -> tuple[str, ...]:
        return SCHEMAS[self.mode][0] + ((TEXT,) if self.text else ())

    @property
    def fields(self) -> tuple[str, ...]:
        return SCHEMAS[self.mode][1]


class ShardError(ValueError):
    """A shard that is missing, truncated, altered or malformed; the message names it."""

    def __init__(self, shard: str, problem: str):
        super().__init__(f"shard {shard}: {problem}")
        self.shard, self.problem = shard, problem


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int, i: int) -> str:
    return f"s{index:06d}_{i:05d}"


def encode_shard(index: int, layout: Layout, columns: dict[str, np.ndarray]) -> bytes:
    """A tar (bytes) of the samples in `columns` (arrays [n, ...] and scalar columns [n])."""
    arrays, fields = layout.arrays, layout.fields
    count = len(columns[arrays[0]])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            key = sample_key(index, i)
            for name in arrays:
                npy = io.BytesIO()
                np.save(npy, np.ascontiguousarray(columns[name][i], dtype=np.float32),
                        allow_pickle=False)
                _add(tar, f"{key}.{name}.npy", npy.getvalue())
            meta = {name: columns[name][i].item() for name in fields}
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def decode_shard(data: bytes, shard: str, layout: Layout) -> Iterator[dict]:
    """The samples of a shard as dicts of numpy arrays and scalars (plus `__key__`)."""
    arrays, fields = layout.arrays, layout.fields
    expected = {f"{name}.npy" for name in arrays} | {"json"}
    layouts: dict[bytes, tuple] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            sample: dict = {}
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    yield _finish(sample, expected, shard)
                    sample = {}
                sample["__key__"] = key
                payload = tar.extractfile(member)
                if payload is None:
                    raise ShardError(shard, f"member {member.name} is not a file")
                if member.offset_data + member.size > len(data):
                    raise ShardError(shard, f"truncated inside member {member.name}")
                raw = payload.read()
                if suffix == "json":
                    meta = json.loads(raw)
                    missing = set(fields) - set(meta)
                    if missing:
                        raise ShardError(shard, f"sample {key} lacks fields {sorted(missing)}")
                    sample.update(meta)
                elif suffix in expected:
                    sample[suffix[:-4]] = load_npy(raw, layouts)
                else:
                    raise ShardError(shard, f"unexpected member {member.name} for mode "
                                            f"{layout.mode}")
                sample.setdefault("__members__", set()).add(suffix)
            if sample:
                yield _finish(sample, expected, shard)
            if data[tar.offset:tar.offset + 1024] != bytes(1024):
                raise ShardError(shard, "truncated (no end-of-archive marker)")
    except (tarfile.TarError, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(shard, f"unreadable ({type(exc).__name__}: {exc})") from None


def load_npy(raw: bytes, layouts: dict[bytes, tuple]) -> np.ndarray:
    """np.load(allow_pickle=False) of one .npy file, its header parsed once per distinct header
    (`layouts` maps header bytes to what they say): a shard's samples share a few headers, and
    parsing one costs more than copying a small array."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12:
        raise ValueError("not an .npy file")
    size = 10 + int.from_bytes(raw[8:10], "little") if raw[6] == 1 else \
        12 + int.from_bytes(raw[8:12], "little")
    layout = layouts.get(raw[:size])
    if layout is None:
        stream = io.BytesIO(raw)
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"an .npy file of format version {version}")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("an .npy file of objects (pickled)")
        layout = layouts[raw[:size]] = (shape, "F" if fortran else "C", dtype)
    shape, order, dtype = layout
    count = math.prod(shape)
    if len(raw) != size + count * dtype.itemsize:
        raise ValueError(f"an .npy file of {len(raw)} bytes for an array of shape {shape}")
    return np.frombuffer(raw, dtype, count, offset=size).reshape(shape, order=order).copy()


def _finish(sample: dict, expected: set[str], shard: str) -> dict:
    members = sample.pop("__members__")
    if members != expected:
        raise ShardError(shard, f"sample {sample['__key__']} is incomplete "
                                f"(has {sorted(members)}, needs {sorted(expected)})")
    return sample
