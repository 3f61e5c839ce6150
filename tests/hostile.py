"""Hostile and corrupt files for reliability tests: safetensors headers rewritten by hand,
named pipes, a guard that turns a hang into a test failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from feature_files import toy_pairs, write_features

DEEP = "[" * 100_000 + "]" * 100_000


def header(path: str | Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path: str | Path, head: dict | None, data: bytes, raw_header: bytes | None = None):
    """Write a safetensors file from a header dict (or raw header bytes) and data."""
    text = raw_header if raw_header is not None else json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Path(path)


def rewrite(src: str | Path, dst: str | Path, change: Callable[[dict], object]) -> Path:
    """A copy of ``src`` whose header dict went through ``change`` (in place)."""
    head, data = header(src)
    change(head)
    return write(dst, head, data)


def rewrite_column(src, dst, name: str, change: Callable[[np.ndarray], object]) -> Path:
    """A copy of ``src`` whose column ``name`` went through ``change`` (in place)."""
    head, data = header(src)
    t = head[name]
    b, e = t["data_offsets"]
    dtype = {"I64": np.int64, "I32": np.int32, "U8": np.uint8, "F32": np.float32}[t["dtype"]]
    arr = np.frombuffer(data[b:e], dtype=dtype).copy()
    change(arr)
    return write(dst, head, data[:b] + arr.tobytes() + data[e:])


def set_meta(key: str, value: str) -> Callable[[dict], None]:
    return lambda h: h["__metadata__"].__setitem__(key, value)


def edit_json_meta(key: str, change: Callable[[object], object]) -> Callable[[dict], None]:
    def f(h):
        h["__metadata__"][key] = json.dumps(change(json.loads(h["__metadata__"][key])))

    return f


def feature_file(path: str | Path, items: int = 30, seed: int = 0) -> Path:
    """A valid image + text feature file with labels (the base hostile files are made of)."""
    img, ii, txt, ti = toy_pairs(items, 8, captions=(1, 2), seed=seed)
    return write_features(
        path,
        [f"it{i}" for i in range(items)],
        {"image": (img, ii), "text": (txt, ti)},
        labels=np.arange(items) % 3,
        label_names=["a", "b", "c"],
    )


def fifo(path: str | Path) -> Path:
    os.mkfifo(path)
    return Path(path)


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (TimeoutError) instead of hanging when the body blocks for ``seconds``."""

    def alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
