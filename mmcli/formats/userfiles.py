"""Opening a path the user gave, safely: regular files only (or ``-`` for stdin).

A named pipe (FIFO) given where a file is expected makes ``open()`` wait for a writer
forever; a device (``/dev/zero``) reads without end; a socket cannot be opened at all. So
every user path mmcli reads (manifests, images, audio, tensor and feature files,
checkpoints, weights, templates, result files) goes through :func:`check_file` or
:func:`open_file`, which refuse anything but a regular file with one line, *before*
opening it:

    with open_file("imgs/1.jpg", what="image") as f:   # BadInput: ... is a named pipe
        ...

:func:`open_file` also opens non-blocking and checks the opened descriptor again, so a
path swapped for a FIFO between the check and the open cannot hang either.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

from mmcli.errors import BadInput
from mmcli.formats.archive import open_member, split_member

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotAFile(BadInput):
    """A user path that is missing, unreadable or not a regular file."""

    def __init__(self, reason: str, path: str | os.PathLike, hint: str | None = None):
        self.reason = reason
        super().__init__(reason, where=str(path), hint=hint)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _refuse(mode: int, path: str | os.PathLike, what: str, stdin_ok: bool) -> None:
    if stat.S_ISREG(mode):
        return
    hint = "pass a regular file" + (" (or - to read stdin)" if stdin_ok else "")
    if stat.S_ISDIR(mode):
        noun = what if what.endswith("file") else f"{what} file"
        raise NotAFile(f"expected {_article(noun)} {noun}, got a folder", path, hint=hint)
    raise NotAFile(f"the {what} is {_kind(mode)}, not a regular file", path, hint=hint)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_file(path: str | os.PathLike, what: str = "file", *, stdin_ok: bool = False) -> Path:
    """``path`` as a Path when it names an existing regular file (symlinks followed);
    :class:`NotAFile` (a BadInput, one line) otherwise. Never opens the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotAFile(f"{what} not found", path, hint="check the path") from None
    except PermissionError:
        raise NotAFile(f"{what} is not readable (permission denied)", path) from None
    except OSError as e:  # ENAMETOOLONG, ELOOP, ENOTDIR, ...
        raise NotAFile(f"cannot read the {what} ({e.strerror or e})", path) from None
    _refuse(st.st_mode, path, what, stdin_ok)
    return Path(path)


def open_file(path: str | os.PathLike, what: str = "file", *, stdin_ok: bool = False) -> BinaryIO:
    """Open a regular file for binary reading; :class:`NotAFile` for anything else.

    Checked before opening (a FIFO is never opened) and again on the open descriptor,
    which is opened non-blocking so that even a path replaced by a FIFO in between
    returns at once. A member of a tar archive (``data/00000.tar#key.jpg``, see
    :mod:`mmcli.formats.archive`) opens as an in-memory file of its bytes.
    """
    if split_member(path) is not None:
        try:
            return open_member(path)
        except BadInput as e:
            raise NotAFile(e.message, e.where or path) from None
    check_file(path, what, stdin_ok=stdin_ok)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotAFile(f"{what} not found", path, hint="check the path") from None
    except PermissionError:
        raise NotAFile(f"{what} is not readable (permission denied)", path) from None
    except OSError as e:
        raise NotAFile(f"cannot read the {what} ({e.strerror or e})", path) from None
    try:
        _refuse(os.fstat(fd).st_mode, path, what, stdin_ok)
        if fcntl is not None:  # back to blocking reads for the caller
            current = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, current & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, "rb")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def open_text(
    path: str | os.PathLike,
    what: str = "file",
    *,
    encoding: str = "utf-8-sig",
    newline: str | None = None,
) -> io.TextIOWrapper:
    """:func:`open_file` for reading text (UTF-8, a BOM accepted, by default)."""
    return io.TextIOWrapper(open_file(path, what), encoding=encoding, newline=newline)


def read_file(path: str | os.PathLike, what: str = "file") -> bytes:
    """The whole content of a regular file (see :func:`open_file`)."""
    with open_file(path, what) as f:
        return f.read()
