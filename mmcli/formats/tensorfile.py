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

This module parses headers with the standard library only: ``mmcli info`` never
imports numpy-heavy or torch code paths.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_write_bytes, is_stdio, read_bytes

FORMAT_VERSION = "1"
ID_BYTES = "item.id.bytes"
ID_OFFSETS = "item.id.offsets"
LABELS = "item.label"
ITEM_SUFFIX = ".item"
RESERVED = (ID_BYTES, ID_OFFSETS, LABELS)

META_FORMAT = "mmcli.format"
META_KIND = "mmcli.kind"
META_TABLES = "mmcli.tables"
META_LABELS = "mmcli.labels"
META_SOURCE = "mmcli.source"
META_SHARD = "mmcli.shard"

SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")

# safetensors dtype code -> (numpy dtype name, torch dtype name, itemsize)
DTYPES = {
    "BOOL": ("bool", "bool", 1),
    "U8": ("uint8", "uint8", 1),
    "I8": ("int8", "int8", 1),
    "I16": ("int16", "int16", 2),
    "U16": ("uint16", "uint16", 2),
    "F16": ("float16", "float16", 2),
    "BF16": (None, "bfloat16", 2),
    "I32": ("int32", "int32", 4),
    "U32": ("uint32", "uint32", 4),
    "F32": ("float32", "float32", 4),
    "I64": ("int64", "int64", 8),
    "U64": ("uint64", "uint64", 8),
    "F64": ("float64", "float64", 8),
}
_NAME_TO_CODE = {v[1]: k for k, v in DTYPES.items()}


TABLE_ORDER = ("image", "text", "audio", "fused")


def table_order(name: str) -> tuple[int, str]:
    """Sort key: the modalities in their usual order, then other tables by name."""
    return (TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER), name)


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}.safetensors"


# --------------------------------------------------------------------------- ids


def encode_ids(ids: Sequence[str]):
    """Item ids -> (uint8 bytes, int64 offsets) numpy arrays."""
    import numpy as np

    encoded = [s.encode("utf-8") for s in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_ids(data: bytes | memoryview, offsets: Sequence[int]) -> list[str]:
    data = bytes(data)
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


# ----------------------------------------------------------------------- writing


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
    for name, values in shard.strings.items():
        if "." not in name or name.split(".", 1)[0] not in shard.tables:
            raise ValueError(f"string column {name!r} must be named <table>.<column>")
        tensors[name + ".bytes"], tensors[name + ".offsets"] = encode_ids(values)
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_KIND: kind,
        META_TABLES: json.dumps({n: specs.get(n, {}) for n in shard.tables}, sort_keys=True),
        META_LABELS: json.dumps(list(label_names), ensure_ascii=False),
        META_SHARD: json.dumps({"index": index, "count": count}),
    }
    if source:
        metadata[META_SOURCE] = json.dumps(source, ensure_ascii=False)
    for key, value in (extra or {}).items():
        metadata[f"mmcli.{key}"] = value if isinstance(value, str) else json.dumps(value)

    if any(_is_torch(t) for t in tensors.values()):
        import torch
        from safetensors.torch import save

        return save(
            {
                k: (v if _is_torch(v) else torch.from_numpy(np.ascontiguousarray(v))).contiguous()
                for k, v in tensors.items()
            },
            metadata=metadata,
        )
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def write_shard(path: str | os.PathLike, shard: Shard, **kwargs: Any) -> None:
    """Write one shard atomically (``-`` for stdout). Keyword args as :func:`serialize_shard`."""
    atomic_write_bytes(path, serialize_shard(shard, **kwargs))


# ----------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype][1]


