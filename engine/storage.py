"""Paths that a whole cluster can share: local directories, shared mounts, or object-store URIs.

Every output the workers write (embedding parts, predictions) goes through a ``pyarrow.fs`` file system,
so the same code writes to ``/mnt/shared/run``, ``s3://bucket/run`` or ``gs://bucket/run``. Writes are
atomic per file: a temporary name in the same folder, then a rename (a copy + delete on object stores,
where a reader never sees a partial object anyway).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import UserError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str | Path) -> bool:
    return bool(_URI.match(str(path)))


@dataclass(frozen=True)
class Location:
    """A folder or file on some file system: ``fs`` and the path inside it (absolute for local paths)."""

    fs: pafs.FileSystem
    path: str
    uri: str  # what the user gave, made absolute for local paths: safe to hand to another node

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def files(self, suffix: str = "") -> list[pafs.FileInfo]:
        """Files directly in this folder (none if it does not exist), sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)),
                      key=lambda i: i.base_name)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write ``table`` as Parquet at this path, atomically (temporary sibling, then rename)."""
        parent, _, name = self.path.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            pq.write_table(table, tmp, filesystem=self.fs, row_group_size=row_group_size)
            self.fs.move(tmp, self.path)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def write_text(self, text: str) -> None:
        parent, _, name = self.path.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(text.encode())
        self.fs.move(tmp, self.path)

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return bytes(f.read()).decode()


def location(path: str | Path) -> Location:
    """The file system and path of a local path or a URI (``s3://``, ``gs://``, ``file://``...)."""
    text = str(path)
    if is_uri(text):
        try:
            fs, inner = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise UserError(f"cannot open {text}: {exc}") from None
        return Location(fs, inner, text)
    absolute = str(Path(text).expanduser().absolute())
    return Location(pafs.LocalFileSystem(), absolute, absolute)


def shareable(path: str | Path, what: str) -> str:
    """``path`` as every node of a cluster can read it: a URI as is, a local path made absolute. A relative
    path given to a cluster job would name a different folder on each node: refused in one line."""
    text = str(path)
    if is_uri(text) or Path(text).expanduser().is_absolute():
        return text
    raise UserError(f"{what} {text!r} is a relative path on this machine, which the cluster's nodes cannot see; "
                    "give an absolute path on storage every node mounts (e.g. /mnt/shared/...) or a URI "
                    "(s3://..., gs://...)")
