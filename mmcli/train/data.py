"""Training data: the items of tensor shards or feature files, joined by item id.

A training example is an *item*: one row of each modality it has (several captions are
several text rows of one item). :func:`load_dataset` joins the inputs into a
:class:`Dataset`; :mod:`mmcli.train.sampler` draws batches from it. Rows stay in the
memory-mapped shards until a batch needs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmcli.data.captions import caption_rows
from mmcli.data.decodepool import EncodedRows
from mmcli.data.encoded import pixel_spec
from mmcli.data.text import tokenizer_from_spec
from mmcli.errors import BadInput
from mmcli.formats.manifest import locate_manifest, read_manifest
from mmcli.formats.tensorfile import ShardFile, TensorSet, resolve_sources
from mmcli.modalities import in_order

log = logging.getLogger("mmcli")


class _Table:
    """One table (modality) of a shard set, rows fetched by global row index."""

    def __init__(self, ts: TensorSet, name: str, in_memory: bool):
        self.name = name
        self.spec = ts.spec(name)
        self.images: EncodedRows | None = None
        self.augment = False  # fuse-train --augment: random crops of encoded images
        if ts.shards[0].is_encoded(name):  # compressed files, decoded per batch
            self.images = EncodedRows(ts, name)
            self.spec = pixel_spec(self.spec)  # a model trained on them is the same model
            self.row_shape, self.dtype, self.bf16 = self.images.row_shape, np.dtype(np.uint8), False
            self._shards = list(ts.shards)
            self._strings = None
            return
        self.arrays = [s.numpy(name) for s in ts.shards]  # memory-mapped
        sizes = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.bf16 = any(s.tensors[name].dtype == "BF16" for s in ts.shards)
        if in_memory:
            self.arrays = (
                [np.concatenate(self.arrays)]
                if len(self.arrays) > 1
                else [np.asarray(self.arrays[0])]
            )
            self.starts = np.array([0, len(self.arrays[0])], dtype=np.int64)
        self.row_shape = tuple(self.arrays[0].shape[1:])
        self.dtype = self.arrays[0].dtype
        self._shards = list(ts.shards)
        self._strings: list[str] | None = None

    def strings(self, rows: np.ndarray) -> list[str]:
        """The captions as given of ``rows`` (global indices; -1 = absent: ""): what a
        pretrained text tower's own tokenizer reads (``text.raw``, loaded on first use)."""
        if self._strings is None:
            self._strings = [c for s in self._shards for c in caption_rows(s, self.name)]
        return [self._strings[r] if r >= 0 else "" for r in np.asarray(rows).tolist()]

    def model_input(self, encoder, rows: np.ndarray):
        """What ``encoder`` takes for ``rows``: the rows themselves, or for an encoder with
        its own tokenizer its tokens of the full captions."""
        if getattr(encoder, "takes_text", False):
            return encoder.tokenize(self.strings(rows))
        return self.fetch(np.asarray(rows))

    def fetch(self, rows: np.ndarray, seeds=None) -> torch.Tensor:
        """Rows (global indices) -> a new tensor [len(rows), ...] in the given order;
        encoded images decoded (``seeds``, one per row: augmented, see ``augment``)."""
        if self.images is not None:
            return torch.from_numpy(self.images.fetch(np.asarray(rows), seeds))
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self.arrays[s][rows[sel] - self.starts[s]]
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.bf16 else t


@dataclass
class Dataset:
    """Items joined across the given sets by id, with each modality's rows per item."""

    ids: list[str]
    labels: np.ndarray  # int64 [items], -1 = none
    label_names: list[str]
    splits: list[str | None]
    tables: dict[str, _Table]
    rows_of: dict[str, list[np.ndarray]]  # modality -> per item, its global row indices
    kind: str  # "tensors" or "features"
    sources: list[TensorSet] = field(default_factory=list)
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> manifest fields
    negatives: list[np.ndarray] | None = None  # per item: hard-negative caption tokens [n, L]

    def attach_hard_negatives(self, field_name: str) -> int:
        """Tokenize each item's hard-negative captions (manifest field ``field_name``: a
        string or a list) with the text table's tokenizer. Returns how many items have any."""

        if "text" not in self.tables:
            raise BadInput("--hard-negatives needs text in the data")
        if not self.manifest:
            raise BadInput(
                "--hard-negatives reads a manifest field, and the data has no manifest",
                hint="preprocess writes OUT/manifest.jsonl next to the shards; keep it there",
            )
        tok = tokenizer_from_spec(self.spec("text"))
        negatives, count = [], 0
        for item_id in self.ids:
            value = self.manifest.get(item_id, {}).get(field_name)
            texts = (
                [value]
                if isinstance(value, str)
                else [t for t in (value or []) if isinstance(t, str)]
            )
            arr, _ = (
                tok.encode_batch(texts)
                if texts
                else (np.zeros((0, tok.context_length), np.int32), 0)
            )
            negatives.append(arr)
            count += bool(texts)
        if not count:
            raise BadInput(
                f"no item has a {field_name!r} field in its manifest", hint="check --hard-negatives"
            )
        self.negatives = negatives
        return count

    @property
    def modalities(self) -> list[str]:
        return in_order(self.tables)

    @property
    def encoded(self) -> list[str]:
        """The tables stored as compressed images (``preprocess --store encoded``)."""
        return [m for m, t in self.tables.items() if t.images is not None]

    def decode_images(self, workers: int, augment: bool = False) -> None:
        """Decode encoded image tables in ``workers`` processes (0: in the loader thread);
        ``augment``: training batches get random resized crops and flips."""
        for m in self.encoded:
            self.tables[m].images.workers(workers)
            self.tables[m].augment = augment

    def close(self) -> None:
        """Stop the processes decoding encoded images."""
        for m in self.encoded:
            self.tables[m].images.decoder.close()

    def spec(self, modality: str) -> dict[str, Any]:
        return self.tables[modality].spec

    def subset(self, split: str | None) -> np.ndarray:
        """Item indices of a split (all items for None)."""
        if split is None:
            return np.arange(len(self.ids))
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def has(self, modality: str, items: np.ndarray) -> np.ndarray:
        return np.array([len(self.rows_of[modality][i]) > 0 for i in items], dtype=bool)


