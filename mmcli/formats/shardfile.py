"""One tensor or feature file (or stdin), read lazily and memory-mapped.

Opening a :class:`ShardFile` reads only the header and checks it (container, metadata and
every column's dtype and shape: :mod:`mmcli.formats.contract`). A column's values are
checked the first time it is read (item and label indices in range, ids decodable, token
ids inside the vocabulary), so nothing wrong reaches a computation.
"""

from __future__ import annotations

import os
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import read_bytes
from mmcli.formats.contract import (
    check_columns,
    check_offsets,
    check_values,
    parse_json_entry,
    read_metadata,
)
from mmcli.formats.layout import (
    ID_BYTES,
    ID_OFFSETS,
    ITEM_SUFFIX,
    LABELS,
    RESERVED,
    STRING_BYTES,
    STRING_OFFSETS,
    decode_ids,
    encoded_table,
    string_column,
    table_order,
)
from mmcli.formats.safetensors_io import DTYPES, TensorInfo, parse_header, read_header
from mmcli.formats.userfiles import open_file


class ShardFile:
    """One safetensors file (or stdin), read lazily and memory-mapped."""

    def __init__(self, path: str | os.PathLike, data: bytes | None = None):
        self.path = str(path)
        self._data = data
        if data is not None:
            self.tensors, self.metadata, self.data_start = parse_header(data, self.path)
        else:
            self.tensors, self.metadata, self.data_start = read_header(path)
        self._meta = read_metadata(self.metadata, self.path)
        check_columns(self.tensors, self._meta.kind, self.path)
        self._checked: set[str] = set()
        self._ids: list[str] | None = None

    @classmethod
    def from_stdin(cls) -> ShardFile:
        return cls("<stdin>", data=read_bytes("-"))

    # -- metadata ------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._meta.kind

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        return self._meta.specs

    @property
    def label_names(self) -> list[str]:
        return self._meta.label_names

    @property
    def source(self) -> dict[str, Any]:
        return self._meta.source

    @property
    def shard_position(self) -> tuple[int, int]:
        return self._meta.position

    def extra(self, key: str, default: Any = None) -> Any:
        """A free-form ``mmcli.KEY`` metadata entry, parsed as JSON."""
        return parse_json_entry(self.metadata, f"mmcli.{key}", default, self.path)

    @property
    def tables(self) -> list[str]:
        names = [
            n
            for n in self.tensors
            if n not in RESERVED
            and not n.endswith(ITEM_SUFFIX)
            and string_column(n) is None
            and encoded_table(n) is None
        ]
        names += [encoded_table(n) for n in self.tensors if n.endswith(STRING_OFFSETS)]
        return sorted({n for n in names if n is not None}, key=table_order)

    def is_encoded(self, table: str) -> bool:
        """Whether ``table`` holds compressed image files (``preprocess --store encoded``)."""
        return table not in self.tensors and table + STRING_OFFSETS in self.tensors

    def encoded(self, table: str):
        """(uint8 bytes, int64 offsets [rows + 1]) of an encoded table, memory-mapped; the
        offsets checked the first time (from 0, in order, ending at the bytes' end)."""
        if not self.is_encoded(table):
            raise BadInput(f"table {table} is not stored encoded", where=self.path)
        data = self._read(table + STRING_BYTES)
        offsets = self._read(table + STRING_OFFSETS)
        if table + STRING_OFFSETS not in self._checked:
            check_offsets(table + STRING_OFFSETS, offsets, len(data), self.path)
            self._checked.add(table + STRING_OFFSETS)
        return data, offsets

    def has_strings(self, name: str) -> bool:
        return name + STRING_OFFSETS in self.tensors

    def strings(self, name: str) -> list[str]:
        """A string column (``text.raw``: one caption per text row) written with the shard
        (checked like the ids: offsets in order and in bounds, UTF-8)."""
        if not self.has_strings(name):
            raise BadInput(f"no string column {name!r}", where=self.path)
        data = self._read(name + STRING_BYTES).tobytes()
        try:
            return decode_ids(data, self._read(name + STRING_OFFSETS).tolist())
        except ValueError as e:
            raise BadInput(
                f"corrupt string column {name} ({e})",
                where=self.path,
                hint="the file is corrupt; recreate it",
            ) from None

    @property
    def num_items(self) -> int:
        return self.tensors[ID_OFFSETS].shape[0] - 1 if ID_OFFSETS in self.tensors else 0

    def rows(self, table: str) -> int:
        if self.is_encoded(table):
            return self.tensors[table + STRING_OFFSETS].shape[0] - 1
        return self._info(table).shape[0]

    def has_labels(self) -> bool:
        return LABELS in self.tensors

    # -- data ----------------------------------------------------------------
    def numpy(self, name: str):
        """The tensor as a numpy array, memory-mapped when the file is on disk; its values
        are checked against the format the first time it is read.

        bfloat16 comes back as uint16 (numpy has no bfloat16); use :meth:`tensor`.
        """
        arr = self._read(name)
        if name not in self._checked:
            check_values(
                name,
                arr,
                kind=self.kind,
                num_items=self.num_items,
                num_labels=len(self.label_names),
                spec=self.specs.get(name, {}),
                where=self.path,
            )
            self._checked.add(name)
        return arr

    def _read(self, name: str):
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
            with open_file(self.path) as f:
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
            if self.is_encoded(name):
                raise BadInput(
                    f"the {name} table holds encoded images (preprocess --store encoded), "
                    "which this command does not decode",
                    where=self.path,
                    hint="preprocess with --store pixels for it",
                ) from None
            raise BadInput(
                f"no tensor {name!r} (has: {', '.join(self.tables) or 'none'})", where=self.path
            ) from None

    def ids(self) -> list[str]:
        """The item ids (checked: offsets in order and in bounds, UTF-8, no repeats)."""
        if self._ids is None:
            if ID_OFFSETS not in self.tensors:
                self._ids = []
            else:
                self._ids = self._decode_ids()
        return list(self._ids)

    def _decode_ids(self) -> list[str]:
        data = self._read(ID_BYTES).tobytes()
        try:
            ids = decode_ids(data, self._read(ID_OFFSETS).tolist())
        except ValueError as e:
            raise BadInput(
                f"corrupt item id column ({e})",
                where=self.path,
                hint="the file is corrupt; recreate it",
            ) from None
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise BadInput(
                f"item id {dup[:60]!r} appears twice", where=self.path, hint="recreate the file"
            )
        return ids

    def labels(self):
        """int64 label index per item (numpy), -1 = none; all -1 when the file has none."""
        import numpy as np

        if LABELS in self.tensors:
            return np.asarray(self.numpy(LABELS))
        return np.full(self.num_items, -1, dtype=np.int64)

    def item_index(self, table: str):
        if not self.is_encoded(table):
            self._info(table)
        return self.numpy(table + ITEM_SUFFIX)
