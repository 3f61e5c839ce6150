"""Training data: items of tensor shards or feature files, sampled into paired batches.

A training example is an *item*: one row of each modality it has (a random caption
among its captions each time). Batches are drawn from a permutation of the items that
depends only on (seed, epoch), and the caption choice only on (seed, epoch, step), so
that:

* a run resumed mid-epoch sees exactly the batches of an uninterrupted run;
* ``torchrun`` with N processes x batch B sees the same global batches as 1 process x
  N*B (rank r takes positions [r*B, (r+1)*B) of each global batch).

Rows are read from memory-mapped shards only when a batch needs them; a background
thread prepares the next batches while the current one trains.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import TensorSet, resolve_sources

log = logging.getLogger("mmcli")

MODALITIES = ("image", "text", "audio")


class _Table:
    """One table (modality) of a shard set, rows fetched by global row index."""

    def __init__(self, ts: TensorSet, name: str, in_memory: bool):
        self.name = name
        self.spec = ts.spec(name)
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

    def fetch(self, rows: np.ndarray) -> torch.Tensor:
        """Rows (global indices) -> a new tensor [len(rows), ...] in the given order."""
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
        from mmcli.data.text import tokenizer_from_spec

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
        return [m for m in MODALITIES if m in self.tables] + [
            m for m in self.tables if m not in MODALITIES
        ]

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
    from mmcli.formats.tensorfile import ShardFile

    paths = resolve_sources(list(sources))
    groups: dict[tuple, list] = {}
    for p in paths:
        shard = ShardFile.from_stdin() if p == "-" else ShardFile(p)
        if shard.kind == "model":
            raise BadInput("expected tensor or feature files, got a model checkpoint", where=p)
        groups.setdefault((shard.kind, tuple(shard.tables)), []).append(shard)
    return [TensorSet(g) for g in groups.values()]


def _read_manifest_fields(ts: TensorSet) -> dict[str, dict[str, Any]]:
    from mmcli.formats.manifest import locate_manifest, read_manifest

    path = locate_manifest(ts.source, ts.paths)
    if path is None:
        return {}
    return {it.id: it.fields for it in read_manifest(path, on_error="skip")}


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
        set_ids = ts.ids() if ts is not sets[0] else ids
        mapping = np.array([index.get(i, -1) for i in set_ids], dtype=np.int64)
        if ts is not sets[0] and (mapping < 0).any():
            missing = set_ids[int(np.nonzero(mapping < 0)[0][0])]
            raise BadInput(
                f"item {missing!r} is in {ts.paths[0]} but not in {sets[0].paths[0]}",
                hint="pass files that describe the same items",
            )
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
            item_of_row = (
                mapping[
                    np.concatenate(
                        [s.item_index(name) + off for s, off in zip(ts.shards, ts.item_offsets)]
                    )
                ]
                if ts.shards
                else np.zeros(0, np.int64)
            )
            order = np.argsort(item_of_row, kind="stable")
            bounds = np.searchsorted(item_of_row[order], np.arange(len(ids) + 1))
            rows_of[name] = [order[bounds[i] : bounds[i + 1]] for i in range(len(ids))]
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


# ------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """A batch of B items. ``data[m]`` holds ``K_m`` blocks of B rows (block k = the k-th
    sampled row of each item; K = captions per item for text, 1 otherwise); rows of items
    without modality m are zeros with ``present[m]`` False."""

    items: torch.Tensor  # int64 [B] dataset item index
    labels: torch.Tensor  # int64 [B]
    data: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]  # bool [B]
    key: int = 0  # a number unique to (seed, epoch, step): seeds any randomness of the loss
    #: int64 [K_m * B]: the dataset row behind each row of ``data[m]`` (-1 = absent); lets a
    #: per-row cache (distill's teacher outputs) be read for exactly the sampled rows
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            items=self.items.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            data={m: d.to(device, non_blocking=non_blocking) for m, d in self.data.items()},
            present={m: p.to(device, non_blocking=non_blocking) for m, p in self.present.items()},
            key=self.key,
            rows=self.rows,  # stays on the CPU: it indexes host-side tables
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.items.pin_memory(),
            self.labels.pin_memory(),
            {m: d.pin_memory() for m, d in self.data.items()},
            {m: p.pin_memory() for m, p in self.present.items()},
            self.key,
            self.rows,
        )

    def __len__(self) -> int:
        return len(self.items)


def _generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    g.manual_seed(seed)
    return g


class BatchSampler:
    """Global batches of a permutation of ``items`` that depends only on (seed, epoch)."""

    def __init__(
        self,
        dataset: Dataset,
        items: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        captions_per_item: int = 1,
        modalities: Sequence[str] | None = None,
        batch_with: str | None = None,
    ):
        self.ds = dataset
        self.items = np.asarray(items, dtype=np.int64)
        self.batch_size = batch_size  # per process
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.captions_per_item = captions_per_item
        self.modalities = list(modalities or dataset.modalities)
        self.units = self._units(batch_with)
        global_batch = batch_size * world
        if drop_last and len(self.items) < global_batch:
            raise BadInput(
                f"batch size {global_batch}"
                + (f" ({batch_size} x {world} processes)" if world > 1 else "")
                + f" is larger than the {len(self.items)} training items",
                hint="lower --batch-size",
            )

    def steps_per_epoch(self) -> int:
        g = self.batch_size * self.world
        n = len(self.items)
        return n // g if self.drop_last else -(-n // g)

    def _units(self, batch_with: str | None) -> list[np.ndarray] | None:
        """With ``batch_with``: items kept next to the item their manifest field names."""
        if not batch_with:
            return None
        if not self.ds.manifest:
            raise BadInput("--batch-with reads a manifest field, and the data has no manifest")
        pos = {self.ds.ids[i]: k for k, i in enumerate(self.items)}
        used = np.zeros(len(self.items), dtype=bool)
        units, linked = [], 0
        for k, i in enumerate(self.items):
            if used[k]:
                continue
            used[k] = True
            other = pos.get(self.ds.manifest.get(self.ds.ids[i], {}).get(batch_with))
            if other is not None and not used[other]:
                used[other] = True
                units.append(np.array([k, other]))
                linked += 1
            else:
                units.append(np.array([k]))
        if not linked:
            raise BadInput(
                f"no training item names another training item in its {batch_with!r} field",
                hint="check --batch-with",
            )
        log.info("batch-with %s: %d pairs of items share their batches", batch_with, linked)
        return units

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.items
        if self.units is not None:
            perm = torch.randperm(len(self.units), generator=_generator(self.seed, epoch)).numpy()
            return self.items[np.concatenate([self.units[u] for u in perm])]
        perm = torch.randperm(len(self.items), generator=_generator(self.seed, epoch)).numpy()
        return self.items[perm]

    def batch_items(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's items, the whole global batch) of ``step`` in ``epoch``."""
        g = self.batch_size * self.world
        order = self._order(epoch)
        glob = order[step * g : (step + 1) * g]
        return glob[self.rank * self.batch_size : (self.rank + 1) * self.batch_size], glob

    def make_batch(self, epoch: int, step: int) -> Batch:
        mine, glob = self.batch_items(epoch, step)
        offset = self.rank * self.batch_size
        data, present, row_ids = {}, {}, {}
        for m in self.modalities:
            k = self.captions_per_item if m == "text" else 1
            # one uniform number per (item position in the global batch, block): rank-independent
            u = torch.rand(
                k, len(glob), generator=_generator(self.seed, epoch, step, zlib.crc32(m.encode()))
            ).numpy()
            u = u[:, offset : offset + len(mine)]
            rows = np.zeros((k, len(mine)), dtype=np.int64)
            has = np.zeros(len(mine), dtype=bool)
            for j, item in enumerate(mine):
                r = self.ds.rows_of[m][item]
                if len(r):
                    has[j] = True
                    rows[:, j] = r[np.minimum((u[:, j] * len(r)).astype(np.int64), len(r) - 1)]
            table = self.ds.tables[m]
            if has.all():
                data[m] = table.fetch(rows.reshape(-1))
            else:
                block = torch.zeros(
                    (k * len(mine), *table.row_shape),
                    dtype=torch.from_numpy(np.empty(0, table.dtype)).dtype,
                )
                sel = np.tile(has, k)
                if sel.any():
                    block[torch.from_numpy(sel)] = table.fetch(rows.reshape(-1)[sel])
                data[m] = block.view(torch.bfloat16) if table.bf16 else block
            present[m] = torch.from_numpy(has)
            row_ids[m] = torch.from_numpy(np.where(np.tile(has, k), rows.reshape(-1), -1))
        if self.ds.negatives is not None and "text" in self.modalities:
            u = torch.rand(len(glob), generator=_generator(self.seed, epoch, step, 7)).numpy()
            u = u[offset : offset + len(mine)]
            length = self.ds.tables["text"].row_shape[0]
            neg = np.zeros((len(mine), length), dtype=np.int32)
            has = np.zeros(len(mine), dtype=bool)
            for j, item in enumerate(mine):
                options = self.ds.negatives[item]
                if len(options):
                    has[j] = True
                    neg[j] = options[min(int(u[j] * len(options)), len(options) - 1)]
            data["text_neg"] = torch.from_numpy(neg).to(data["text"].dtype)
            present["text_neg"] = torch.from_numpy(has)
        items = torch.from_numpy(mine.copy())
        labels = torch.from_numpy(self.ds.labels[mine])
        key = int(_generator(self.seed, epoch, step).initial_seed())
        return Batch(items=items, labels=labels, data=data, present=present, key=key, rows=row_ids)


class Prefetcher:
    """Builds batches in a background thread; records how long the consumer waited."""

    def __init__(
        self,
        sampler: BatchSampler,
        epoch: int,
        start_step: int,
        *,
        stop: int | None = None,
        depth: int = 3,
        pin: bool = False,
    ):
        self.sampler, self.epoch, self.start = sampler, epoch, start_step
        self.stop = (
            sampler.steps_per_epoch() if stop is None else min(stop, sampler.steps_per_epoch())
        )
        self.pin = pin
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self._stop.is_set():
                    return
                b = self.sampler.make_batch(self.epoch, step)
                if self.pin:
                    b = b.pin_memory()
                self.q.put((step, b))
            self.q.put(None)
        except BaseException as e:  # surface loader errors in the training thread
            self.q.put(e)

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        while True:
            t = time.perf_counter()
            got = self.q.get()
            self.wait_seconds += time.perf_counter() - t
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
