"""Retrieval metrics from exact, tie-aware ranks, in both directions at once.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.errors import BadInput
from mmcli.progress import ProgressFactory, null_progress
from mmcli.search.numerics import SMALL_WORK, exact_matmul, few_threads

DEFAULT_KS = (1, 5, 10)
NDCG_AT = 10
BLOCK_ELEMS = 1 << 23  # scores per block: 8M float32 = 32 MB
SLICE_ELEMS = 1 << 18  # scores computed and counted at a time (1 MB: stays in cache)
HOST_NUMPY = True  # count CPU blocks with numpy (False: the torch code path GPUs take)


# ----------------------------------------------------------------------------- ranks


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


PICK_SHARE = 0.05  # when at most this share of a slice's scores reach a query's lowest
# threshold, those entries are picked out and compared per level (else: full passes)


def _is_cpu(s) -> bool:
    return isinstance(s, np.ndarray)


def _count(mask, axis: int):
    """Count True along ``axis`` (numpy: a uint16 sum of the bytes is the fastest way)."""
    if isinstance(mask, np.ndarray):
        dtype = np.uint16 if mask.shape[axis] < 65536 else np.int64
        return mask.view(np.uint8).sum(axis, dtype=dtype).astype(np.int64)
    import torch

    return mask.sum(axis, dtype=torch.int64).cpu().numpy()


def _cmp(s, t, ge: bool):
    return s >= t if ge else s > t


def _count_ahead(s, thr: np.ndarray, rows: bool, mode: str) -> dict[str, np.ndarray]:
    """Candidates scoring above each threshold, per query and level.

    ``s``: a score slice; ``rows``: queries are its rows (candidates along axis 1), else
    its columns; ``thr``: float32 [queries, levels] (+inf pads a missing level);
    ``mode``: ``gt`` (count s > t), ``ge`` (s >= t) or ``both``. Returns {mode: int64
    [queries, levels]}.

    Several levels: most candidates score below every positive of a query, so the
    entries at or above each query's lowest threshold are found in one pass and, when
    they are few, compared per level (else one comparison pass per level).
    """
    axis = 1 if rows else 0
    nq, levels = thr.shape
    modes = ("gt", "ge") if mode == "both" else (mode,)
    out = {m: np.zeros((nq, levels), dtype=np.int64) for m in modes}
    if levels == 0 or nq == 0 or s.shape[axis] == 0:
        return out
    if not _is_cpu(s):
        return _count_ahead_torch(s, thr, rows, modes, out)
    if levels == 1 and mode != "both":  # one comparison pass
        t = thr[:, 0]
        out[mode][:, 0] = _count(_cmp(s, t[:, None] if rows else t[None, :], mode == "ge"), axis)
        return out
    tmin = thr.min(1)
    gate = s >= (tmin[:, None] if rows else tmin[None, :])
    if levels == 1:  # the gate is the ">=" count
        out["ge"][:, 0] = _count(gate, axis)
        modes = tuple(m for m in modes if m != "ge")
        if not modes:
            return out
    flat = np.flatnonzero(gate)
    if len(flat) <= PICK_SHARE * gate.size:
        r, c = np.divmod(flat, s.shape[1])
        vals = s[r, c]
        q = r if rows else c
        for name in modes:
            for m in range(levels):
                hit = _cmp(vals, thr[q, m], name == "ge")
                out[name][:, m] = np.bincount(q[hit], minlength=nq)
        return out
    for name in modes:
        for m in range(levels):
            t = thr[:, m]
            out[name][:, m] = _count(
                _cmp(s, t[:, None] if rows else t[None, :], name == "ge"), axis
            )
    return out


def _count_ahead_torch(s, thr: np.ndarray, rows: bool, modes: tuple[str, ...], out):
    """:func:`_count_ahead` with torch ops (scores on a GPU): plain comparison passes."""
    import torch

    axis = 1 if rows else 0
    thr_t = torch.from_numpy(thr).to(s.device)
    for name in modes:
        for m in range(thr.shape[1]):
            t = thr_t[:, m]
            out[name][:, m] = _count(
                _cmp(s, t[:, None] if rows else t[None, :], name == "ge"), axis
            )
    return out


def _gather(s, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if _is_cpu(s):
        return s[rows, cols]
    import torch

    return s[torch.from_numpy(rows).to(s.device), torch.from_numpy(cols).to(s.device)].cpu().numpy()


def _positive_scores(s, pos0: np.ndarray, npos: np.ndarray, rows: bool) -> np.ndarray:
    """float32 [queries, levels]: the scores of each query's positives in a diagonal
    block (``pos0``: block-local index of its first positive, ``npos``: how many; +inf
    pads). ``rows``: the queries are the block's rows, else its columns."""
    levels = int(npos.max(initial=0))
    thr = np.full((len(npos), levels), np.inf, dtype=np.float32)
    for m in range(levels):
        q = np.flatnonzero(npos > m)
        p = pos0[q] + m
        thr[q, m] = _gather(s, q, p) if rows else _gather(s, p, q)
    return thr


