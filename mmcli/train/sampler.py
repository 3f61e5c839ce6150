"""Batches of paired items, reproducible to the step.

Batches are drawn from a permutation of the items that depends only on (seed, epoch), and
the caption choice only on (seed, epoch, step), so that:

* a run resumed mid-epoch sees exactly the batches of an uninterrupted run;
* ``torchrun`` with N processes x batch B sees the same global batches as 1 process x
  N*B (rank r takes positions [r*B, (r+1)*B) of each global batch).

:meth:`BatchSampler.batches` is what the training loop runs in a background thread
(:class:`mmcli.runtime.Prefetch`) while the current batch trains.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.train.data import Dataset

log = logging.getLogger("mmcli")


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

    @classmethod
    def cat(cls, batches: Sequence[Batch]) -> Batch:
        """One batch of all the items of ``batches``, in order, blocks kept (block k holds the
        k-th row of every item); the key is the first batch's. What the gradient cache of
        ``--accum-steps`` computes its loss over."""
        sizes = [len(b) for b in batches]
        first = batches[0]

        def joined(get):
            return cat_blocks([get(b) for b in batches], sizes)

        return cls(
            items=joined(lambda b: b.items),
            labels=joined(lambda b: b.labels),
            data={m: joined(lambda b, m=m: b.data[m]) for m in first.data},
            present={m: joined(lambda b, m=m: b.present[m]) for m in first.present},
            key=first.key,
            rows={m: joined(lambda b, m=m: b.rows[m]) for m in first.rows},
        )


def cat_blocks(parts: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate tensors of K blocks of ``sizes[i]`` rows each into K blocks of
    ``sum(sizes)`` rows (block k of the result: block k of every part, in order)."""
    k = parts[0].shape[0] // sizes[0]
    rest = parts[0].shape[1:]
    blocks = [p.reshape(k, n, *rest) for p, n in zip(parts, sizes, strict=True)]
    return torch.cat(blocks, dim=1).reshape(k * sum(sizes), *rest)


def split_blocks(x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The inverse of :func:`cat_blocks`."""
    total = sum(sizes)
    k = x.shape[0] // total
    parts = x.reshape(k, total, *x.shape[1:]).split(list(sizes), dim=1)
    return [p.reshape(k * n, *x.shape[1:]) for p, n in zip(parts, sizes, strict=True)]


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
            seeds = self._augment_seeds(m, epoch, step, k, len(glob), offset, len(mine))
            fetch = table.fetch if seeds is None else partial(table.fetch, seeds=seeds)
            if has.all():
                data[m] = fetch(rows.reshape(-1))
            else:
                block = torch.zeros(
                    (k * len(mine), *table.row_shape),
                    dtype=torch.from_numpy(np.empty(0, table.dtype)).dtype,
                )
                sel = np.tile(has, k)
                if sel.any():
                    if seeds is not None:
                        fetch = partial(table.fetch, seeds=[x for x, on in zip(seeds, sel) if on])
                    block[torch.from_numpy(sel)] = fetch(rows.reshape(-1)[sel])
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

    def _augment_seeds(self, m, epoch, step, k, n_glob, offset, n_mine) -> list[int] | None:
        """With ``--augment`` (an encoded image table): a seed per row of the batch, from
        (seed, epoch, step, the row's place in the global batch): rank-independent and
        the same on ``--resume``."""
        if not getattr(self.ds.tables[m], "augment", False):
            return None
        base = int(
            _generator(self.seed, epoch, step, zlib.crc32(b"augment:" + m.encode())).initial_seed()
        )
        return [base * 1_000_003 + b * n_glob + offset + j for b in range(k) for j in range(n_mine)]

    def batches(
        self, epoch: int, start: int, stop: int | None = None, *, pin: bool = False
    ) -> Iterator[tuple[int, Batch]]:
        """(step, batch) for steps ``start`` .. ``stop`` (default: the epoch's end) of ``epoch``."""
        end = self.steps_per_epoch() if stop is None else min(stop, self.steps_per_epoch())
        for step in range(start, end):
            batch = self.make_batch(epoch, step)
            yield step, batch.pin_memory() if pin else batch
