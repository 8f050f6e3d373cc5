"""Tar shards in the WebDataset layout: ``KEY.EXT`` members, one sample = consecutive members sharing KEY.

Reading is sequential from any sample's byte offset, which is what makes the loader's cursor exact and cheap
to restore: a cursor is (shard, byte offset of the next sample). A truncated or corrupt tar ends the shard with
an error record instead of an exception, so the loader can count it and go on.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

BLOCK = tarfile.BLOCKSIZE


@dataclass
class Record:
    """One sample read from a shard (``fields`` maps extension -> bytes), or an ``error`` at ``start``."""

    key: str
    start: int  # byte offset of the sample's first header in the shard
    end: int  # byte offset just past the sample (where the next one starts)
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str = ""
    cut_off: bool = False  # the last sample of a tar that ends without its end-of-archive block: members may be lost


def split_name(name: str) -> tuple[str, str]:
    """``a/b/clip.mp4`` -> (``a/b/clip``, ``mp4``); the extension starts at the basename's first dot."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


class _Tail:
    """The stream tarfile reads, keeping the last block read: a tar ends with zero blocks, a cut-off one does not."""

    def __init__(self, fileobj):
        self.fileobj, self.tail = fileobj, b""

    def read(self, n: int = -1) -> bytes:
        data = self.fileobj.read(n)
        self.tail = (self.tail + data[-BLOCK:])[-BLOCK:]  # without copying what was read
        return data

    def cut_off(self) -> bool:
        return self.tail != bytes(BLOCK)


def iter_records(fileobj, base: int = 0, keep=None) -> Iterator[Record]:
    """Samples of the tar stream ``fileobj`` positioned at byte ``base`` of the shard.

    ``keep(index)`` -> bool decides per sample (by its position counted from ``base``) whether its payload is
    wanted; unwanted samples are still yielded, with empty ``fields``, so cursors stay exact. A tar cut off at a
    member boundary (no end-of-archive block) ends with a sample marked ``cut_off``.
    """
    cur: Record | None = None
    index = 0
    want = True
    fileobj = _Tail(fileobj)
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|")
    except tarfile.ReadError as exc:
        yield Record("?", base, base, error=f"truncated or corrupt tar: {exc}")
        return
    try:
        while True:
            try:
                member = tf.next()
            except (tarfile.ReadError, EOFError) as exc:
                if cur is not None:
                    yield cur
                    index += 1
                yield Record(f"after #{index}", base + tf.offset, base + tf.offset, error=f"truncated or corrupt tar: {exc}")
                return
            if member is None:
                break
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if cur is None or key != cur.key:
                if cur is not None:
                    yield cur
                    index += 1
                want = keep is None or keep(index)
                cur = Record(key, base + member.offset, 0)
            cur.end = base + member.offset_data + -(-member.size // BLOCK) * BLOCK
            try:
                data = tf.extractfile(member).read()
            except (tarfile.ReadError, EOFError, OSError) as exc:
                cur.error = f"truncated or corrupt tar in {member.name}: {exc}"
                yield cur
                return
            if len(data) != member.size:
                cur.error = f"truncated tar: {member.name} has {len(data)} of {member.size} bytes"
                yield cur
                return
            if want:
                cur.fields[ext] = data
        if cur is not None:
            cur.cut_off = fileobj.cut_off()
            yield cur
    finally:
        tf.close()


def tar_bytes_header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uname = info.gname = ""
    return info


class TarWriter:
    """Write samples to a local tar file with reproducible headers (no owner, mtime 0)."""

    def __init__(self, path: str):
        self.path = path
        self._tf = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        with self._named():
            for ext in sorted(fields, key=lambda e: (e != "json", e)):  # metadata first: cheap to inspect
                data = fields[ext]
                self._tf.addfile(tar_bytes_header(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.samples += 1

    def close(self) -> int:
        with self._named():
            self._tf.close()
        return os.path.getsize(self.path)

    @contextlib.contextmanager
    def _named(self):
        """A write error (a full disk) names this file: tarfile's errors name none."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None and exc.errno:
                raise OSError(exc.errno, exc.strerror, self.path) from exc
            raise
