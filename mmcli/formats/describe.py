"""Summaries of any mmcli file (``mmcli info``), from headers only: no torch import."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.atomic import is_stdio, read_bytes
from mmcli.formats.contract import parse_json_entry
from mmcli.formats.tensorfile import (
    DTYPES,
    ITEM_SUFFIX,
    LABELS,
    META_KIND,
    RESERVED,
    ShardFile,
    parse_header,
    read_header,
    resolve_sources,
)


def _describe_model(path: str, tensors: dict, metadata: dict[str, str]) -> dict[str, Any]:
    # buffers saved with the weights (BatchNorm statistics) are not parameters
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    from mmcli.formats.checkpoint import FILES_PREFIX

    files = {k: t for k, t in tensors.items() if k.startswith(FILES_PREFIX)}
    params = sum(
        math.prod(t.shape) for k, t in tensors.items() if not k.endswith(buffers) and k not in files
    )
    out: dict[str, Any] = {
        "path": path,
        "kind": "model",
        "parameters": params,
        "tensors": len(tensors) - len(files),
    }
    if files:  # an hf:DIR folder's config and tokenizer, carried for the rebuild
        out["embedded_files"] = {
            k[len(FILES_PREFIX) :].partition("/")[2]: math.prod(t.shape) for k, t in files.items()
        }
    for key in ("model", "train", "state", "metrics"):
        value = parse_json_entry(metadata, f"mmcli.{key}", None, path)
        if value is not None:
            if not isinstance(value, dict):
                raise BadInput(
                    f"corrupt checkpoint metadata (mmcli.{key} is not an object)", where=path
                )
            out[key] = value
    return out


def _label_counts(shards: list[ShardFile]) -> dict[str, int] | None:
    names = shards[0].label_names
    if not names:
        return None
    import numpy as np

    counts = np.zeros(len(names) + 1, dtype=np.int64)
    for s in shards:
        if s.has_labels():
            counts += np.bincount(np.asarray(s.numpy(LABELS)) + 1, minlength=len(names) + 1)
    out = {name: int(c) for name, c in zip(names, counts[1:])}
    if counts[0]:
        out["(none)"] = int(counts[0])
    return out


def _describe_set(shards: list[ShardFile]) -> dict[str, Any]:
    first = shards[0]
    for shard in shards:  # what info reports is checked like every reader checks it
        shard.ids()
        for name in shard.tables:
            shard.item_index(name)
    tables = {name: _describe_table(shards, name) for name in first.tables}
    extra = {
        k[len("mmcli.") :]: v
        for k, v in first.metadata.items()
        if k.startswith("mmcli.")
        and k
        not in (
            "mmcli.format",
            "mmcli.kind",
            "mmcli.tables",
            "mmcli.labels",
            "mmcli.source",
            "mmcli.shard",
        )
        and k not in ("mmcli.errors", "mmcli.stats")  # per shard: summed below
    }
    stats: dict[str, int] = {}
    for shard in shards:
        shard_stats = shard.extra("stats", {})
        for key, value in (shard_stats if isinstance(shard_stats, dict) else {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                stats[key] = stats.get(key, 0) + value
    return {
        "paths": [s.path for s in shards],
        "kind": first.kind,
        "format": first.metadata.get("mmcli.format"),
        "shards": len(shards),
        "items": sum(s.num_items for s in shards),
        "labels": _label_counts(shards),
        "tables": tables,
        "source": first.source or None,
        "stats": stats or None,
        "metadata": {k: _maybe_json(v) for k, v in extra.items()},
    }


def _describe_table(shards: list[ShardFile], name: str) -> dict[str, Any]:
    first = shards[0]
    rows = sum(s.rows(name) for s in shards)
    spec = first.specs.get(name, {})
    if first.is_encoded(name):  # compressed files: the decoded shape, the bytes kept
        for s in shards:
            s.encoded(name)  # offsets checked like every reader checks them
        size = int(spec.get("image_size", 0)) if isinstance(spec.get("image_size"), int) else 0
        nbytes = sum(
            s.tensors[name + ".bytes"].end - s.tensors[name + ".bytes"].begin for s in shards
        )
        return {
            "rows": rows,
            "store": "encoded",
            "dtype": "uint8",
            "shape": [3, size, size],
            "bytes": nbytes,
            "bytes_per_image": round(nbytes / rows) if rows else 0,
            "spec": spec,
        }
    info = first.tensors[name]
    out = {
        "rows": rows,
        "dtype": DTYPES[info.dtype][1],
        "shape": list(info.shape[1:]),
        "bytes": sum(s.tensors[name].end - s.tensors[name].begin for s in shards),
        "spec": spec,
    }
    if name == "image" and first.kind == "tensors":
        out = {"rows": rows, "store": "pixels", **{k: v for k, v in out.items() if k != "rows"}}
    return out


def _maybe_json(v: str) -> Any:
    try:
        return safejson.loads(v)
    except safejson.JSONError:
        return v


def describe(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One summary per set of files: tensor/feature shard sets and model checkpoints.

    Shards are grouped by kind and tables (a run folder holding a checkpoint and feature
    shards gives one summary for each).
    """
    paths = resolve_sources(sources)
    groups: dict[tuple, list[ShardFile]] = {}
    out: list[dict[str, Any]] = []
    for path in paths:
        if is_stdio(path):
            data = read_bytes(path)
            tensors, metadata, _ = parse_header(data, "<stdin>")
            if metadata.get(META_KIND) == "model":
                out.append(_describe_model("<stdin>", tensors, metadata))
                continue
            shard = ShardFile("<stdin>", data=data)
        else:
            tensors, metadata, _ = read_header(path)
            if metadata.get(META_KIND) == "model":
                out.append(_describe_model(path, tensors, metadata))
                continue
            shard = ShardFile(path)
        key = (shard.kind, tuple(sorted(shard.tables)), json.dumps(shard.specs, sort_keys=True))
        groups.setdefault(key, []).append(shard)
    out.extend(_describe_set(g) for g in groups.values())
    return out


__all__ = ["describe", "ITEM_SUFFIX", "RESERVED"]
