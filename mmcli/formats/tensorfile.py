"""Tensor files: safetensors shards holding one table per modality.

A shard holds, for ``k`` items:

============================  ===================  ==========================================
tensor                        dtype / shape        meaning
============================  ===================  ==========================================
``<m>``                       any, ``[rows, ...]`` the data of modality/table ``m``
``<m>.item``                  int64 ``[rows]``     the item (0..k-1, local to the shard) of each row
``item.id.bytes``             uint8 ``[bytes]``    item ids, UTF-8, concatenated
``item.id.offsets``           int64 ``[k+1]``      start of each id in ``item.id.bytes``
``item.label``                int64 ``[k]``        index into the label names, -1 = no label
``<m>.<col>.bytes/offsets``   uint8 / int64        a string column per row of ``m`` (``text.raw``:
                                                   the captions as given), like the ids
============================  ===================  ==========================================

Table names hold no dot; every dotted name is a column.

and string metadata: ``mmcli.format`` (version), ``mmcli.kind`` (``tensors`` /
``features``), ``mmcli.tables`` (JSON: the spec of each table), ``mmcli.labels`` (JSON list
of label names, the same in every shard), ``mmcli.source`` (JSON: the manifest's path and
sha256), ``mmcli.shard`` (JSON: index and count) and free-form ``mmcli.*`` entries.

Large sets are split into shards ``NAME-00000-of-00012.safetensors``. :class:`TensorSet`
opens a file, a list, a glob, a folder of shards or ``-`` (stdin) and reads tables
memory-mapped, shard by shard, so a set larger than RAM streams in constant memory.

Where things live: :mod:`~mmcli.formats.layout` (names, id columns),
:mod:`~mmcli.formats.safetensors_io` (the container: header parsing and canonical
writing), :mod:`~mmcli.formats.contract` (what each column must hold, checked before
use), :mod:`~mmcli.formats.shardfile` (one file) and :mod:`~mmcli.formats.tensorset`
(sets of files). This module writes shards and re-exports the reading API, so
``from mmcli.formats.tensorfile import TensorSet`` keeps working. Headers are parsed with
the standard library only: ``mmcli info`` never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmcli.formats.atomic import atomic_write_bytes
from mmcli.formats.layout import (
    FORMAT_VERSION,
    ID_BYTES,
    ID_OFFSETS,
    ITEM_SUFFIX,
    LABELS,
    META_FORMAT,
    META_KIND,
    META_LABELS,
    META_SHARD,
    META_SOURCE,
    META_TABLES,
    RESERVED,
    SHARD_RE,
    TABLE_ORDER,
    decode_ids,
    encode_ids,
    shard_name,
    table_order,
)
from mmcli.formats.safetensors_io import (
    DTYPES,
    TensorInfo,
    parse_header,
    read_header,
    save_numpy,
    save_torch,
    torch_dtype_code,
)
from mmcli.formats.shardfile import ShardFile
from mmcli.formats.tensorset import TensorSet, open_tensors, resolve_sources, where_paths

#: the old private name of :func:`~mmcli.formats.safetensors_io.parse_header`
_parse_header = parse_header

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "ID_BYTES",
    "ID_OFFSETS",
    "ITEM_SUFFIX",
    "LABELS",
    "META_FORMAT",
    "META_KIND",
    "META_LABELS",
    "META_SHARD",
    "META_SOURCE",
    "META_TABLES",
    "RESERVED",
    "SHARD_RE",
    "TABLE_ORDER",
    "Shard",
    "ShardFile",
    "TensorInfo",
    "TensorSet",
    "decode_ids",
    "encode_ids",
    "open_tensors",
    "parse_header",
    "read_header",
    "resolve_sources",
    "serialize_shard",
    "shard_name",
    "table_order",
    "torch_dtype_code",
    "where_paths",
    "write_shard",
]


@dataclass
class Shard:
    """The content of one shard, in memory, ready to write.

    ``tables[m]`` is an array (numpy or torch) with rows first; ``items[m]`` the int64
    item index of each row (local to this shard); ``labels`` int64 per item or None.
    """

    ids: list[str]
    tables: dict[str, Any] = field(default_factory=dict)
    items: dict[str, Any] = field(default_factory=dict)
    labels: Any | None = None
    #: string columns beside the tables (``text.raw``: the captions as given, one per text
    #: row), stored as ``<name>.bytes`` + ``<name>.offsets`` like the item ids
    strings: dict[str, list[str]] = field(default_factory=dict)
    #: encoded tables (``preprocess --store encoded``): per row its compressed image file,
    #: stored as ``<m>.bytes`` + ``<m>.offsets`` (no ``<m>`` tensor); rows in ``items[m]``
    encoded: dict[str, list[bytes]] = field(default_factory=dict)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def serialize_shard(
    shard: Shard,
    *,
    kind: str,
    specs: dict[str, dict[str, Any]],
    label_names: Sequence[str] = (),
    source: dict[str, Any] | None = None,
    index: int = 0,
    count: int = 1,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a shard to safetensors bytes (see the module docstring for the layout)."""
    import numpy as np

    for name in shard.tables:
        if name in RESERVED or name.endswith(ITEM_SUFFIX) or "." in name:
            raise ValueError(f"invalid table name {name!r}")
        if name not in shard.items:
            raise ValueError(f"table {name!r} has no {name}{ITEM_SUFFIX} column")
    id_bytes, id_offsets = encode_ids(shard.ids)
    tensors: dict[str, Any] = {ID_BYTES: id_bytes, ID_OFFSETS: id_offsets}
    if shard.labels is not None:
        tensors[LABELS] = shard.labels
    for name, data in shard.tables.items():
        tensors[name] = data
        tensors[name + ITEM_SUFFIX] = shard.items[name]
    for name, blobs in shard.encoded.items():
        if name in shard.tables or "." in name or name not in shard.items:
            raise ValueError(f"invalid encoded table {name!r}")
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        tensors[name + ".bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        tensors[name + ".offsets"] = offsets
        tensors[name + ITEM_SUFFIX] = shard.items[name]
    tables = sorted([*shard.tables, *shard.encoded], key=table_order)
    for name, values in shard.strings.items():
        if "." not in name or name.split(".", 1)[0] not in tables:
            raise ValueError(f"string column {name!r} must be named <table>.<column>")
        tensors[name + ".bytes"], tensors[name + ".offsets"] = encode_ids(values)
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_KIND: kind,
        META_TABLES: json.dumps({n: specs.get(n, {}) for n in tables}, sort_keys=True),
        META_LABELS: json.dumps(list(label_names), ensure_ascii=False),
        META_SHARD: json.dumps({"index": index, "count": count}),
    }
    if source:
        metadata[META_SOURCE] = json.dumps(source, ensure_ascii=False)
    for key, value in (extra or {}).items():
        metadata[f"mmcli.{key}"] = value if isinstance(value, str) else json.dumps(value)

    if any(_is_torch(t) for t in tensors.values()):
        import torch

        return save_torch(
            {
                k: (v if _is_torch(v) else torch.from_numpy(np.ascontiguousarray(v))).contiguous()
                for k, v in tensors.items()
            },
            metadata,
        )
    return save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata)


def write_shard(path: str | os.PathLike, shard: Shard, **kwargs: Any) -> None:
    """Write one shard atomically (``-`` for stdout). Keyword args as :func:`serialize_shard`."""
    atomic_write_bytes(path, serialize_shard(shard, **kwargs))