def _parse_header(
    raw: bytes, where: str, size: int | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse a safetensors header. ``size``: the whole file's size in bytes (``len(raw)``
    when None: ``raw`` is the whole file); every tensor must lie inside it."""
    if len(raw) < 8:
        raise BadInput("not a safetensors file (too short)", where=where)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100_000_000 or len(raw) < 8 + n:
        raise BadInput("not a safetensors file (bad header)", where=where)
    try:
        header = json.loads(raw[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput("not a safetensors file (header is not JSON)", where=where) from None
    if not isinstance(header, dict):
        raise BadInput("not a safetensors file (header is not a JSON object)", where=where)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, t in header.items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPES:
            dtype = t.get("dtype") if isinstance(t, dict) else None
            raise BadInput(f"unsupported dtype {dtype!r} for tensor {name!r}", where=where)
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            tensors[name] = TensorInfo(t["dtype"], tuple(int(d) for d in t["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise BadInput(
                f"not a safetensors file (bad entry for {name!r})", where=where
            ) from None
    total = len(raw) if size is None else size
    for name, info in tensors.items():
        nbytes = math.prod(info.shape) * DTYPES[info.dtype][2]
        if not 0 <= info.begin <= info.end or info.end - info.begin != nbytes:
            raise BadInput(f"corrupt safetensors file (bad offsets for {name!r})", where=where)
        if 8 + n + info.end > total:
            raise BadInput(
                f"truncated file: tensor {name!r} ends at byte {8 + n + info.end:,} "
                f"but the file has {total:,}",
                where=where,
                hint="the file was cut short (an interrupted copy or write); recreate it",
            )
    return tensors, metadata, 8 + n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensor infos, metadata, data start) of a safetensors file, reading only its header."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput("not a safetensors file (too short)", where=where)
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise BadInput("not a safetensors file (bad header)", where=where)
            return _parse_header(head + f.read(n), where, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise BadInput("file not found", where=where) from None
    except IsADirectoryError:
        raise BadInput("expected a file, got a folder", where=where) from None


class ShardFile:
    """One safetensors file (or stdin), read lazily and memory-mapped."""

    def __init__(self, path: str | os.PathLike, data: bytes | None = None):
        self.path = str(path)
        self._data = data
        if data is not None:
            self.tensors, self.metadata, self.data_start = _parse_header(data, self.path)
        else:
            self.tensors, self.metadata, self.data_start = read_header(path)
        self._check()

    @classmethod
    def from_stdin(cls) -> ShardFile:
        return cls("<stdin>", data=read_bytes("-"))

    def _check(self) -> None:
        if self.metadata.get(META_FORMAT) is None:
            raise BadInput(
                "not an mmcli tensor file (no mmcli.format metadata)",
                where=self.path,
                hint="create it with mmcli preprocess or mmcli extract",
            )
        if self.metadata[META_FORMAT] != FORMAT_VERSION:
            raise BadInput(
                f"unsupported mmcli format version {self.metadata[META_FORMAT]}",
                where=self.path,
                hint=f"this mmcli reads version {FORMAT_VERSION}; upgrade mmcli",
            )

    # -- metadata ------------------------------------------------------------
    def _json(self, key: str, default: Any) -> Any:
        value = self.metadata.get(key)
        if value is None:
            return default
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise BadInput(f"corrupt metadata entry {key}", where=self.path) from None

    @property
    def kind(self) -> str:
        return self.metadata.get(META_KIND, "tensors")

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        return self._json(META_TABLES, {})

    @property
    def label_names(self) -> list[str]:
        return self._json(META_LABELS, [])

    @property
    def source(self) -> dict[str, Any]:
        return self._json(META_SOURCE, {})

    @property
    def shard_position(self) -> tuple[int, int]:
        s = self._json(META_SHARD, {"index": 0, "count": 1})
        return int(s["index"]), int(s["count"])

    def extra(self, key: str, default: Any = None) -> Any:
        return self._json(f"mmcli.{key}", default)

    @property
    def tables(self) -> list[str]:
        # table names hold no dot: dotted names are columns (ids, labels, <m>.item, strings)
        names = [n for n in self.tensors if "." not in n]
        return sorted(names, key=table_order)

    def has_strings(self, name: str) -> bool:
        return f"{name}.offsets" in self.tensors

    def strings(self, name: str) -> list[str]:
        """A string column (``text.raw``: one caption per text row) written with the shard."""
        return decode_ids(
            self.numpy(f"{name}.bytes").tobytes(), self.numpy(f"{name}.offsets").tolist()
        )

    @property
    def num_items(self) -> int:
        return self.tensors[ID_OFFSETS].shape[0] - 1 if ID_OFFSETS in self.tensors else 0

    def rows(self, table: str) -> int:
        return self.tensors[table].shape[0]

    def has_labels(self) -> bool:
        return LABELS in self.tensors

    # -- data ----------------------------------------------------------------
    def numpy(self, name: str):
        """The tensor as a numpy array, memory-mapped when the file is on disk.

        bfloat16 comes back as uint16 (numpy has no bfloat16); use :meth:`tensor`.
        """
        import numpy as np

        info = self._info(name)
        np_name = DTYPES[info.dtype][0] or "uint16"
        dtype = np.dtype(np_name)
        count = (info.end - info.begin) // dtype.itemsize
        offset = self.data_start + info.begin
        if count == 0:
            return np.empty(info.shape, dtype=dtype)
        if self._data is not None:
            arr = np.frombuffer(self._data, dtype=dtype, count=count, offset=offset)
        elif offset % dtype.itemsize == 0:
            arr = np.memmap(self.path, dtype=dtype, mode="c", offset=offset, shape=(count,))
        else:  # unaligned: read a copy rather than hand out an unaligned view
            with open(self.path, "rb") as f:
                f.seek(offset)
                arr = np.frombuffer(f.read(info.end - info.begin), dtype=dtype)
        return arr.reshape(info.shape)

    def tensor(self, name: str):
        """The tensor as a torch tensor (memory-mapped, copy-on-write)."""
        import numpy as np
        import torch

        info = self._info(name)
        arr = self.numpy(name)
        if not arr.flags.writeable:
            arr = np.array(arr)
        t = torch.from_numpy(arr)
        if info.dtype == "BF16":
            t = t.view(torch.bfloat16)
        return t

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInput(
                f"no tensor {name!r} (has: {', '.join(self.tables) or 'none'})", where=self.path
            ) from None

    def ids(self) -> list[str]:
        if ID_OFFSETS not in self.tensors:
            return []
        return decode_ids(self.numpy(ID_BYTES).tobytes(), self.numpy(ID_OFFSETS).tolist())

    def labels(self):
        """int64 label index per item (numpy), -1 = none; all -1 when the file has none."""
        import numpy as np

        if LABELS in self.tensors:
            return np.asarray(self.numpy(LABELS))
        return np.full(self.num_items, -1, dtype=np.int64)

    def item_index(self, table: str):
        return self.numpy(table + ITEM_SUFFIX)


def resolve_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a file, a folder of shards, a glob or a list of them into file paths.

    ``-`` stays ``-`` (stdin). Shard sets found in a folder or by a glob must be
    complete (``NAME-i-of-N`` for every i); a shard named explicitly is read alone.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[str] = []
    for src in sources:
        s = str(src)
        if is_stdio(s):
            paths.append(s)
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.glob("*.safetensors") if not f.name.startswith("."))
            if not found:
                raise BadInput("no .safetensors files in folder", where=s)
            _check_complete(found)
            paths.extend(found)
        elif any(c in s for c in "*?["):
            found = sorted(globlib.glob(s))
            if not found:
                raise BadInput("the pattern matches no files", where=s)
            _check_complete(found)
            paths.extend(found)
        elif p.exists():
            paths.append(s)
        else:
            raise BadInput("file not found", where=s, hint="check the path")
    if paths.count("-") > (1 if paths == ["-"] else 0):
        raise BadInput("stdin ('-') can only be read alone, as one tensor file")
    return paths


def _check_complete(paths: list[str]) -> None:
    groups: dict[tuple[str, int], set[int]] = {}
    for path in paths:
        m = SHARD_RE.match(Path(path).name)
        if m:
            key = (str(Path(path).parent / m["name"]), int(m["count"]))
            groups.setdefault(key, set()).add(int(m["index"]))
    for (name, count), have in groups.items():
        missing = sorted(set(range(count)) - have)
        if missing:
            shown = ", ".join(shard_name(Path(name).name, i, count) for i in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise BadInput(
                f"incomplete shard set: missing {shown}{more}",
                where=str(Path(name).parent),
                hint="finish the job that writes them (rerun it with --resume)",
            )


class TensorSet:
    """A set of shards read as one: same kind, same tables and specs, same labels.

    Items are numbered globally in shard order: item ``j`` of shard ``s`` is
    ``item_offsets[s] + j``.
    """

    def __init__(self, sources: str | os.PathLike | Sequence[str | os.PathLike] | list[ShardFile]):
        if isinstance(sources, list) and sources and isinstance(sources[0], ShardFile):
            self.shards = list(sources)
        else:
            paths = resolve_sources(sources)
            self.shards = [ShardFile.from_stdin() if p == "-" else ShardFile(p) for p in paths]
        if not self.shards:
            raise BadInput("no tensor files given")
        self._check_consistent()
        counts = [s.num_items for s in self.shards]
        self.item_offsets = [0]
        for c in counts:
            self.item_offsets.append(self.item_offsets[-1] + c)

    def _check_consistent(self) -> None:
        first = self.shards[0]
        for other in self.shards[1:]:
            for what, a, b in (
                ("kind", first.kind, other.kind),
                ("tables", sorted(first.tables), sorted(other.tables)),
                ("table specs", first.specs, other.specs),
                ("label names", first.label_names, other.label_names),
            ):
                if a != b:
                    raise BadInput(
                        f"{what} differ from {first.path} ({_short(a)} vs {_short(b)})",
                        where=other.path,
                        hint="pass files of one dataset and one encoder together",
                    )

    # -- description -----------------------------------------------------------
    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.shards]

    @property
    def kind(self) -> str:
        return self.shards[0].kind

    @property
    def tables(self) -> list[str]:
        return self.shards[0].tables

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        return self.shards[0].specs

    def spec(self, table: str) -> dict[str, Any]:
        return self.specs.get(table, {})

    @property
    def label_names(self) -> list[str]:
        return self.shards[0].label_names

    @property
    def source(self) -> dict[str, Any]:
        return self.shards[0].source

    @property
    def num_items(self) -> int:
        return self.item_offsets[-1]

    def rows(self, table: str) -> int:
        self.require(table)
        return sum(s.rows(table) for s in self.shards)

    def require(self, table: str, hint: str | None = None) -> None:
        if table not in self.tables:
            raise BadInput(
                f"no {table} table in the input (it has: {', '.join(self.tables) or 'none'})",
                where=where_paths(self.paths),
                hint=hint,
            )

    # -- data ----------------------------------------------------------------
    def ids(self) -> list[str]:
        out: list[str] = []
        for s in self.shards:
            out.extend(s.ids())
        return out

    def labels(self):
        import numpy as np

        return np.concatenate([s.labels() for s in self.shards]) if self.shards else np.empty(0)

    def iter_table(self, table: str) -> Iterator[tuple[int, Any, Any]]:
        """Yield ``(shard index, data tensor, global item index tensor)`` shard by shard."""
        import torch

        self.require(table)
        for i, s in enumerate(self.shards):
            items = torch.from_numpy(s.item_index(table).astype("int64", copy=True))
            yield i, s.tensor(table), items + self.item_offsets[i]

    def table(self, table: str):
        """(data, global item index) of a whole table, concatenated (small tables only)."""
        import torch

        parts = list(self.iter_table(table))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _short(x: Any, n: int = 80) -> str:
    s = json.dumps(x, sort_keys=True, ensure_ascii=False) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


def where_paths(paths: Sequence[str]) -> str:
    """A set of files for an error's *where*: the first path, and how many more."""
    if len(paths) == 1:
        return paths[0]
    return f"{paths[0]} (+{len(paths) - 1} more)"


def open_tensors(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> TensorSet:
    return TensorSet(sources)


def torch_dtype_code(dtype_name: str) -> str:
    """safetensors dtype code of a torch/numpy dtype name ("float16" -> "F16")."""
    return _NAME_TO_CODE[dtype_name]
