"""Atomic writes and the ``-`` convention.

Every output mmcli writes goes through :func:`atomic_path`: the data is written to a
temporary file in the destination folder (``.NAME.XXXXXXXX.tmp``) and renamed over the
target only when it is complete, so a killed command leaves the old file or none, never
half of one. The file is fsynced before the rename and its folder after it, so the same
holds after a power loss: what was renamed is on disk, whole (see docs/reliability.md).
A killed writer can leave its temporary file behind; :func:`mmcli.formats.locks.remove_stale_temps`
removes those of a folder's own outputs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

STDIO = "-"


def is_stdio(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path) == STDIO


TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """How the temporary files of an output named ``name`` start (``.NAME.``)."""
    return f".{name}."


def _random_token() -> str:
    """Eight random hex characters, from the OS (no state shared by forked workers)."""
    return secrets.token_hex(4)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to the disk; a no-op where the platform
    or file system cannot open or sync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on file systems without directory sync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On an exception (or KeyboardInterrupt) the temporary file is removed and ``path``
    is left untouched. ``fsync`` (default): the file's data reaches the disk before the
    rename, and the rename before this returns (durable against power loss, not only
    against a kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before the file exists, and the file is created inside the try:
    # a signal (SIGTERM, Ctrl-C) at any point, even between the creation and the
    # assignment, finds the name and removes the file. (tempfile.mkstemp hands the name
    # back only after creating the file: a signal in that gap left the file behind.)
    tmp: Path | None = None
    try:
        while tmp is None:
            tmp = path.parent / f"{temp_prefix(path.name)}{_random_token()}{TEMP_SUFFIX}"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # another writer's name, not ours to remove: draw again
                tmp = None
        yield tmp
        # the file was created 0600; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, or to stdout when ``path`` is ``-``."""
    if is_stdio(path):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    with atomic_path(path, fsync=fsync) as tmp:
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
