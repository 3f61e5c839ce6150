"""Counting, in one block of scores, the candidates ranked ahead of each positive.

The kernels of :func:`mmcli.evaluate.ranks.pair_ranks` (see its module for the tie rule).
A block is a float32 score matrix: rows are queries of one table, columns candidates of
the other, or the reverse (``rows=False``: the queries are the columns). CPU blocks are
counted with numpy, other devices with torch ops.
"""

from __future__ import annotations

import numpy as np
import torch

SLICE_ELEMS = 1 << 18  # scores computed and counted at a time (1 MB: stays in cache)
HOST_NUMPY = True  # count CPU blocks with numpy (False: the torch code path GPUs take)

PICK_SHARE = 0.05  # when at most this share of a slice's scores reach a query's lowest
# threshold, those entries are picked out and compared per level (else: full passes)


def _is_cpu(s) -> bool:
    return isinstance(s, np.ndarray)


def _count(mask, axis: int):
    """Count True along ``axis`` (numpy: a uint16 sum of the bytes is the fastest way)."""
    if isinstance(mask, np.ndarray):
        dtype = np.uint16 if mask.shape[axis] < 65536 else np.int64
        return mask.view(np.uint8).sum(axis, dtype=dtype).astype(np.int64)
    return mask.sum(axis, dtype=torch.int64).cpu().numpy()


def _cmp(s, t, ge: bool):
    return s >= t if ge else s > t


def count_ahead(s, thr: np.ndarray, rows: bool, mode: str) -> dict[str, np.ndarray]:
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
    """:func:`count_ahead` with torch ops (scores on a GPU): plain comparison passes."""
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
    return s[torch.from_numpy(rows).to(s.device), torch.from_numpy(cols).to(s.device)].cpu().numpy()


def positive_scores(s, pos0: np.ndarray, npos: np.ndarray, rows: bool) -> np.ndarray:
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


def mask_positives(s, pos0: np.ndarray, npos: np.ndarray) -> None:
    """Set the positive entries of a diagonal block (given per row) to -inf."""
    r = np.repeat(np.arange(len(npos)), npos)
    c = np.repeat(pos0, npos) + (np.arange(len(r)) - np.repeat(np.cumsum(npos) - npos, npos))
    if _is_cpu(s):
        s[r, c] = -np.inf
    else:
        s[torch.from_numpy(r).to(s.device), torch.from_numpy(c).to(s.device)] = float("-inf")


def diagonal_counts(s, thr: np.ndarray, pos0: np.ndarray, npos: np.ndarray, c, rows: bool) -> None:
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
        part = count_ahead(sl, thr[r0:r1] if rows else thr, rows, "both")
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


def off_diagonal_counts(s, va, ca, vb, cb, rows_first: bool) -> None:
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
            ca[r0:r1, :la] += count_ahead(sl, ta, True, mode_a)[mode_a]
        if lb:
            cb[:, :lb] += count_ahead(sl, tb, False, mode_b)[mode_b]


def _levels_in_use(v: np.ndarray) -> int:
    """1 + the last level with a finite threshold for some query (0: none)."""
    used = np.flatnonzero((v < np.inf).any(0))
    return int(used[-1]) + 1 if len(used) else 0


def host_scores(s):
    """CPU scores as numpy (faster to count); other devices stay torch."""
    return s.numpy() if s.device.type == "cpu" and HOST_NUMPY else s


def _slice_rows(cols: int) -> int:
    """Rows per counted slice: about SLICE_ELEMS scores (a few hundred KB, in cache)."""
    return max(16, min(4096, SLICE_ELEMS // max(cols, 1)))
