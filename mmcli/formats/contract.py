"""What an mmcli tensor or feature file must hold, checked before any of it is used.

:func:`read_metadata` parses and type-checks the metadata entries every reader relies
on; :func:`check_columns` checks each column's dtype and shape against the contract:

=========================  ==========================================================
column                     contract
=========================  ==========================================================
``item.id.bytes``          uint8 ``[bytes]`` (together with ``item.id.offsets``)
``item.id.offsets``        int64 ``[items + 1]``
``item.label``             int64 ``[items]``
``<m>.item``               int64 ``[rows of <m>]``; every table has one
``<m>.<c>.bytes``          uint8 ``[bytes]``: a string column of table ``<m>`` (``text.raw``)
``<m>.<c>.offsets``        int64 ``[rows of <m> + 1]``; decoded like the item ids
``image.bytes``            uint8 ``[bytes]``: an encoded image table (``--store encoded``),
                           each row's compressed file; no ``image`` tensor then
``image.offsets``          int64 ``[rows + 1]``: where each row's file starts
``<m>`` of a feature file  floating (float16 / bfloat16 / float32 / float64) ``[rows, D]``
``image`` after preprocess uint8 ``[rows, 3, H, W]``
``text`` after preprocess  int32 / int64 ``[rows, length]``
``audio`` after preprocess floating ``[rows, samples]`` (or ``[rows, 1, samples]``)
``video`` after preprocess uint8 ``[rows, frames, 3, H, W]``
=========================  ==========================================================

:func:`check_values` checks the values of a column when it is first read: item ids and
label indices in range, token ids inside the tokenizer's vocabulary. Every failure is a
:class:`~mmcli.errors.BadInput` naming the file and the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.layout import (
    ENCODED_TABLES,
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
    STRING_BYTES,
    STRING_OFFSETS,
    TOKENIZER_VOCAB,
    encoded_table,
    string_column,
)
from mmcli.formats.safetensors_io import DTYPES, FLOAT_CODES, TensorInfo

FEATURES_KIND = "features"
TENSORS_KIND = "tensors"

# preprocess's tables: (allowed dtype codes, allowed ranks, what the contract says)
RAW_TABLES = {
    "image": (("U8",), (4,), "uint8 [rows, 3, H, W]"),
    "text": (("I32", "I64"), (2,), "int32/int64 token ids [rows, length]"),
    "audio": (FLOAT_CODES, (2, 3), "float [rows, samples]"),
    "video": (("U8",), (5,), "uint8 [rows, frames, 3, H, W]"),
}


@dataclass
class ShardMeta:
    """The parsed, type-checked metadata of one tensor or feature file."""

    kind: str
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    position: tuple[int, int] = (0, 1)


def parse_json_entry(metadata: dict[str, str], key: str, default: Any, where: str) -> Any:
    value = metadata.get(key)
    if value is None:
        return default
    try:
        return safejson.loads(value)
    except safejson.JSONError as e:
        raise BadInput(f"corrupt metadata entry {key} ({e})", where=where) from None


def _bad(key: str, expected: str, where: str) -> BadInput:
    return BadInput(
        f"corrupt metadata entry {key} (expected {expected})",
        where=where,
        hint="recreate the file with mmcli preprocess or mmcli extract",
    )


def read_metadata(metadata: dict[str, str], where: str) -> ShardMeta:
    """Check the format version and parse kind, table specs, labels, source and shard."""
    if metadata.get(META_FORMAT) is None:
        raise BadInput(
            "not an mmcli tensor file (no mmcli.format metadata)",
            where=where,
            hint="create it with mmcli preprocess or mmcli extract",
        )
    if metadata[META_FORMAT] != FORMAT_VERSION:
        raise BadInput(
            f"unsupported mmcli format version {metadata[META_FORMAT][:20]}",
            where=where,
            hint=f"this mmcli reads version {FORMAT_VERSION}; upgrade mmcli",
        )
    specs = parse_json_entry(metadata, META_TABLES, {}, where)
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise _bad(META_TABLES, "an object of table specs", where)
    labels = parse_json_entry(metadata, META_LABELS, [], where)
    if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
        raise _bad(META_LABELS, "a list of label names", where)
    if len(set(labels)) != len(labels):
        raise _bad(META_LABELS, "label names without repeats", where)
    source = parse_json_entry(metadata, META_SOURCE, {}, where)
    if not isinstance(source, dict):
        raise _bad(META_SOURCE, "an object", where)
    shard = parse_json_entry(metadata, META_SHARD, {"index": 0, "count": 1}, where)
    index = shard.get("index") if isinstance(shard, dict) else None
    count = shard.get("count") if isinstance(shard, dict) else None
    if not (_int(index) and _int(count) and 0 <= index < count):
        raise _bad(META_SHARD, '{"index": i, "count": n} with 0 <= i < n', where)
    return ShardMeta(
        kind=metadata.get(META_KIND, TENSORS_KIND),
        specs=specs,
        label_names=labels,
        source=source,
        position=(index, count),
    )


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(info: TensorInfo) -> str:
    return f"{DTYPES[info.dtype][1]} {list(info.shape)}"


def _column_error(name: str, info: TensorInfo, expected: str, where: str) -> BadInput:
    return BadInput(
        f"column {name} is {_describe(info)}, the format says {expected}",
        where=where,
        hint="the file is corrupt or was not written by mmcli; recreate it",
    )


def check_columns(tensors: dict[str, TensorInfo], kind: str, where: str) -> None:
    """Every column's dtype and shape against the contract (the module docstring)."""
    if (ID_BYTES in tensors) != (ID_OFFSETS in tensors):
        have, lack = (ID_BYTES, ID_OFFSETS) if ID_BYTES in tensors else (ID_OFFSETS, ID_BYTES)
        raise BadInput(f"column {have} without {lack}", where=where)
    items = 0
    if ID_OFFSETS in tensors:
        offsets = tensors[ID_OFFSETS]
        if offsets.dtype != "I64" or len(offsets.shape) != 1 or offsets.shape[0] < 1:
            raise _column_error(ID_OFFSETS, offsets, "int64 [items + 1]", where)
        ids = tensors[ID_BYTES]
        if ids.dtype != "U8" or len(ids.shape) != 1:
            raise _column_error(ID_BYTES, ids, "uint8 [bytes]", where)
        items = offsets.shape[0] - 1
    if LABELS in tensors:
        labels = tensors[LABELS]
        if labels.dtype != "I64" or labels.shape != (items,):
            raise _column_error(LABELS, labels, f"int64 [{items}] (one per item)", where)
    if kind not in (TENSORS_KIND, FEATURES_KIND):
        return
    for name, info in tensors.items():
        if name in RESERVED:
            continue
        if name.endswith(ITEM_SUFFIX):
            base = name[: -len(ITEM_SUFFIX)]
            encoded = (base + STRING_OFFSETS, base + STRING_BYTES)
            if base not in tensors and not any(n in tensors for n in encoded):
                raise BadInput(
                    f"column {name} has no {name[: -len(ITEM_SUFFIX)]} table", where=where
                )
            continue
        column = string_column(name)
        if column is not None:
            _check_strings(column, tensors, where)
            continue
        encoded = encoded_table(name)
        if encoded is not None:
            _check_encoded(encoded, tensors, kind, where)
            continue
        _check_table(name, info, tensors, kind, where)


