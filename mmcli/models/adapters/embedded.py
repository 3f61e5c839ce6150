"""A transformers folder's own files (config, tokenizer, processor), carried in a checkpoint.

A model fine-tuned or distilled from ``hf:DIR`` is an mmcli checkpoint that rebuilds
with no original file: besides the weights (all of them, as for every model), the
checkpoint holds the small files of ``DIR`` the model cannot be built without
(``config.json``, the tokenizer's files, ``preprocessor_config.json``, sentence-transformers'
``1_Pooling/config.json``, ...), each as a uint8 tensor named
``mmcli.files/<digest>/<relative path>``; ``extra.embedded_files`` maps each ``hf:``
path of the config to its digest (sha256 over the names and contents).

Loading such a checkpoint writes the files once to ``<cache>/hf/<digest>/`` (the cache is
``$MMCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmcli``, else ``~/.cache/mmcli``), and while
the model is built, ``hf:DIR`` reads from there (:func:`redirected`): the architecture from
its config, the weights from the checkpoint. ``DIR`` itself is not read, even where it
still exists, so the model is the one that was saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mmcli.errors import BadInput
from mmcli.formats.checkpoint import FILES_PREFIX

PREFIX = FILES_PREFIX
EXTRA_KEY = "embedded_files"
#: weight files (the checkpoint holds the weights) and folders that are not the model
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}
MAX_FILE_BYTES = 64 * 2**20
MAX_TOTAL_BYTES = 128 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

_local = threading.local()


def cache_dir() -> Path:
    root = os.environ.get("MMCLI_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "mmcli")
    return Path(root)


def folder_files(folder: Path) -> dict[str, bytes]:
    """The files of a model folder a rebuild needs: all but weights, bounded in size."""
    files: dict[str, bytes] = {}
    total = 0
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        size = p.stat().st_size
        total += size
        if size > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES:
            raise BadInput(
                f"the model folder's files are too large to carry in a checkpoint ({rel}: "
                f"{size / 2**20:.0f} MB, {total / 2**20:.0f} MB so far)",
                where=str(folder),
                hint="move files the model does not need out of the folder",
            )
        files[rel.as_posix()] = p.read_bytes()
    return files


def digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def as_tensors(embedded: Mapping[str, Mapping[str, bytes]]) -> dict[str, torch.Tensor]:
    """``{digest: {name: bytes}}`` as checkpoint tensors."""
    out = {}
    for dg, files in embedded.items():
        for name, data in files.items():
            out[f"{PREFIX}{dg}/{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)  # fmt: skip
    return out


def split_tensors(state: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, bytes]]:
    """Take the embedded files out of a loaded state dict: ``{digest: {name: bytes}}``,
    each set checked against its digest and each name against path tricks."""
    embedded: dict[str, dict[str, bytes]] = {}
    for key in [k for k in state if k.startswith(PREFIX)]:
        t = state.pop(key)
        dg, _, name = key[len(PREFIX) :].partition("/")
        if t.dtype != torch.uint8 or t.ndim != 1 or not is_safe_name(name):
            raise BadInput(f"the checkpoint's embedded file {key!r} is not valid", where=where)
        embedded.setdefault(dg, {})[name] = t.numpy().tobytes()
    for dg, files in embedded.items():
        if digest(files) != dg:
            raise BadInput(
                f"the checkpoint's embedded files {dg[:12]}... do not match their digest",
                where=where,
                hint="the checkpoint is corrupt; recreate it",
            )
    return embedded


def is_safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and all(_NAME.match(p) and p not in (".", "..") for p in parts)


def materialize(dg: str, files: Mapping[str, bytes]) -> Path:
    """``<cache>/hf/<digest>/`` holding ``files`` (written once, atomically: a folder is
    filled under a temporary name and renamed)."""
    target = cache_dir() / "hf" / dg
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dg[:12]}.", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def redirect(paths: Mapping[str, Path]) -> Iterator[None]:
    """While inside, ``hf:PATH`` for each PATH of ``paths`` reads from its folder."""
    outer = getattr(_local, "paths", None)
    _local.paths = {**(outer or {}), **paths}
    try:
        yield
    finally:
        _local.paths = outer


def redirected(path: str) -> Path | None:
    """The folder of embedded files standing for ``hf:path`` now, or None."""
    return (getattr(_local, "paths", None) or {}).get(path)


@contextlib.contextmanager
def from_checkpoint(extra: Mapping, state: dict[str, torch.Tensor], where: str) -> Iterator[None]:
    """Around a checkpoint's build: its embedded files stand in for the ``hf:`` folders."""
    embedded = split_tensors(state, where)
    names = extra.get(EXTRA_KEY) or {}
    if not isinstance(names, Mapping) or not all(isinstance(v, str) for v in names.values()):
        raise BadInput(f"the checkpoint's extra.{EXTRA_KEY} is not valid", where=where)
    missing = sorted(set(names.values()) - set(embedded))
    if missing:
        raise BadInput(
            f"the checkpoint names embedded files it does not hold ({missing[0][:12]}...)",
            where=where,
            hint="the checkpoint is corrupt; recreate it",
        )
    with redirect({p: materialize(dg, embedded[dg]) for p, dg in names.items()}):
        yield


def stored_names(names: list[str]) -> list[str]:
    """The stored tensor names that are model weights (not embedded files)."""
    return [n for n in names if not n.startswith(PREFIX)]
