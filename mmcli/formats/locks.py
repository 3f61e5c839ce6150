"""One writer per output: an advisory lock, and the stale temporary files of killed writers.

    with OutputLock("out/tensors", "preprocess"):   # BadInput (exit 2) if another process holds it
        remove_stale_temps("out/tensors", owned=lambda name: name == "manifest.jsonl")
        ...

The lock is ``fcntl.flock`` on a hidden file next to the output, ``.NAME.lock`` (inside an
existing output folder, ``.mmcli.lock``, where its parent is not writable), holding the
writer's pid and command line, so a second writer is told which process runs. The kernel
drops the lock when its holder dies, kill -9 included: a stale lock file never blocks
anybody. The file is removed when the lock is released.

The lock is between processes. Within one process a later writer takes the lock over
(an earlier holder that was not released, e.g. one kept alive by a stored traceback, can
not be told from a live one); forked children never hold it. Without ``fcntl`` (Windows)
there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

from mmcli.errors import BadInput
from mmcli.formats.atomic import TEMP_SUFFIX

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"
INSIDE_LOCK = ".mmcli.lock"
#: what atomic_path names its temporary files: .NAME.<8 random characters>.tmp
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}" + re.escape(TEMP_SUFFIX) + "$")

# lock file path -> (fd, token of the current holder) for the locks this process holds
_HELD: dict[str, tuple[int, object]] = {}


def _forget_in_child() -> None:
    """A forked child closes its copies of the lock files (closing a copy does not release
    the parent's lock; flock is released when the last copy goes): a child that outlives
    a killed parent must not keep the output locked."""
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(("__main__.py", "/mmcli")) or argv[0] == "-m"):
        argv = ["mmcli", *argv[1:]]
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def lock_path_for(target: str | os.PathLike) -> Path:
    """Where the lock of ``target`` (an output file or folder) lives: one place for every
    spelling of the path (links resolved)."""
    target = Path(os.path.realpath(target))
    beside = target.parent / f".{target.name}{LOCK_SUFFIX}"
    if os.access(target.parent, os.W_OK) or not target.is_dir():
        return beside
    return target / INSIDE_LOCK


def holder_of(target: str | os.PathLike) -> str | None:
    """``"pid N: COMMAND"`` of the live process holding ``target``'s lock, or None (also
    when this process holds it)."""
    if fcntl is None:
        return None
    path = lock_path_for(target)
    if str(path) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "pid unknown"
    return f"pid {pid}: {command}" if command else f"pid {pid}"


class OutputLock:
    """An exclusive advisory lock on an output file or folder (see the module docstring).

    ``OutputLock(target, command)`` acquires it or raises :class:`BadInput` naming the
    holder; :meth:`release` (or leaving a ``with`` block, or garbage collection) gives it up.
    """

    def __init__(self, target: str | os.PathLike, command: str):
        self.target = Path(target)
        self.path = lock_path_for(target)
        self._token = object()
        self._key = str(self.path)
        self._finalizer = None
        if fcntl is None:
            return
        if self._key in _HELD:  # this process holds it already: take it over
            fd, _ = _HELD[self._key]
        else:
            fd = self._acquire(command)
        _HELD[self._key] = (fd, self._token)
        self._finalizer = weakref.finalize(self, _release, self._key, self._token)

    def _acquire(self, command: str) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._lock(command)
        except OSError as e:
            raise BadInput(
                f"cannot write the output here ({e.strerror})",
                where=str(self.target),
                hint="pick a folder you can write to",
            ) from None

    def _lock(self, command: str) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(fd)
                os.close(fd)
                raise BadInput(
                    f"another mmcli process is writing this output ({holder})",
                    where=str(self.target),
                    hint="wait for it to finish, or write to another -o",
                ) from None
            # the holder we waited for may have removed the file: lock the one at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        line = _command_line()
        if not line.startswith(f"mmcli {command}"):
            line = f"mmcli {command} (in {line})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {line}\n".encode(), 0)
        return fd

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    @property
    def held(self) -> bool:
        return _HELD.get(self._key, (None, None))[1] is self._token

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _release(key: str, token: object) -> None:
    entry = _HELD.get(key)
    if entry is None or entry[1] is not token:
        return  # taken over by a later writer of this process
    del _HELD[key]
    fd = entry[0]
    with contextlib.suppress(OSError):
        os.unlink(key)  # before unlocking: a waiter then sees a new file and retries
    with contextlib.suppress(OSError):
        os.close(fd)


def is_temp_of(name: str, owned: Callable[[str], bool]) -> bool:
    """Whether ``name`` is a temporary file of an output ``owned`` accepts."""
    m = TEMP_RE.match(name)
    return bool(m) and owned(m["name"])


def remove_stale_temps(folder: str | os.PathLike, owned: Callable[[str], bool]) -> int:
    """Remove the temporary files that killed writers left in ``folder`` for the outputs
    whose names ``owned`` accepts. Call it holding the output's lock (then no live writer
    can own them). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if is_temp_of(p.name, owned) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n