def _check_encoded(table: str, tensors: dict[str, TensorInfo], kind: str, where: str) -> None:
    """An encoded table: ``<m>.bytes`` uint8 + ``<m>.offsets`` int64 [rows + 1] +
    ``<m>.item`` int64 [rows], and no ``<m>`` tensor (see the module docstring)."""
    names = (table + STRING_BYTES, table + STRING_OFFSETS)
    missing = [n for n in names if n not in tensors]
    if missing:
        have = names[0] if missing[0] == names[1] else names[1]
        raise BadInput(f"column {have} without {missing[0]}", where=where)
    if kind != TENSORS_KIND or table not in ENCODED_TABLES:
        raise BadInput(
            f"columns {names[0]} / {names[1]}: only preprocess's "
            f"{', '.join(ENCODED_TABLES)} table may be stored encoded",
            where=where,
        )
    if table in tensors:
        raise BadInput(f"table {table} is stored both as pixels and encoded", where=where)
    data, offsets = tensors[names[0]], tensors[names[1]]
    if data.dtype != "U8" or len(data.shape) != 1:
        raise _column_error(names[0], data, "uint8 [bytes]", where)
    if offsets.dtype != "I64" or len(offsets.shape) != 1 or offsets.shape[0] < 1:
        raise _column_error(names[1], offsets, "int64 [rows + 1]", where)
    rows = offsets.shape[0] - 1
    item = tensors.get(table + ITEM_SUFFIX)
    if item is None:
        raise BadInput(f"table {table} has no {table}{ITEM_SUFFIX} column", where=where)
    if item.dtype != "I64" or item.shape != (rows,):
        raise _column_error(
            table + ITEM_SUFFIX, item, f"int64 [{rows}] (one per {table} row)", where
        )


