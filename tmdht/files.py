"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file tmdht writes for others to read (catalogs, dedup streams, node ids, status and report
files, guest images) is written to a temporary name beside its target, flushed and fsynced, then
renamed over the target -- or, for a file that must never be replaced (a node's identity),
hard-linked to it, which fails if another process got there first. The directory is fsynced
after the rename so the new name survives a power loss too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_writer", "fsync_dir"]


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(
    path: Path | str, *, durable: bool = True, exclusive: bool = False, mode: int = 0o644
) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` on a clean exit.

    ``durable``: fsync the file before the rename and the directory after it (False for files
    that only need to be whole, such as a status file rewritten every start). ``exclusive``: the
    target must not exist; if another writer created it first, FileExistsError is raised and its
    file is kept. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.chmod(tmp_name, mode)  # mkstemp makes it private
        if exclusive:
            os.link(tmp_name, path)  # FileExistsError if someone was first: theirs stays
        else:
            os.replace(tmp_name, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def atomic_write(
    path: Path | str,
    data: bytes | str,
    *,
    durable: bool = True,
    exclusive: bool = False,
    mode: int = 0o644,
) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; see :func:`atomic_writer`."""
    with atomic_writer(path, durable=durable, exclusive=exclusive, mode=mode) as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
