"""Atomic writes and the ``-`` convention.

Every output mmcli writes goes through :func:`atomic_path`: the data is written to a
temporary file in the destination folder and renamed over the target only when it is
complete, so a killed command leaves the old file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

STDIO = "-"


def is_stdio(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path) == STDIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On an exception (or KeyboardInterrupt) the temporary file is removed and ``path``
    is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, or to stdout when ``path`` is ``-``."""
    if is_stdio(path):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open ``path`` for writing atomically (text by default); ``-`` is stdout."""
    binary = "b" in mode
    if is_stdio(path):
        stream = sys.stdout.buffer if binary else sys.stdout
        yield stream
        stream.flush()
        return
    with (
        atomic_path(path) as tmp,
        open(
            tmp, mode, encoding=None if binary else encoding, newline=None if binary else "\n"
        ) as f,
    ):
        yield f


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file, or stdin when ``path`` is ``-``."""
    if is_stdio(path):
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()
