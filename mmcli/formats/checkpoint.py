"""Model checkpoints: safetensors weights + JSON metadata that rebuilds the model.

Metadata (all strings): ``mmcli.format`` (version), ``mmcli.kind`` = ``model``,
``mmcli.model`` (JSON: the model config, enough to rebuild the module with no code
and no pickle), and optional ``mmcli.train`` (JSON: training arguments),
``mmcli.state`` (JSON: step, epoch) and ``mmcli.metrics`` (JSON: best metrics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.atomic import atomic_write_bytes, is_stdio, read_bytes
from mmcli.formats.layout import FORMAT_VERSION, META_FORMAT, META_KIND
from mmcli.formats.safetensors_io import parse_header, read_header, save_torch
from mmcli.formats.userfiles import read_file

MODEL_KIND = "model"
#: stored tensors that are files a model is built from (an hf:DIR folder's config and
#: tokenizer: mmcli.models.adapters.embedded), not weights
FILES_PREFIX = "mmcli.files/"


@dataclass
class Checkpoint:
    config: dict[str, Any]
    state_dict: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _unshare(state_dict: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory: give each its own contiguous copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous().cpu()
    return out


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write a checkpoint atomically (``-`` for stdout); the same content gives the same
    bytes (canonical header)."""
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_KIND: MODEL_KIND,
        "mmcli.model": json.dumps(ckpt.config, sort_keys=True),
        "mmcli.train": json.dumps(ckpt.train, sort_keys=True, default=str),
        "mmcli.state": json.dumps(ckpt.state, sort_keys=True),
        "mmcli.metrics": json.dumps(ckpt.metrics, sort_keys=True),
    }
    atomic_write_bytes(path, save_torch(_unshare(ckpt.state_dict), metadata))


def read_checkpoint_meta(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint's config and metadata, reading only the header (no torch)."""
    _, metadata, _ = read_header(path)
    return checkpoint_from_metadata(metadata, str(path))


def checkpoint_from_metadata(metadata: dict[str, str], where: str) -> Checkpoint:
    """The config and metadata of a checkpoint from its header's metadata (type-checked:
    each entry a JSON object)."""
    if metadata.get(META_KIND) != MODEL_KIND or "mmcli.model" not in metadata:
        kind = metadata.get(META_KIND)
        raise BadInput(
            f"not an mmcli model checkpoint (kind: {kind[:40] if kind else 'plain safetensors'})",
            where=where,
            hint="pass a checkpoint written by mmcli fuse-train or distill",
        )
    parts = {}
    for key in ("model", "train", "state", "metrics"):
        try:
            value = safejson.loads(metadata.get(f"mmcli.{key}", "{}"))
        except safejson.JSONError as e:
            raise BadInput(f"corrupt checkpoint metadata (mmcli.{key}: {e})", where=where) from None
        if not isinstance(value, dict):
            raise BadInput(
                f"corrupt checkpoint metadata (mmcli.{key} is not a JSON object)", where=where
            )
        parts[key] = value
    return Checkpoint(
        config=parts["model"], train=parts["train"], state=parts["state"], metrics=parts["metrics"]
    )


def read_checkpoint_bytes(path: str | os.PathLike, what: str = "checkpoint") -> bytes:
    """The whole checkpoint file (``-``: stdin); BadInput for a missing path, a folder, a
    FIFO or a device (never opened)."""
    if is_stdio(path):
        return read_bytes(path)
    if os.path.isdir(path):
        raise BadInput(
            f"expected a {what} file, got a folder",
            where=str(path),
            hint="pass the model file, e.g. RUN/model.safetensors",
        )
    return read_file(path, what)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint: weights (on ``device``) and metadata. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = str(path)
    data = read_checkpoint_bytes(path)
    _, metadata, _ = parse_header(data, where)
    ckpt = checkpoint_from_metadata(metadata, where)
    try:
        ckpt.state_dict = {k: v.to(device) for k, v in load(data).items()}
    except SafetensorError as e:
        raise BadInput(f"corrupt checkpoint ({e})", where=where) from None
    return ckpt


_from_metadata = checkpoint_from_metadata  # the old private name
