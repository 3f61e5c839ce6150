"""Exact, tie-aware ranks of the positives of retrieval queries, in both directions at once.

Queries of one modality (say text) retrieve candidates of another (say image). The
positives of a query are the candidate rows of the same item (the ``.item`` columns), so
an image with five captions is the single positive of each caption, and each of its
five captions is a positive of the image.

**Scores** are float32 dot products of the (float32) features, computed by matrix
products in blocks; every score is computed exactly once and every rank below is
computed from those values.

**Tie rule.** Candidates are ordered by score, descending; equal scores are ordered by
candidate index, ascending, where candidates are numbered in item order, then row order
within an item (for files written by ``mmcli extract`` that is the row order). The
rank of a positive ``p`` is therefore

    rank(p) = 1 + #{c : s_c > s_p} + #{c : s_c == s_p and index(c) < index(p)}

counted exactly over all candidates: metrics never depend on the order ``topk`` returns
tied entries in.

**Memory** stays O(block): the score matrix is computed block by block (rows of one
group of items x candidates of another group), never in full. Blocks on the diagonal
(query and candidate rows of the same items) are computed first; they hold every
positive, so the score of each positive is known before the other blocks are counted
against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcli.evaluate.counting import (
    diagonal_counts,
    host_scores,
    mask_positives,
    off_diagonal_counts,
    positive_scores,
)
from mmcli.progress import ProgressFactory, null_progress
from mmcli.search.numerics import SMALL_WORK, exact_matmul, few_threads

BLOCK_ELEMS = 1 << 23  # scores per block: 8M float32 = 32 MB


@dataclass
class PositiveRanks:
    """The 1-based ranks of the positives of each query (CSR layout).

    Only queries with at least one positive appear. ``ranks[offsets[i]:offsets[i+1]]``
    are the ranks of query ``i``'s positives, ascending; ``query_rows[i]`` is its row in
    the query table. With ``pair_ranks(exact_up_to=K)``, ranks above K other than the
    first hit's are lower bounds (still above K and above the first hit).
    """

    offsets: np.ndarray  # int64 [n_queries + 1]
    ranks: np.ndarray  # int64 [n_positives]
    query_rows: np.ndarray  # int64 [n_queries]
    n_candidates: int
    n_without_positive: int = 0

    @property
    def n_queries(self) -> int:
        return len(self.offsets) - 1

    def first(self) -> np.ndarray:
        """Rank of the best-ranked positive of each query (its first hit)."""
        return self.ranks[self.offsets[:-1]]

    def counts(self) -> np.ndarray:
        """Number of positives R of each query."""
        return np.diff(self.offsets)


def _item_groups(
    ia: np.ndarray, ib: np.ndarray, block_elems: int
) -> list[tuple[int, int, int, int]]:
    """Split sorted item columns into item ranges: [(a0, a1, b0, b1)] row ranges per group."""
    na, nb = len(ia), len(ib)
    n_groups = max(1, math.ceil(math.sqrt(na * nb / max(block_elems, 1))))
    items = np.union1d(ia, ib)
    if len(items) == 0:
        return [(0, na, 0, nb)]
    # cut items where the running share of rows (both tables) crosses k / n_groups
    a_end = np.searchsorted(ia, items, "right")
    b_end = np.searchsorted(ib, items, "right")
    share = a_end / max(na, 1) + b_end / max(nb, 1)
    cuts = np.searchsorted(share, np.arange(1, n_groups) * (2.0 / n_groups), "left")
    cuts = np.unique(np.clip(cuts, 0, len(items) - 1))
    groups, a0, b0 = [], 0, 0
    for c in list(cuts) + [len(items) - 1]:
        a1, b1 = int(a_end[c]), int(b_end[c])
        if a1 > a0 or b1 > b0:
            groups.append((a0, a1, b0, b1))
        a0, b0 = a1, b1
    return groups or [(0, na, 0, nb)]


@dataclass
class _Side:
    """One table sorted by item, and the state of its rows as queries: the positives of
    sorted row ``r`` are the other table's sorted rows ``lo[r] : lo[r] + npos[r]``."""

    perm: np.ndarray  # int64 [n]: the original row of each sorted row
    items: np.ndarray  # int64 [n]: the item of each sorted row (ascending)
    x: Any  # float32 [n, D] sorted rows, on the device
    lo: np.ndarray | None = None  # int64 [n]
    npos: np.ndarray | None = None  # int64 [n]
    v: np.ndarray | None = None  # float32 [n, levels]: score of each positive (+inf pads)
    c: np.ndarray | None = None  # int64 [n, levels]: candidates ranked ahead of each positive
    first: np.ndarray | None = None  # bool [n, levels]: the first hit's level (with a cap)


