"""Kill tests: stop an mmcli command at a file event, resume it, compare with a clean run.

Two ways to pick the moment:

* :func:`run_until_event` -- deterministic: the command runs under a Python audit hook
  (``sys.addaudithook``, in the child only; no test code in mmcli) that kill -9s the
  process (or freezes it with SIGSTOP) just *before* the ``nth`` file event of a kind on a
  path matching a glob: ``"rename"`` (``os.replace``/``os.rename``, the commit point of
  every atomic write; the glob is matched against the destination) or ``"open"``
  (``open``/``os.open``, e.g. of a temporary file). "After the last shard, before the
  completion record" is "before the rename onto manifest.jsonl".
* :func:`signal_at_event` -- a user's signal (SIGINT, SIGTERM) at such an event: the
  process is frozen there, signalled, and continued, so the signal lands mid-run.

:func:`assert_same_tensors` then compares the outputs with ``torch.equal``, tensor by
tensor, with the metadata (paths of the output folder aside).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_HOOK = r"""
import fnmatch, os, runpy, signal, sys
kind, pattern, nth, action = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
events = {"rename": ("os.rename",), "open": ("open",)}[kind]
seen = 0
def hook(name, args):
    global seen
    if name not in events:
        return
    path = args[1] if name == "os.rename" else args[0]
    if not isinstance(path, (str, os.PathLike)):
        return
    if not fnmatch.fnmatchcase(os.path.abspath(os.fspath(path)), pattern):
        return
    seen += 1
    if seen == nth:
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
sys.addaudithook(hook)
# Ctrl-C as at a terminal: a job that a non-interactive shell started in the background
# (`pytest ... &`, as some CI runners do) inherits SIGINT ignored, and Python keeps that
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["mmcli", *sys.argv[5:]]
runpy.run_module("mmcli", run_name="__main__", alter_sys=True)
"""

ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _env(env: dict | None) -> dict:
    return {**os.environ, **ENV, **(env or {})}


def run_until_event(
    args: Sequence[object],
    *,
    event: str,
    path: str | os.PathLike,
    nth: int = 1,
    action: str = "kill",
    env: dict | None = None,
    timeout: float = 120,
):
    """Run ``mmcli ARGS`` and stop it before the ``nth`` ``event`` on a path matching
    ``path`` (a glob; relative globs match anywhere below).

    ``action="kill"``: kill -9; returns the CompletedProcess (returncode -9 when the
    event came; the caller should assert it). ``action="stop"``: SIGSTOP; returns the
    Popen of the frozen process once it is stopped (the caller kills it).
    """
    pattern = str(path)
    if not os.path.isabs(pattern):
        pattern = "*/" + pattern
    cmd = [sys.executable, "-c", _HOOK, event, pattern, str(nth), action, *map(str, args)]
    if action == "kill":
        return subprocess.run(cmd, capture_output=True, timeout=timeout, env=_env(env))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env))
    deadline = time.monotonic() + timeout
    while _state(proc.pid) != "T":
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended before the event: {err.decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the command did not reach the event in time")
        time.sleep(0.01)
    return proc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def signal_at_event(
    args: Sequence[object],
    *,
    sig: int,
    event: str,
    path: str | os.PathLike,
    nth: int = 1,
    env: dict | None = None,
    timeout: float = 120,
) -> tuple[int, bytes]:
    """Freeze ``mmcli ARGS`` just before the ``nth`` ``event`` on ``path`` (as
    :func:`run_until_event` with ``action="stop"``), send it ``sig`` while it is frozen,
    and let it go on: the signal lands at that point, as a user's Ctrl-C or ``kill`` mid-run
    would, however busy the machine (a signal sent when a polled file appears can arrive
    only after the run has finished). Returns (returncode, stderr)."""
    proc = run_until_event(
        args, event=event, path=path, nth=nth, action="stop", env=env, timeout=timeout
    )
    proc.send_signal(sig)  # pending while the process is stopped
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def temp_files(folder: str | os.PathLike) -> list[str]:
    """The temporary files of atomic writes in ``folder`` (``.NAME.*.tmp``)."""
    return sorted(p.name for p in Path(folder).glob(".*.tmp"))


def assert_same_tensors(a: str | os.PathLike, b: str | os.PathLike, pattern="*.safetensors"):
    """Every file matching ``pattern`` in folders ``a`` and ``b``: the same names, the same
    tensors (``torch.equal``) and the same metadata, paths to the folders aside."""
    import torch
    from safetensors import safe_open

    a, b = Path(a), Path(b)
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern)), (names, list(b.iterdir()))
    for name in names:
        with safe_open(a / name, "pt") as fa, safe_open(b / name, "pt") as fb:
            keys = sorted(fa.keys())  # (a safe_open handle is not a dict)
            assert keys == sorted(fb.keys()), name
            for k in keys:
                ta, tb = fa.get_tensor(k), fb.get_tensor(k)
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"{name}: {k} differs"
            assert _portable(fa.metadata(), a) == _portable(fb.metadata(), b), name


def _portable(meta: dict | None, folder: Path) -> dict:
    """Metadata with the output folder's own path taken out of it."""
    out = {}
    for k, v in (meta or {}).items():
        out[k] = v.replace(str(folder.resolve()), "OUT")
    if "mmcli.source" in out:
        out["mmcli.source"] = json.loads(out["mmcli.source"])
    return out
