"""The candidates of exact search: pass scores that may be in the top k, and the top k
of the candidates once they are re-scored exactly."""

from __future__ import annotations

import numpy as np
import torch

HOST_NUMPY = True  # filter CPU scores with numpy (False: the torch code path GPUs take)


def above(s, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, column, score as float64) of the entries of ``s`` >= ``floor`` per row.

    bfloat16 on CPU: positive bfloat16 values order like their bit patterns read as
    int16, so the test runs on the raw bits (and negative values are below any positive
    floor). The row maxima are checked first: most rows have no entry to report.
    """
    b = s.shape[0]
    if s.device.type != "cpu" or not HOST_NUMPY:
        f = torch.from_numpy(floor).to(s.device, torch.float32)
        qi, ci = torch.nonzero(s.float() >= f[:, None], as_tuple=True)
        vals = s[qi, ci].double().cpu().numpy()
        return qi.cpu().numpy(), ci.cpu().numpy(), vals
    floor = np.where(np.isfinite(floor), floor, -np.inf)
    if s.dtype == torch.bfloat16 and (floor > 0).all():
        bits = s.view(torch.int16).numpy()
        f32 = floor.astype(np.float32)
        f32 = np.where(f32.astype(np.float64) > floor, np.nextafter(f32, np.float32(-np.inf)), f32)
        t = (f32.view(np.int32) >> 16).astype(np.int16)  # truncation: rounds positive values down
        hot = np.flatnonzero(bits.max(1) >= t)
        if len(hot) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        r, c = _nonzero2d(bits[hot] >= t[hot, None])
        qi = hot[r]
        vals = s[torch.from_numpy(qi), torch.from_numpy(c)].double().numpy()
        return qi, c, vals
    x = s.numpy() if s.dtype == torch.float32 else s.float().numpy()
    f = floor.astype(np.float32)
    f = np.where(f.astype(np.float64) > floor, np.nextafter(f, np.float32(-np.inf)), f)
    if b and x.ndim == 2 and not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return _above_columns(x.T, f)
    hot = np.flatnonzero(x.max(1) >= f) if b else np.empty(0, np.int64)
    if len(hot) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    r, c = _nonzero2d(x[hot] >= f[hot, None])
    qi = hot[r]
    return qi, c, x[qi, c].astype(np.float64)


def _above_columns(xt: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`above` for scores laid out rows x queries (``xt`` is ``s.T``, contiguous):
    the test runs in memory order, and the hits come out sorted by query then column."""
    c, qi = _nonzero2d(xt >= f[None, :])
    order = np.argsort(qi, kind="stable")
    qi, c = qi[order], c[order]
    return qi, c, xt[c, qi].astype(np.float64)


def _nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-d mask, many times faster through ``flatnonzero``."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])


def merge_best(best: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The k largest of two [B, *] arrays (rows sorted descending)."""
    k = best.shape[1]
    both = np.concatenate([best, new], axis=1)
    return -np.sort(-both, axis=1)[:, :k]


def merge_sparse(best: np.ndarray, qi: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Merge values for queries ``qi`` (sorted ascending) into ``best``."""
    b = best.shape[0]
    counts = np.bincount(qi, minlength=b)
    width = int(counts.max())
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dense = np.full((b, width), -np.inf)
    dense[qi, np.arange(len(qi)) - start[qi]] = vals
    return merge_best(best, dense)


def top_k(qi: np.ndarray, rows: np.ndarray, scores: np.ndarray, b: int, k: int):
    """Per query: the k best (score desc, row asc) of the candidates, as [b, k] tensors."""
    order = np.lexsort((rows, -scores.astype(np.float64), qi))
    qi, rows, scores = qi[order], rows[order], scores[order]
    counts = np.bincount(qi, minlength=b)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(qi)) - start[qi]
    keep = pos < k
    out_rows = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.full((b, k), -np.inf, dtype=np.float32)
    out_rows[qi[keep], pos[keep]] = rows[keep]
    out_scores[qi[keep], pos[keep]] = scores[keep]
    return torch.from_numpy(out_rows), torch.from_numpy(out_scores)