def _sorted_side(x, items, dev) -> _Side:
    items = np.asarray(torch.as_tensor(items).cpu(), dtype=np.int64)
    perm = np.argsort(items, kind="stable")
    rows = torch.as_tensor(x)[torch.from_numpy(perm)].to(dev, torch.float32).contiguous()
    return _Side(perm=perm, items=items[perm], x=rows)


def _link(side: _Side, other: _Side) -> None:
    """The positives of ``side``'s rows among ``other``'s, and room for their ranks."""
    side.lo = np.searchsorted(other.items, side.items, "left")
    side.npos = np.searchsorted(other.items, side.items, "right") - side.lo
    levels = int(side.npos.max(initial=0))
    side.v = np.full((len(side.items), levels), np.inf, dtype=np.float32)
    side.c = np.zeros((len(side.items), levels), dtype=np.int64)


def pair_ranks(
    a,
    a_items,
    b,
    b_items,
    *,
    device: Any = "cpu",
    block_elems: int = BLOCK_ELEMS,
    exact_up_to: int | None = None,
    progress: ProgressFactory = null_progress,
) -> tuple[PositiveRanks, PositiveRanks]:
    """Exact ranks of the positives for queries ``a`` over candidates ``b`` and back.

    ``a`` [Na, D] and ``b`` [Nb, D] are feature tables (any float dtype, any device),
    ``a_items`` / ``b_items`` the item number of each row (rows of the same item are
    each other's positives). Returns ``(a -> b, b -> a)`` :class:`PositiveRanks`.
    Memory: O(block_elems) scores at a time.

    ``exact_up_to=K``: the first hit of every query is ranked exactly, its other
    positives only while their rank is at most max(K, positives per query): past that
    they stop being counted (their rank stays a lower bound above K). That is all
    recall@k, the first-hit ranks, mAP@R and nDCG@10 need, and it saves most of the
    counting for queries with several positives. None: every rank exact.
    """
    dev = torch.device(device)
    sa, sb = _sorted_side(a, a_items, dev), _sorted_side(b, b_items, dev)
    _link(sa, sb)
    _link(sb, sa)
    na, nb = len(sa.items), len(sb.items)
    levels = max(sa.v.shape[1], sb.v.shape[1])
    cap = None if exact_up_to is None else max(int(exact_up_to), levels)
    groups = _item_groups(sa.items, sb.items, block_elems)
    order = [(g, g) for g in range(len(groups))]  # diagonal blocks first: they hold the positives
    order += [(g, h) for g in range(len(groups)) for h in range(len(groups)) if g != h]
    small = dev.type == "cpu" and na * nb * sa.x.shape[1] < SMALL_WORK
    with (
        exact_matmul(),
        few_threads(small),
        torch.inference_mode(),
        progress("scoring", total=len(order), unit="blocks") as bar,
    ):
        for g, h in order:
            rows, cols = slice(*groups[g][:2]), slice(*groups[h][2:])
            if rows.stop > rows.start and cols.stop > cols.start:
                s = host_scores(sa.x[rows] @ sb.x[cols].T)  # (rows, cols) float32
                if g == h:
                    _count_diagonal(s, sa, sb, rows, cols)
                else:
                    _count_off_diagonal(s, sa, sb, rows, cols, cap, rows_first=g < h)
            bar.update(1)
    if sa.first is not None:  # capped positives: lower bounds, but never before the first hit
        for side in (sa, sb):
            _raise_capped(side, cap)
    return _collect(sa.c, sa.npos, sa.perm, nb), _collect(sb.c, sb.npos, sb.perm, na)