def check_offsets(name: str, offsets: Any, size: int, where: str) -> None:
    """The offsets of an encoded table: from 0, never back, ending at the bytes' end."""
    import numpy as np

    bad = (
        offsets[0] != 0
        or offsets[-1] != size
        or (len(offsets) > 1 and bool((np.diff(offsets) < 0).any()))
    )
    if bad:
        raise BadInput(
            f"corrupt column {name} (offsets must run from 0 to {size} without going back)",
            where=where,
            hint="the file is corrupt; recreate it",
        )


def _check_strings(column: str, tensors: dict[str, TensorInfo], where: str) -> None:
    """A string column ``<table>.<col>``: bytes and offsets together, one string per row."""
    names = (column + STRING_BYTES, column + STRING_OFFSETS)
    missing = [n for n in names if n not in tensors]
    if missing:
        have = names[0] if missing[0] == names[1] else names[1]
        raise BadInput(f"column {have} without {missing[0]}", where=where)
    table = column.split(".", 1)[0]
    if table not in tensors:
        raise BadInput(f"string column {column} has no {table} table", where=where)
    data, offsets = tensors[names[0]], tensors[names[1]]
    if data.dtype != "U8" or len(data.shape) != 1:
        raise _column_error(names[0], data, "uint8 [bytes]", where)
    rows = tensors[table].shape[0] if tensors[table].shape else 0
    if offsets.dtype != "I64" or offsets.shape != (rows + 1,):
        raise _column_error(
            names[1], offsets, f"int64 [{rows + 1}] (one per {table} row, plus one)", where
        )


def _check_table(
    name: str, info: TensorInfo, tensors: dict[str, TensorInfo], kind: str, where: str
) -> None:
    if not info.shape:
        raise _column_error(name, info, "rows first ([rows, ...])", where)
    item = tensors.get(name + ITEM_SUFFIX)
    if item is None:
        raise BadInput(f"table {name} has no {name}{ITEM_SUFFIX} column", where=where)
    if item.dtype != "I64" or item.shape != (info.shape[0],):
        raise _column_error(
            name + ITEM_SUFFIX, item, f"int64 [{info.shape[0]}] (one per {name} row)", where
        )
    if kind == FEATURES_KIND:
        if info.dtype not in FLOAT_CODES or len(info.shape) != 2:
            raise _column_error(name, info, "floating [rows, D] features", where)
    elif name in RAW_TABLES:
        codes, ranks, expected = RAW_TABLES[name]
        ok = info.dtype in codes and len(info.shape) in ranks
        if name == "image" and ok:
            ok = info.shape[1] == 3
        if name == "video" and ok:
            ok = info.shape[2] == 3
        if name == "audio" and ok and len(info.shape) == 3:
            ok = info.shape[1] == 1
        if not ok:
            raise _column_error(name, info, expected, where)


def check_values(
    name: str, arr: Any, *, kind: str, num_items: int, num_labels: int, spec: dict, where: str
) -> None:
    """The values of column ``name`` (a numpy array), checked when it is first read."""
    import numpy as np

    if not arr.size:
        return
    if name.endswith(ITEM_SUFFIX):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_items:
            bad = lo if lo < 0 else hi
            raise BadInput(
                f"column {name} points to item {bad}, outside the file's {num_items} items",
                where=where,
                hint="the file is corrupt; recreate it",
            )
    elif name == LABELS:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -1 or hi >= num_labels:
            bad = lo if lo < -1 else hi
            raise BadInput(
                f"label index {bad} out of range: the file names {num_labels} labels "
                "(-1 = no label)",
                where=where,
                hint="the file is corrupt; recreate it",
            )
    elif name == "text" and kind == TENSORS_KIND and np.issubdtype(arr.dtype, np.integer):
        vocab = _vocab_size(spec, where)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadInput(
                f"token id {bad} in the text table is outside the tokenizer's vocabulary "
                f"(0..{vocab - 1})",
                where=where,
                hint="the file is corrupt; preprocess the captions again",
            )


def _vocab_size(spec: dict, where: str) -> int:
    name = spec.get("tokenizer", "bytes")
    if not isinstance(name, str) or name not in TOKENIZER_VOCAB:
        raise BadInput(
            f"the text table names an unknown tokenizer {str(name)[:40]!r}",
            where=where,
            hint=f"known: {', '.join(TOKENIZER_VOCAB)}",
        )
    return TOKENIZER_VOCAB[name]
