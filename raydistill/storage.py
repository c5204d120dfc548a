"""Where shards and datasets live: a filesystem abstraction so a local path, `file://`, `s3://` or
an fsspec URL (e.g. `memory://` in tests) take the same code.

Writes are atomic: bytes go to a temporary name that no reader lists, then move to the final name
(a rename on POSIX filesystems; on object stores the object only appears once fully uploaded).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

_PYARROW_SCHEMES = {"", "file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def parse(cls, uri: str) -> Location:
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme in _PYARROW_SCHEMES:
            if scheme == "":
                uri_for_fs = os.path.abspath(uri)
                return cls(uri, pafs.LocalFileSystem(), uri_for_fs)
            fs, root = pafs.FileSystem.from_uri(uri)
            return cls(uri, fs, root.rstrip("/"))
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        return cls(uri, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root.rstrip("/"))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list(self) -> list[str]:
        """Names of the files directly under the directory (temporary files excluded)."""
        return sorted(self.sizes())

    def sizes(self) -> dict[str, int]:
        """Byte size of every file directly under the directory, by name (one listing; temporary
        files excluded)."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return {}
        entries = self.fs.get_file_info(pafs.FileSelector(self.root))
        return {os.path.basename(e.path): e.size for e in entries
                if e.type == pafs.FileType.File and
                not os.path.basename(e.path).startswith(TMP_PREFIX)}

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write `data` under `name` so that the name only ever holds complete content."""
        self.fs.create_dir(self.root, recursive=True)
        tmp = self.path(f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path(name))
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))


def file_sha256(path: str) -> str:
    """The sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
