"""Exact top-k search over memory-mapped feature shards of any dtype.

    index = ExactIndex.from_features(FeatureSet.open("feats/"), "image")
    result = index.search(queries, k=10)        # queries: float [Q, D]
    result.indices[0], result.scores[0]         # rows of the best 10 for query 0

**What "exact" means.** The score of a query ``q`` (float32) and an index row ``x`` (as
stored: float32, float16 or bfloat16, read exactly) is their dot product computed in
float64 and rounded to float32. Hits are the k best rows by score, descending; equal
scores are ordered by row, ascending (rows are numbered across shards in order). The
result does not depend on the scoring pass, the chunk size, the batch size or the
device.

**How.** The index is scanned chunk by chunk (memory-mapped, never loaded whole) with a
fast *scoring pass*: a float32 matrix product, or a bfloat16 one (AMX / AVX-512 BF16
units: several times faster than float32 on CPUs that have them). Each pass score ``s~``
comes with a proven error bound ``|s - s~| <= e`` (below), so a running k-th best lower
bound ``t`` (``s~ - e`` of k rows seen) discards every row whose upper bound
``s~ + e`` is below ``t``: such a row cannot be in the top k. The few rows left are
re-scored in float64 from the stored vectors and ranked. Memory: one chunk of scores
per query batch, independent of the index size.

The passes and their error bounds are in :mod:`mmcli.search.bounds`; picking the
candidates and ranking them, in :mod:`mmcli.search.candidates`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.search.bounds import (
    ABS_SLACK,
    MARGIN,
    ScoringPass,
    fast_bf16_available,
    gamma,
    lower_bound,
    resolve_scoring,
    score_floor,
    upper_bound,
)
from mmcli.search.candidates import above, merge_best, merge_sparse, top_k
from mmcli.search.numerics import SMALL_WORK, exact_matmul, few_threads

CHUNK_BYTES = 1 << 24  # index rows per chunk: 16 MB of stored data


# --------------------------------------------------------------------------- result


@dataclass
class SearchResult:
    """``indices`` int64 [Q, k] (-1 where the index has fewer rows or a hit was dropped by
    a threshold) and ``scores`` float32 [Q, k] (-inf there), best first."""

    indices: Any
    scores: Any
    candidates: int = 0  # rows re-scored exactly (all queries)

    def hits(self, i: int) -> list[tuple[int, float]]:
        """(row, score) of query ``i``'s hits, best first."""
        rows = self.indices[i].tolist()
        scores = self.scores[i].tolist()
        return [(r, s) for r, s in zip(rows, scores) if r >= 0]


# --------------------------------------------------------------------------- index