def _count_diagonal(s, sa: _Side, sb: _Side, rows: slice, cols: slice) -> None:
    """The block of the positives (rows and columns of the same items): score the
    positives, mask them, count what ranks ahead of each."""
    pa, pb = sa.lo[rows] - cols.start, sb.lo[cols] - rows.start
    ta = positive_scores(s, pa, sa.npos[rows], rows=True)
    tb = positive_scores(s, pb, sb.npos[cols], rows=False)
    sa.v[rows, : ta.shape[1]], sb.v[cols, : tb.shape[1]] = ta, tb
    mask_positives(s, pa, sa.npos[rows])
    diagonal_counts(s, ta, pa, sa.npos[rows], sa.c[rows], rows=True)
    diagonal_counts(s, tb, pb, sb.npos[cols], sb.c[cols], rows=False)


def _count_off_diagonal(
    s, sa: _Side, sb: _Side, rows: slice, cols: slice, cap: int | None, rows_first: bool
) -> None:
    """A block away from the diagonal. The positives of group g's rows lie in group g:
    candidates of an earlier group come first in the tie order, so equal scores count
    for them (``rows_first``: the block's rows come before the column queries' positives)."""
    ta, tb = sa.v[rows], sb.v[cols]
    if cap is not None:  # positives already ranked past the cap: no more counting
        if sa.first is None:
            sa.first, sb.first = _first_levels(sa.v), _first_levels(sb.v)
        ta = _uncapped(ta, sa.c[rows], sa.first[rows], cap)
        tb = _uncapped(tb, sb.c[cols], sb.first[cols], cap)
    off_diagonal_counts(s, ta, sa.c[rows], tb, sb.c[cols], rows_first=rows_first)


def _uncapped(v: np.ndarray, c: np.ndarray, first: np.ndarray, cap: int) -> np.ndarray:
    """The positive scores still counted: +inf (never reached) for those past the cap,
    except the first hit."""
    return np.where((c >= cap) & ~first, np.inf, v).astype(np.float32)


def _raise_capped(side: _Side, cap: int) -> None:
    """Capped ranks: at least their count, and after the first hit."""
    ahead_of_first = (side.c * side.first).sum(1, keepdims=True)
    dead = (side.c >= cap) & ~side.first
    np.copyto(side.c, np.maximum(side.c, ahead_of_first + 1), where=dead)


def _first_levels(v: np.ndarray) -> np.ndarray:
    """bool [queries, levels]: the level of each query's best-ranked positive (highest
    score; the earliest on a tie, as the tie rule ranks it first)."""
    out = np.zeros(v.shape, dtype=bool)
    if v.shape[1]:
        finite = np.where(v < np.inf, v, -np.inf)
        out[np.arange(len(v)), np.argmax(finite, axis=1)] = True
    return out


def _collect(
    counts: np.ndarray, npos: np.ndarray, perm: np.ndarray, n_candidates: int
) -> PositiveRanks:
    has = npos > 0
    ranks = np.where(
        np.arange(counts.shape[1])[None, :] < npos[:, None], counts + 1, np.iinfo(np.int64).max
    )
    ranks = np.sort(ranks[has], axis=1)
    n = npos[has]
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    flat = ranks[np.arange(ranks.shape[1])[None, :] < n[:, None]]
    return PositiveRanks(
        offsets=offsets,
        ranks=flat.astype(np.int64),
        query_rows=perm[has].astype(np.int64),
        n_candidates=n_candidates,
        n_without_positive=int((~has).sum()),
    )