def _mask_positives(s, pos0: np.ndarray, npos: np.ndarray) -> None:
    """Set the positive entries of a diagonal block (given per row) to -inf."""
    r = np.repeat(np.arange(len(npos)), npos)
    c = np.repeat(pos0, npos) + (np.arange(len(r)) - np.repeat(np.cumsum(npos) - npos, npos))
    if _is_cpu(s):
        s[r, c] = -np.inf
    else:
        import torch

        s[torch.from_numpy(r).to(s.device), torch.from_numpy(c).to(s.device)] = float("-inf")


def _diagonal_counts(s, thr: np.ndarray, pos0: np.ndarray, npos: np.ndarray, c, rows: bool) -> None:
    """Count the candidates ahead of each positive in a diagonal block whose positive
    entries are masked (-inf): the other candidates (ties count when they come first),
    then the query's other positives, from their scores ``thr``."""
    nq, levels = thr.shape
    if levels == 0:
        return
    counts = {"gt": np.zeros((nq, levels), np.int64), "ge": np.zeros((nq, levels), np.int64)}
    step = _slice_rows(s.shape[1])
    for r0 in range(0, s.shape[0], step):
        sl = s[r0 : r0 + step]
        r1 = r0 + sl.shape[0]
        part = _count_ahead(sl, thr[r0:r1] if rows else thr, rows, "both")
        for name in counts:
            if rows:
                counts[name][r0:r1] += part[name]
            else:
                counts[name] += part[name]
    c[:, :levels] += counts["gt"]
    for q, m in zip(*np.nonzero((counts["ge"] > counts["gt"]) & (thr < np.inf))):
        p = pos0[q] + m  # equal scores count when they come before the positive
        line = s[q, :p] if rows else s[:p, q]
        c[q, m] += int((line == thr[q, m]).sum())
    valid = np.arange(levels)[None, :] < npos[:, None]
    for m in range(levels):  # the query's other positives ranked ahead of positive m
        t = thr[:, m : m + 1]
        ahead = (thr > t) | ((thr == t) & (np.arange(levels)[None, :] < m))
        c[:, m] += (ahead & valid).sum(1) * valid[:, m]


def _off_diagonal(s, va, ca, vb, cb, rows_first: bool) -> None:
    """Count the candidates ahead of each positive in a block away from the diagonal.

    ``va``/``ca``: scores of the positives / counts of the row queries; ``vb``/``cb``: of
    the column queries. ``rows_first``: the block's rows come before the positives of the
    column queries (so ties count for the column queries and not for the row queries).
    """
    la, lb = _levels_in_use(va), _levels_in_use(vb)
    tb = np.ascontiguousarray(vb[:, :lb])
    mode_a, mode_b = ("gt", "ge") if rows_first else ("ge", "gt")
    step = _slice_rows(s.shape[1])
    for r0 in range(0, s.shape[0], step):
        sl = s[r0 : r0 + step]
        r1 = r0 + sl.shape[0]
        if la:
            ta = np.ascontiguousarray(va[r0:r1, :la])
            ca[r0:r1, :la] += _count_ahead(sl, ta, True, mode_a)[mode_a]
        if lb:
            cb[:, :lb] += _count_ahead(sl, tb, False, mode_b)[mode_b]


def _levels_in_use(v: np.ndarray) -> int:
    """1 + the last level with a finite threshold for some query (0: none)."""
    used = np.flatnonzero((v < np.inf).any(0))
    return int(used[-1]) + 1 if len(used) else 0


def _host(s):
    """CPU scores as numpy (faster to count); other devices stay torch."""
    return s.numpy() if s.device.type == "cpu" and HOST_NUMPY else s