class ExactIndex:
    """Exact search over a list of ``[n, D]`` tables (memory-mapped shards, stored dtype)."""

    def __init__(
        self,
        parts: Sequence[Any],
        *,
        chunk_rows: int | None = None,
        items: Any = None,
        row_mask: Any = None,
    ):
        self.parts = [p for p in parts]
        if not self.parts:
            raise BadInput("the index is empty (no feature rows)")
        dims = {int(p.shape[1]) for p in self.parts if p.ndim == 2}
        if len(dims) != 1 or any(p.ndim != 2 for p in self.parts):
            raise BadInput("index shards must be [rows, D] tables of one dimension")
        self.dim = dims.pop()
        dtypes = {p.dtype for p in self.parts}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise BadInput(
                f"index shards must share one float dtype (got {sorted(map(str, dtypes))})"
            )
        self.dtype = dtypes.pop()
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + int(p.shape[0]))
        self.size = self.offsets[-1]
        itemsize = torch.finfo(self.dtype).bits // 8
        self.chunk_rows = int(chunk_rows or max(256, CHUNK_BYTES // (self.dim * itemsize)))
        self._chunks = [
            (i, lo, min(lo + self.chunk_rows, int(p.shape[0])))
            for i, p in enumerate(self.parts)
            for lo in range(0, int(p.shape[0]), self.chunk_rows)
        ]
        self._norms: list[float | None] = [None] * len(self._chunks)
        #: item number of each row, when built from features
        self.items = items
        #: bool [rows]: the rows that may be hits (None: all), e.g. the items of one split
        self.row_mask = (
            None if row_mask is None or np.all(row_mask) else np.asarray(row_mask, dtype=bool)
        )
        self.searchable = self.size if self.row_mask is None else int(self.row_mask.sum())

    @classmethod
    def from_features(cls, features, table: str, **kwargs: Any) -> ExactIndex:
        """An index over ``features``' ``table`` (a :class:`~mmcli.formats.features.FeatureSet`)."""
        parts, items = [], []
        for data, it in features.iter_shards(table):
            parts.append(data)
            items.append(it)
        kwargs.setdefault("row_mask", features.row_mask(table))
        return cls(parts, items=torch.cat(items) if items else None, **kwargs)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def chunk_norm(self, c: int, x=None) -> float:
        """Upper bound of the row norms of chunk ``c`` (computed once, from ``x`` when the
        caller holds the chunk already)."""
        if self._norms[c] is None:
            i, lo, hi = self._chunks[c]
            x = self.parts[i][lo:hi] if x is None else x
            n = (
                float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).max())
                if hi > lo
                else 0.0
            )
            if not math.isfinite(n):
                raise BadInput(
                    f"the index holds NaN or infinite values (rows {self.offsets[i] + lo} to {self.offsets[i] + hi - 1})",
                    hint="re-extract the features (float16 overflows without --normalize)",
                )
            self._norms[c] = n * (1 + 2 * gamma(self.dim)) * MARGIN + ABS_SLACK
        return self._norms[c]

    def chunk_norms(self) -> list[float]:
        """The norm bound of every chunk (computed on first use; this forces it now)."""
        return [self.chunk_norm(c) for c in range(len(self._chunks))]

    # ----------------------------------------------------------------------- search
    def search(
        self,
        queries: Any,
        k: int,
        *,
        scoring: str = "auto",
        batch_size: int = 1024,
        device: Any = "cpu",
        threshold: float | None = None,
    ) -> SearchResult:
        """The exact top ``k`` rows for each query (float [Q, D]); see the module docstring."""
        q = torch.as_tensor(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadInput(
                f"queries have {q.shape[-1] if q.ndim else 0} dimensions, the index {self.dim}",
                hint="encode queries with the model that produced the index features",
            )
        if k < 1:
            raise BadInput("k must be at least 1")
        k = min(k, max(1, self.searchable))  # never more hits than candidates (-k 10**30)
        q = q.to("cpu", torch.float32)
        if not bool(torch.isfinite(q).all()):
            raise BadInput("a query holds NaN or infinite values")
        mode = resolve_scoring(scoring, device)
        n = q.shape[0]
        k_eff = min(k, self.searchable)
        indices = torch.full((n, k), -1, dtype=torch.int64)
        scores = torch.full((n, k), float("-inf"), dtype=torch.float32)
        total = 0
        for b0 in range(0, n, batch_size):
            rows, vals, cand = self._search_batch(
                q[b0 : b0 + batch_size], k_eff, mode, torch.device(device)
            )
            indices[b0 : b0 + rows.shape[0], :k_eff] = rows
            scores[b0 : b0 + rows.shape[0], :k_eff] = vals
            total += cand
        if threshold is not None:
            drop = scores < threshold
            indices[drop] = -1
            scores[drop] = float("-inf")
        return SearchResult(indices=indices, scores=scores, candidates=total)

    def _search_batch(self, q, k: int, mode: str, dev) -> tuple[Any, Any, int]:
        q64 = q.double()
        scoring = ScoringPass.prepare(q, q64, mode, self.dim, dev)
        best = np.full((q.shape[0], k), -np.inf)  # lower bounds of the k best rows seen, descending
        found = []
        small = dev.type == "cpu" and q.shape[0] * self.size * self.dim < SMALL_WORK
        with exact_matmul(), few_threads(small), torch.inference_mode():
            for c in range(len(self._chunks)):
                best, hits = self._scan_chunk(c, scoring, k, best)
                if hits is not None:
                    found.append(hits)
        return self._rank_candidates(q64, found, best, scoring.rel, k)

    def _scan_chunk(self, c: int, scoring: ScoringPass, k: int, best: np.ndarray):
        """Score chunk ``c``: (the updated k-th best lower bounds, its candidates (query,
        row, pass score, error bound) or None)."""
        i, lo, hi = self._chunks[c]
        if hi <= lo:
            return best, None
        allowed = None
        if self.row_mask is not None:
            allowed = self.row_mask[self.offsets[i] + lo : self.offsets[i] + hi]
            if not allowed.any():
                return best, None
        x = self.parts[i][lo:hi]
        s, a = scoring.scores(x, self.chunk_norm(c, x))  # a: (B,) error bound of the scores
        rel = scoring.rel
        if allowed is not None:  # rows that may not be hits score -inf
            s[:, torch.from_numpy(~allowed).to(s.device)] = float("-inf")
        seeded = not np.isfinite(best[:, -1]).all()
        if seeded:
            # fewer than k rows seen yet: this chunk's k best set the bound
            top = torch.topk(s.float(), min(k, hi - lo), dim=1).values.cpu().numpy()
            best = merge_best(best, lower_bound(top.astype(np.float64), a, rel))
        tau = best[:, -1]  # k-th best lower bound so far
        qi, ci, sv = above(s, score_floor(tau, a, rel))
        if allowed is not None and len(qi):
            ok = allowed[ci]
            qi, ci, sv = qi[ok], ci[ok], sv[ok]
        if not len(qi):
            return best, None
        if not seeded:  # (a seeded chunk's best are merged already)
            best = merge_sparse(best, qi, lower_bound(sv, a[qi], rel))
        return best, (qi, ci + self.offsets[i] + lo, sv, a[qi])

    def _rank_candidates(self, q64, found: list, best: np.ndarray, rel: float, k: int):
        """Re-score exactly the candidates whose upper bound reaches the k-th best lower
        bound, and rank them: (rows [B, k], scores [B, k], candidates re-scored)."""
        b = q64.shape[0]
        if not found:
            return torch.empty(b, 0, dtype=torch.int64), torch.empty(b, 0), 0
        qi, rows, sv, av = (np.concatenate(part) for part in zip(*found))
        keep = upper_bound(sv, av, rel) >= best[qi, -1]
        qi, rows = qi[keep], rows[keep]
        with few_threads(len(rows) * self.dim < SMALL_WORK):
            exact = self.rescore(q64, qi, rows)
        out_rows, out_scores = top_k(qi, rows, exact, b, k)
        return out_rows, out_scores, int(len(rows))

    def rescore(self, q64, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32(float64 dot product) of queries ``q64[qi]`` with index rows ``rows``."""
        out = np.empty(len(rows), dtype=np.float32)
        shard = np.searchsorted(np.asarray(self.offsets), rows, "right") - 1
        for i in np.unique(shard):
            sel = np.flatnonzero(shard == i)
            local = torch.from_numpy(rows[sel] - self.offsets[i])
            x = self.parts[i].index_select(0, local).double()  # (m, D)
            qq = q64[torch.from_numpy(qi[sel])]
            out[sel] = (qq * x).sum(1).float().numpy()
        return out

    def row_location(self, row: int) -> tuple[int, int]:
        """(shard, local row) of global row ``row``."""
        i = int(np.searchsorted(np.asarray(self.offsets), row, "right") - 1)
        return i, row - self.offsets[i]

    def vectors(self, rows: Sequence[int]):
        """float32 [len(rows), D] copies of index rows."""
        out = torch.empty(len(rows), self.dim)
        for j, r in enumerate(rows):
            i, local = self.row_location(int(r))
            out[j] = self.parts[i][local].float()
        return out


# ------------------------------------------------------------------------ reference


def exact_search_reference(queries, rows, k: int):
    """Reference implementation (tests, benchmarks): full float64 scores, full sort."""
    s = (torch.as_tensor(queries).double() @ torch.as_tensor(rows).double().T).float().numpy()
    n = s.shape[1]
    idx = np.arange(n)
    out_rows = np.empty((s.shape[0], min(k, n)), dtype=np.int64)
    out_scores = np.empty((s.shape[0], min(k, n)), dtype=np.float32)
    for i in range(s.shape[0]):
        order = np.lexsort((idx, -s[i].astype(np.float64)))[:k]
        out_rows[i], out_scores[i] = order, s[i, order]
    return out_rows, out_scores


__all__ = [
    "ExactIndex",
    "SearchResult",
    "exact_search_reference",
    "fast_bf16_available",
    "resolve_scoring",
]
