"""The layout of mmcli tensor files: column names, metadata keys, shard names, id columns.

See :mod:`mmcli.formats.tensorfile` for the whole picture; this module holds only the
names and the id-column encoding, so the reading and writing modules share them without
importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmcli.modalities import MODALITIES

FORMAT_VERSION = "1"
ID_BYTES = "item.id.bytes"
ID_OFFSETS = "item.id.offsets"
LABELS = "item.label"
ITEM_SUFFIX = ".item"
RESERVED = (ID_BYTES, ID_OFFSETS, LABELS)
#: a string column ``<table>.<col>`` (``text.raw``: the captions as given, one per row of
#: the table) is stored like the item ids, as ``<table>.<col>.bytes`` + ``.offsets``
STRING_BYTES = ".bytes"
STRING_OFFSETS = ".offsets"

META_FORMAT = "mmcli.format"
META_KIND = "mmcli.kind"
META_TABLES = "mmcli.tables"
META_LABELS = "mmcli.labels"
META_SOURCE = "mmcli.source"
META_SHARD = "mmcli.shard"

#: an encoded table ``<m>`` (``preprocess --store encoded``): each row's compressed image
#: file, concatenated in ``<m>.bytes`` (uint8) with ``<m>.offsets`` (int64 [rows + 1]), and
#: no ``<m>`` tensor; its spec says ``"store": "encoded"``
ENCODED_TABLES = ("image",)
STORE_ENCODED = "encoded"

SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")

TABLE_ORDER = (*MODALITIES, "fused")

#: the tokenizers a text table's spec may name, and their vocabulary sizes (token ids are
#: checked against them on open; mmcli.data.text implements them, tested to agree)
TOKENIZER_VOCAB = {"bytes": 259}


def table_order(name: str) -> tuple[int, str]:
    """Sort key: the modalities in their usual order, then other tables by name."""
    return (TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER), name)


def string_column(name: str) -> str | None:
    """``<table>.<col>`` when ``name`` is one half of a string column, else None."""
    if name in RESERVED:
        return None
    for suffix in (STRING_BYTES, STRING_OFFSETS):
        if name.endswith(suffix) and "." in name[: -len(suffix)]:
            return name[: -len(suffix)]
    return None


def encoded_table(name: str) -> str | None:
    """``<m>`` when ``name`` is one half of an encoded table (``image.bytes`` /
    ``image.offsets``: no dot before the suffix), else None."""
    if name in RESERVED:
        return None
    for suffix in (STRING_BYTES, STRING_OFFSETS):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and base and "." not in base:
            return base
    return None


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}.safetensors"


def encode_ids(ids: Sequence[str]):
    """Item ids -> (uint8 bytes, int64 offsets) numpy arrays."""
    import numpy as np

    encoded = [s.encode("utf-8") for s in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_ids(data: bytes | memoryview, offsets: Sequence[int]) -> list[str]:
    """The ids of an id column; ValueError (naming the item) when the offsets do not
    start at 0, go back or end elsewhere than at the end of ``data``, or an id is not
    UTF-8."""
    data = bytes(data)
    n = len(offsets) - 1
    if n < 0 or offsets[0] != 0 or offsets[-1] != len(data):
        raise ValueError(
            f"item id offsets run from {offsets[0] if n >= 0 else '-'} to "
            f"{offsets[-1] if n >= 0 else '-'}, the id bytes from 0 to {len(data)}"
        )
    out = []
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        if b < a:
            raise ValueError(f"item id offsets go back at item {i} ({a} then {b})")
        try:
            out.append(data[a:b].decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"the id of item {i} is not valid UTF-8") from None
    return out