def _group_sets(sources: Sequence[str]) -> list[TensorSet]:
    """Open the sources, grouping shards with the same tables into one set each."""
    paths = resolve_sources(list(sources))
    groups: dict[tuple, list] = {}
    for p in paths:
        shard = ShardFile.from_stdin() if p == "-" else ShardFile(p)
        if shard.kind == "model":
            raise BadInput("expected tensor or feature files, got a model checkpoint", where=p)
        groups.setdefault((shard.kind, tuple(shard.tables)), []).append(shard)
    return [TensorSet(g) for g in groups.values()]


def _read_manifest_fields(ts: TensorSet) -> dict[str, dict[str, Any]]:
    path = locate_manifest(ts.source, ts.paths)
    if path is None:
        return {}
    return {it.id: it.fields for it in read_manifest(path, on_error="skip")}


def _item_mapping(ts: TensorSet, first: TensorSet, ids: list[str], index: dict) -> np.ndarray:
    """For each item of ``ts``, its index among the first set's ``ids`` (all must be there)."""
    set_ids = ts.ids() if ts is not first else ids
    mapping = np.array([index.get(i, -1) for i in set_ids], dtype=np.int64)
    if ts is not first and (mapping < 0).any():
        missing = set_ids[int(np.nonzero(mapping < 0)[0][0])]
        raise BadInput(
            f"item {missing!r} is in {ts.paths[0]} but not in {first.paths[0]}",
            hint="pass files that describe the same items",
        )
    return mapping


def _rows_per_item(ts: TensorSet, name: str, mapping: np.ndarray, n_items: int) -> list:
    """Per item (in the joined order), the global indices of its rows in table ``name``."""
    item_of_row = (
        mapping[
            np.concatenate([s.item_index(name) + off for s, off in zip(ts.shards, ts.item_offsets)])
        ]
        if ts.shards
        else np.zeros(0, np.int64)
    )
    order = np.argsort(item_of_row, kind="stable")
    bounds = np.searchsorted(item_of_row[order], np.arange(n_items + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_items)]


def load_dataset(
    sources: Sequence[str], modalities: Sequence[str] | None = None, in_memory: bool | None = None
) -> Dataset:
    """Join tensor shards or feature files into one :class:`Dataset` (by item id).

    ``in_memory`` defaults to True for feature files (small) and False for tensors.
    """
    sets = _group_sets(sources)
    kinds = {ts.kind for ts in sets}
    if len(kinds) > 1:
        raise BadInput(
            "mixed inputs: tensor shards and feature files cannot train together",
            hint="pass either preprocess output (end to end) or extract output (features)",
        )
    kind = kinds.pop()
    ids = sets[0].ids()
    index = {i: k for k, i in enumerate(ids)}
    tables: dict[str, _Table] = {}
    rows_of: dict[str, list[np.ndarray]] = {}
    labels = np.full(len(ids), -1, dtype=np.int64)
    label_names: list[str] = []
    for ts in sets:
        mapping = _item_mapping(ts, sets[0], ids, index)
        if ts.label_names and not label_names:
            label_names = ts.label_names
            labels[mapping] = ts.labels()
        for name in ts.tables:
            if modalities is not None and name not in modalities:
                continue
            if name in tables:
                raise BadInput(
                    f"two inputs both hold a {name} table",
                    where=ts.paths[0],
                    hint="pass one feature file per modality (or one file with all of them)",
                )
            in_mem = in_memory if in_memory is not None else kind == "features"
            tables[name] = _Table(ts, name, in_mem)
            rows_of[name] = _rows_per_item(ts, name, mapping, len(ids))
    if modalities is not None:
        absent = [m for m in modalities if m not in tables]
        if absent:
            raise BadInput(
                f"the data has no {absent[0]} table (it has: {', '.join(tables) or 'none'})",
                where=sets[0].paths[0],
            )
    dims = {m: t.row_shape for m, t in tables.items()}
    if kind == "features":
        specs = {m: (t.spec.get("encoder"), t.spec.get("dim")) for m, t in tables.items()}
        log.debug("feature tables: %s", specs)
        for m, shape in dims.items():
            if len(shape) != 1:
                raise BadInput(f"feature table {m} has rows of shape {list(shape)}, expected [D]")
    manifest = {}
    for ts in sets:
        manifest = _read_manifest_fields(ts)
        if manifest:
            break
    splits = [manifest.get(i, {}).get("split") for i in ids]
    return Dataset(
        ids=ids,
        labels=labels,
        label_names=label_names,
        splits=splits,
        tables=tables,
        rows_of=rows_of,
        kind=kind,
        sources=sets,
        manifest=manifest,
    )
