"""Feature sets: one or more feature files read as one set of items.

``eval`` and ``retrieve`` take several FEATURES arguments (files, folders, globs). They
form one set in either (or both) of two ways:

* shards of one set (the same tables and specs): concatenated, like :class:`TensorSet`;
* files holding *different* tables of the same items (image features in one file, text
  features in another): joined by item id. Items are numbered in order of first
  appearance (the first file's items, then items only found in later files).

    fs = FeatureSet.open(["feats/images/", "feats/texts-*.safetensors"])
    x, items = fs.table("text")          # float32 [rows, D], int64 [rows] (item numbers)
    fs.ids[items[0]]                     # the item id of the first text row
    fs.manifest_fields(items[0])         # its manifest row, image/audio paths resolved

Label names are merged by name; an item labelled differently in two files is an error.
Manifest fields (and the ``split`` of each item) come from the manifest named in the
files' ``mmcli.source`` metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.manifest import PATH_FIELDS, file_sha256, load_manifest_index, locate_manifest
from mmcli.formats.tensorfile import (
    ShardFile,
    TensorSet,
    resolve_sources,
    table_order,
    where_paths,
)

log = logging.getLogger("mmcli")

FEATURES_KIND = "features"


@dataclass
class _Group:
    tensors: TensorSet
    item_map: Any  # numpy int64 [tensors.num_items]: the FeatureSet item of each local item


class FeatureSet:
    """Feature files joined into one set of items (see the module docstring)."""

    def __init__(self, groups: list[TensorSet]):
        import numpy as np

        if not groups:
            raise BadInput("no feature files given")
        self.ids: list[str] = []
        index: dict[str, int] = {}
        self._groups: list[_Group] = []
        self._table_group: dict[str, int] = {}
        for g, ts in enumerate(groups):
            for name in ts.tables:
                if name in self._table_group:
                    other = self._groups[self._table_group[name]].tensors
                    raise BadInput(
                        f"the {name} table is in two sets of files ({where_paths(other.paths)} and "
                        f"{where_paths(ts.paths)}) with different specs",
                        hint="pass features of one encoder per table",
                    )
                self._table_group[name] = g
            ids = ts.ids()
            item_map = np.empty(len(ids), dtype=np.int64)
            for j, item_id in enumerate(ids):
                k = index.get(item_id)
                if k is None:
                    k = index[item_id] = len(self.ids)
                    self.ids.append(item_id)
                item_map[j] = k
            self._groups.append(_Group(ts, item_map))
        self._index = index
        self._labels, self.label_names = self._merge_labels()
        self._manifest: _Manifest | None | bool = False  # False: not loaded yet
        #: items kept by :meth:`select_split` (None: all)
        self.keep: Any = None
        self.split: str | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, sources: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureSet:
        """Open feature files: shards of one set are concatenated, different tables joined."""
        paths = resolve_sources(sources)
        shards = [ShardFile.from_stdin() if p == "-" else ShardFile(p) for p in paths]
        groups: dict[str, list[ShardFile]] = {}
        for s in shards:
            if s.kind != FEATURES_KIND:
                raise BadInput(
                    f"expected a feature file, got a {s.kind} file",
                    where=s.path,
                    hint="turn tensor shards into features with mmcli extract",
                )
            if not s.tables:
                raise BadInput("the file holds no feature table", where=s.path)
            key = json.dumps([sorted(s.tables), s.specs], sort_keys=True)
            groups.setdefault(key, []).append(s)
        return cls([TensorSet(g) for g in groups.values()])

    # -------------------------------------------------------------- description
    @property
    def num_items(self) -> int:
        return len(self.ids)

    @property
    def tables(self) -> list[str]:
        return sorted(self._table_group, key=table_order)

    @property
    def paths(self) -> list[str]:
        return [p for g in self._groups for p in g.tensors.paths]

    def tensors(self, table: str) -> TensorSet:
        self.require(table)
        return self._groups[self._table_group[table]].tensors

    def require(self, table: str, hint: str | None = None) -> None:
        if table not in self._table_group:
            raise BadInput(
                f"no {table} table in the features (they have: {', '.join(self.tables) or 'none'})",
                where=where_paths(self.paths),
                hint=hint,
            )

    def spec(self, table: str) -> dict[str, Any]:
        return self.tensors(table).spec(table)

    def dim(self, table: str) -> int:
        info = self.tensors(table).shards[0].tensors[table]
        if len(info.shape) != 2:
            raise BadInput(
                f"the {table} table is not a feature table (shape {list(info.shape)}, expected [rows, D])",
                where=where_paths(self.tensors(table).paths),
                hint="turn tensor shards into features with mmcli extract",
            )
        return int(info.shape[1])

    def dtype(self, table: str) -> str:
        """torch dtype name of the stored table (float16, bfloat16, float32, ...)."""
        return self.tensors(table).shards[0].tensors[table].torch_dtype_name

    def rows(self, table: str) -> int:
        return self.tensors(table).rows(table)

    def item_index(self, item_id: str) -> int | None:
        return self._index.get(item_id)

    # --------------------------------------------------------------------- data
    def iter_shards(self, table: str) -> Iterator[tuple[Any, Any]]:
        """``(data, items)`` shard by shard: data memory-mapped [n, D] (stored dtype),
        items int64 [n] (FeatureSet item numbers)."""
        import torch

        self.dim(table)
        group = self._groups[self._table_group[table]]
        for s, offset in zip(group.tensors.shards, group.tensors.item_offsets):
            local = s.item_index(table).astype("int64", copy=False)
            _check_items(local, s, table)
            yield s.tensor(table), torch.from_numpy(group.item_map[local + offset])

    def table(
        self, table: str, dtype: Any = "float32", *, every_item: bool = False
    ) -> tuple[Any, Any]:
        """The whole table in memory: (data [rows, D] in ``dtype``, items int64 [rows]);
        only the rows of the items :meth:`select_split` kept, unless ``every_item``."""
        import torch

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        parts = list(self.iter_shards(table))
        data = torch.cat([p[0].to(dtype) for p in parts]) if parts else torch.empty(0)
        items = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
        if self.keep is not None and not every_item:
            rows = torch.from_numpy(self.keep[items.numpy()])
            data, items = data[rows], items[rows]
        return data, items

    def select_split(self, split: str) -> FeatureSet:
        """Keep only the items whose manifest ``split`` is ``split`` (in :meth:`table` and
        :meth:`row_mask`). Returns self."""
        import numpy as np

        names = self.splits()
        keep = np.array([n == split for n in names], dtype=bool)
        if not keep.any():
            have = sorted({n for n in names if n is not None})
            raise BadInput(
                f"no item of split {split!r} in the features' manifest",
                where=self.manifest_path,
                hint=f"splits there: {', '.join(have)}"
                if have
                else "the manifest has no split field",
            )
        self.keep, self.split = keep, split
        return self

    def row_mask(self, table: str):
        """bool [rows] of ``table`` (all shards, in order): the rows of kept items, or None
        when every item is kept."""
        import numpy as np

        if self.keep is None:
            return None
        return np.concatenate([self.keep[items.numpy()] for _, items in self.iter_shards(table)])

    def labels(self):
        """int64 label per item (numpy), -1 = none, indexing :attr:`label_names`."""
        return self._labels

    def _merge_labels(self):
        import numpy as np

        names: list[str] = []
        for g in self._groups:
            for n in g.tensors.label_names:
                if n not in names:
                    names.append(n)
        out = np.full(len(self.ids), -1, dtype=np.int64)
        for g in self._groups:
            local = g.tensors.labels()
            if not len(local) or (local < 0).all():
                continue
            remap = np.array([names.index(n) for n in g.tensors.label_names] or [0], dtype=np.int64)
            has = local >= 0
            if (local[has] >= len(g.tensors.label_names)).any():
                raise BadInput("label index out of range", where=where_paths(g.tensors.paths))
            new = np.where(has, remap[np.where(has, local, 0)], -1)
            items = g.item_map
            clash = has & (out[items] >= 0) & (out[items] != new)
            if clash.any():
                j = int(np.flatnonzero(clash)[0])
                raise BadInput(
                    f"item {self.ids[items[j]]} has label {names[out[items[j]]]!r} in one file "
                    f"and {names[new[j]]!r} in another",
                    where=where_paths(g.tensors.paths),
                    hint="pass features of one dataset",
                )
            out[items[has]] = new[has]
        return out, names

    # ----------------------------------------------------------------- manifest
    @property
    def source(self) -> dict[str, Any]:
        for g in self._groups:
            if g.tensors.source:
                return g.tensors.source
        return {}

    def _load_manifest(self) -> _Manifest | None:
        if self._manifest is False:
            self._manifest = _Manifest.find(self)
        return self._manifest  # type: ignore[return-value]

    @property
    def manifest_path(self) -> str | None:
        m = self._load_manifest()
        return str(m.path) if m else None

    def manifest_fields(self, item: int) -> dict[str, Any] | None:
        """The manifest row of item number ``item`` with image/audio paths resolved
        (absolute when the manifest path is absolute), or None without a manifest."""
        m = self._load_manifest()
        if m is None:
            return None
        return m.fields(self.ids[item])

    def splits(self) -> list[str | None]:
        """The manifest ``split`` of each item (None: no split or no manifest row)."""
        m = self._load_manifest()
        if m is None:
            raise BadInput(
                "the features name no readable manifest, so items have no split",
                where=where_paths(self.paths),
                hint="pass --train/--val/--test feature files instead",
            )
        return [m.split(i) for i in self.ids]


class _Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.items = load_manifest_index(path)

    @classmethod
    def find(cls, fs: FeatureSet) -> _Manifest | None:
        source = fs.source
        name = source.get("manifest")
        path = locate_manifest(source, fs.paths)
        if path is not None:
            sha = source.get("sha256") or (
                source.get("input_sha256") if source.get("input") == name else None
            )
            if sha and file_sha256(path) != sha:
                log.warning(
                    "%s changed since the features were extracted; item fields may not match",
                    path,
                )
            return cls(path)
        if not name:
            return None
        log.warning("the features' manifest %s is not readable; hits carry ids only", name)
        return None

    def fields(self, item_id: str) -> dict[str, Any] | None:
        item = self.items.get(item_id)
        if item is None:
            return None
        out = dict(item.fields)
        for key in PATH_FIELDS:
            if isinstance(out.get(key), str):
                out[key] = os.path.normpath(item.path(key))
        return out

    def split(self, item_id: str) -> str | None:
        item = self.items.get(item_id)
        return None if item is None else item.split


def _check_items(local, shard: ShardFile, table: str) -> None:
    if len(local) and (int(local.min()) < 0 or int(local.max()) >= shard.num_items):
        raise BadInput(f"{table}.item points outside the file's items", where=shard.path)


def open_features(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureSet:
    return FeatureSet.open(sources)