def _slice_rows(cols: int) -> int:
    """Rows per counted slice: about SLICE_ELEMS scores (a few hundred KB, in cache)."""
    return max(16, min(4096, SLICE_ELEMS // max(cols, 1)))


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
    import torch

    dev = torch.device(device)
    ai = np.asarray(torch.as_tensor(a_items).cpu(), dtype=np.int64)
    bi = np.asarray(torch.as_tensor(b_items).cpu(), dtype=np.int64)
    perm_a = np.argsort(ai, kind="stable")
    perm_b = np.argsort(bi, kind="stable")
    ia, ib = ai[perm_a], bi[perm_b]
    A = torch.as_tensor(a)[torch.from_numpy(perm_a)].to(dev, torch.float32).contiguous()
    B = torch.as_tensor(b)[torch.from_numpy(perm_b)].to(dev, torch.float32).contiguous()
    na, nb = len(ia), len(ib)

    # the positives of each (sorted) row: a contiguous range of sorted rows of the other table
    lo_b, hi_b = np.searchsorted(ib, ia, "left"), np.searchsorted(ib, ia, "right")
    lo_a, hi_a = np.searchsorted(ia, ib, "left"), np.searchsorted(ia, ib, "right")
    npos_a, npos_b = hi_b - lo_b, hi_a - lo_a
    ma, mb = int(npos_a.max(initial=0)), int(npos_b.max(initial=0))
    va = np.full((na, ma), np.inf, dtype=np.float32)  # the score of each positive of each a row
    vb = np.full((nb, mb), np.inf, dtype=np.float32)
    ca = np.zeros((na, ma), dtype=np.int64)  # candidates ranked ahead of each positive
    cb = np.zeros((nb, mb), dtype=np.int64)

    cap = None if exact_up_to is None else max(int(exact_up_to), ma, mb)
    first_a = first_b = None  # the first-hit level of each query, known after the diagonal
    groups = _item_groups(ia, ib, block_elems)
    order = [(g, g) for g in range(len(groups))]  # diagonal blocks first: they hold the positives
    order += [(g, h) for g in range(len(groups)) for h in range(len(groups)) if g != h]
    small = dev.type == "cpu" and na * nb * A.shape[1] < SMALL_WORK
    with (
        exact_matmul(),
        few_threads(small),
        torch.inference_mode(),
        progress("scoring", total=len(order), unit="blocks") as bar,
    ):
        for g, h in order:
            a0, a1, _, _ = groups[g]
            _, _, b0, b1 = groups[h]
            if a1 > a0 and b1 > b0 and g == h:  # the positives' block: score, mask, count
                s = _host(A[a0:a1] @ B[b0:b1].T)  # (a1-a0, b1-b0) float32
                pa, pb = lo_b[a0:a1] - b0, lo_a[b0:b1] - a0
                ta = _positive_scores(s, pa, npos_a[a0:a1], rows=True)
                tb = _positive_scores(s, pb, npos_b[b0:b1], rows=False)
                va[a0:a1, : ta.shape[1]], vb[b0:b1, : tb.shape[1]] = ta, tb
                _mask_positives(s, pa, npos_a[a0:a1])
                _diagonal_counts(s, ta, pa, npos_a[a0:a1], ca[a0:a1], rows=True)
                _diagonal_counts(s, tb, pb, npos_b[b0:b1], cb[b0:b1], rows=False)
            elif a1 > a0 and b1 > b0:
                # the positives of group g's rows lie in group g: candidates of an earlier
                # group (h < g) come first in the tie order, so equal scores count for them
                s = _host(A[a0:a1] @ B[b0:b1].T)
                ta, tb = va[a0:a1], vb[b0:b1]
                if cap is not None:  # positives already ranked past the cap: no more counting
                    if first_a is None:
                        first_a, first_b = _first_levels(va), _first_levels(vb)
                    ta = np.where((ca[a0:a1] >= cap) & ~first_a[a0:a1], np.inf, ta).astype(
                        np.float32
                    )
                    tb = np.where((cb[b0:b1] >= cap) & ~first_b[b0:b1], np.inf, tb).astype(
                        np.float32
                    )
                _off_diagonal(s, ta, ca[a0:a1], tb, cb[b0:b1], rows_first=g < h)
            bar.update(1)
    if first_a is not None:  # capped positives: lower bounds, but never before the first hit
        for counts, first in ((ca, first_a), (cb, first_b)):
            ahead_of_first = (counts * first).sum(1, keepdims=True)
            dead = (counts >= cap) & ~first
            np.copyto(counts, np.maximum(counts, ahead_of_first + 1), where=dead)
    return _collect(ca, npos_a, perm_a, nb), _collect(cb, npos_b, perm_b, na)


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


# ---------------------------------------------------------------------------- metrics


def retrieval_metrics(r: PositiveRanks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Metrics of one direction from the ranks of the positives.

    - ``recall@k``: share of queries with a positive in their top k (a query with several
      positives is a hit when any of them is);
    - ``mean_rank`` / ``median_rank`` / ``mrr``: of the first hit (best-ranked positive);
    - ``map@r``: mAP@R, the mean average precision within the top R (R = the query's
      number of positives): (1/R) sum_{i: rank_i <= R} i / rank_i; with one positive it
      equals recall@1;
    - ``ndcg@10``: sum_{rank_i <= 10} 1/log2(1 + rank_i) / sum_{j <= min(R, 10)} 1/log2(1 + j).
    """
    if r.n_queries == 0:
        raise BadInput("no query has a positive (no item has rows in both tables)")
    first = r.first().astype(np.float64)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float((first <= k).mean())
    out["mean_rank"] = float(first.mean())
    out["median_rank"] = float(np.median(first))
    out["mrr"] = float((1.0 / first).mean())
    n = r.counts()
    q = np.repeat(np.arange(r.n_queries), n)
    i = np.arange(len(r.ranks)) - r.offsets[:-1][q] + 1  # 1-based position among positives
    rank = r.ranks.astype(np.float64)
    prec = i / rank
    within_r = rank <= n[q]
    out["map@r"] = float((np.bincount(q, prec * within_r, r.n_queries) / n).mean())
    gain = np.where(rank <= NDCG_AT, 1.0 / np.log2(1.0 + rank), 0.0)
    ideal_terms = 1.0 / np.log2(2.0 + np.arange(NDCG_AT))
    ideal = np.cumsum(ideal_terms)[np.minimum(n, NDCG_AT) - 1]
    out[f"ndcg@{NDCG_AT}"] = float((np.bincount(q, gain, r.n_queries) / ideal).mean())
    return out


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """``"1,5,10"`` -> [1, 5, 10] (sorted, unique, positive)."""
    if not isinstance(text, str):
        values = list(text)
    else:
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise BadInput(f"--k expects integers like 1,5,10, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BadInput(f"--k expects positive integers like 1,5,10, got {text!r}")
    return sorted(set(values))


def direction_keys(query: str, target: str) -> tuple[str, str]:
    """Key prefixes of the two directions (CLIP_benchmark names).

    ``query -> target`` is ``<target>_retrieval`` (text -> image: ``image_retrieval``) and
    ``target -> query`` is ``<query>_retrieval``.
    """
    return f"{target}_retrieval", f"{query}_retrieval"


def evaluate_retrieval(
    features,
    query: str,
    target: str,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    device: Any = "cpu",
    block_elems: int = BLOCK_ELEMS,
    progress: ProgressFactory = null_progress,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Retrieval metrics of a :class:`~mmcli.formats.features.FeatureSet`, both directions.

    Returns ``(metrics, info)``: metrics keyed ``<target>_retrieval_<metric>`` (query ->
    target) and ``<query>_retrieval_<metric>`` (target -> query); info counts queries,
    candidates and queries without a positive per direction.
    """
    import torch

    if query == target:
        raise BadInput(f"--query and --target are both {query}", hint="pick two different tables")
    for t in (query, target):
        features.require(t, hint="extract features for both modalities, or pick --query/--target")
    dq, dt = features.dim(query), features.dim(target)
    if dq != dt:
        raise BadInput(
            f"the {query} features have {dq} dimensions and the {target} features {dt}",
            where=", ".join(features.paths[:2]),
            hint="compare features of one joint space (mmcli extract --model CKPT)",
        )
    xq, iq = features.table(query)
    xt, it = features.table(target)
    for name, x in ((query, xq), (target, xt)):
        # a sum is finite when every value is (a huge but finite one may overflow it: recheck)
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise BadInput(
                f"the {name} features hold NaN or infinite values", where=features.paths[0]
            )
    ks = list(ks)
    for n_cand, what in ((xt.shape[0], target), (xq.shape[0], query)):
        if ks and max(ks) > n_cand:
            raise BadInput(
                f"k={max(ks)} is larger than the {n_cand} {what} candidates",
                hint="lower --k",
            )
    fwd, bwd = pair_ranks(
        xq,
        iq,
        xt,
        it,
        device=device,
        block_elems=block_elems,
        progress=progress,
        exact_up_to=max([*ks, NDCG_AT]),
    )
    if fwd.n_queries == 0:
        raise BadInput(
            f"no item has both {query} and {target} rows, so no query has a positive",
            where=", ".join(features.paths[:2]),
            hint="pass features of the same items (eval joins files by item id)",
        )
    kf, kb = direction_keys(query, target)
    metrics: dict[str, float] = {}
    for prefix, r in ((kf, fwd), (kb, bwd)):
        for key, value in retrieval_metrics(r, ks).items():
            metrics[f"{prefix}_{key}"] = value
    info = {
        kf: _info(fwd, query, target),
        kb: _info(bwd, target, query),
    }
    return metrics, info


def _info(r: PositiveRanks, query: str, target: str) -> dict[str, Any]:
    return {
        "query": query,
        "target": target,
        "queries": r.n_queries,
        "candidates": r.n_candidates,
        "positives": int(len(r.ranks)),
        "queries_without_positive": r.n_without_positive,
    }
