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

**Error bounds** (u = 2^-24, the float32 unit roundoff; gamma_D = D u / (1 - D u)):

* float32 pass: ``|s - fl(q.x)| <= gamma_D |q| |x|`` (any summation order, FMA or not).
* bfloat16 pass, ``q^ = bf16(q)``, ``x^ = bf16(x)`` (``x^ = x`` for bfloat16 storage),
  products accumulated in float32 and the result rounded to bfloat16 (relative error
  2^-8):  ``|s - s~| <= |q - q^| |x| + |q^| |x - x^| + gamma_D |q^| |x^| + 2^-8 |s~| / (1 - 2^-8)``,
  with ``|x - x^| <= 2^-8 |x|``. ``|x|`` is bounded per chunk by the largest row norm.

Both bounds are widened by a small relative margin (for the float32 arithmetic of the
bounds themselves and the final rounding to float32). The bfloat16 kernel's float32
accumulation is checked once per process by a probe; where it fails, the float32 pass is
used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.errors import BadInput
from mmcli.search.numerics import SMALL_WORK, exact_matmul, few_threads

log = logging.getLogger("mmcli")

U32 = 2.0**-24
U_BF16 = 2.0**-8
CHUNK_BYTES = 1 << 24  # index rows per chunk: 16 MB of stored data
MARGIN = 1.001  # widening of the bounds for the float32 arithmetic that computes them
REL_SLACK = 2.0**-21  # room for the final float32 rounding of exact scores (ties)
ABS_SLACK = 1e-30  # subnormals flushed to zero by bf16 kernels
HOST_NUMPY = True  # filter CPU scores with numpy (False: the torch code path GPUs take)


def _gamma(d: int) -> float:
    return d * U32 / (1.0 - d * U32)


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


# ------------------------------------------------------------------- scoring passes


_BF16_OK: dict[str, bool] = {}


def fast_bf16_available(device: Any = "cpu") -> bool:
    """Whether a bfloat16 pass is worth it here: CPUs with AMX or AVX-512 BF16, and the
    kernel accumulates in float32 (checked by a probe once per process)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cpu":
        return False
    key = "cpu"
    if key not in _BF16_OK:
        cap = torch.backends.cpu.get_cpu_capability()
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            hw = " amx_bf16" in flags or " avx512_bf16" in flags
        except OSError:  # not Linux: trust torch's report
            hw = cap.startswith("AVX512") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        _BF16_OK[key] = bool(hw) and _bf16_probe()
    return _BF16_OK[key]


def _bf16_probe() -> bool:
    """Check that bf16 matrix products accumulate in float32: 1 + 511 * 2^-9 is 1.998 in
    float32 accumulation but stays 1.0 if each partial sum were rounded to bfloat16."""
    import torch

    d = 512
    x = torch.full((64, d), 2.0**-9)
    x[:, 0] = 1.0
    q = torch.ones(8, d)
    out = (q.bfloat16() @ x.bfloat16().T).float()
    exact = 1.0 + (d - 1) * 2.0**-9
    ok = bool(((out - exact).abs() <= exact * (U_BF16 + _gamma(d)) * 1.01).all())
    if not ok:
        log.warning("bfloat16 matrix products do not accumulate in float32 here; using float32")
    return ok


def resolve_scoring(scoring: str, device: Any = "cpu") -> str:
    if scoring not in ("auto", "fp32", "bf16"):
        raise BadInput(f"unknown scoring pass {scoring!r}", hint="use auto, fp32 or bf16")
    if scoring == "auto":
        return "bf16" if fast_bf16_available(device) else "fp32"
    return scoring


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
        import torch

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
        import torch

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
        import torch

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
            self._norms[c] = n * (1 + 2 * _gamma(self.dim)) * MARGIN + ABS_SLACK
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
        import torch

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
        import torch

        b = q.shape[0]
        q64 = q.double()
        qn = torch.linalg.vector_norm(q64, dim=1)  # (B,)
        if mode == "bf16":
            qp = q.to(torch.bfloat16)
            dq = torch.linalg.vector_norm(q64 - qp.double(), dim=1)
            qhn = torch.linalg.vector_norm(qp.double(), dim=1)
            rel = U_BF16 / (1 - U_BF16) * MARGIN + REL_SLACK
        else:
            qp = q
            rel = REL_SLACK
        qp = qp.to(dev)
        gamma = _gamma(self.dim)
        best = np.full((b, k), -np.inf)  # lower bounds of the k best rows seen, descending
        found_q, found_r, found_s, found_a = [], [], [], []
        small = dev.type == "cpu" and b * self.size * self.dim < SMALL_WORK
        with exact_matmul(), few_threads(small), torch.inference_mode():
            for c, (i, lo, hi) in enumerate(self._chunks):
                if hi <= lo:
                    continue
                allowed = None
                if self.row_mask is not None:
                    allowed = self.row_mask[self.offsets[i] + lo : self.offsets[i] + hi]
                    if not allowed.any():
                        continue
                x = self.parts[i][lo:hi]
                xn = self.chunk_norm(c, x)
                if mode == "bf16":
                    xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
                    dx = 0.0 if x.dtype == torch.bfloat16 else U_BF16 * xn
                    xhn = xn * (1 + U_BF16)
                    s = qp @ xb.to(dev).T  # (B, n) bfloat16
                    a = (dq * xn + qhn * dx + gamma * qhn * xhn) * MARGIN + ABS_SLACK
                else:
                    xf = x if x.dtype == torch.float32 else x.float()
                    s = qp @ xf.to(dev).T  # (B, n) float32
                    a = gamma * qn * xn * MARGIN + ABS_SLACK
                a = a.numpy()  # (B,) absolute error bound of this chunk's scores
                if allowed is not None:  # rows that may not be hits score -inf
                    s[:, torch.from_numpy(~allowed).to(s.device)] = float("-inf")
                seeded = not np.isfinite(best[:, -1]).all()
                if seeded:
                    # fewer than k rows seen yet: this chunk's k best set the bound
                    top = torch.topk(s.float(), min(k, hi - lo), dim=1).values.cpu().numpy()
                    best = _merge(best, _lower(top.astype(np.float64), a, rel))
                tau = best[:, -1]  # k-th best lower bound so far
                qi, ci, sv = _above(s, _score_floor(tau, a, rel))
                if allowed is not None and len(qi):
                    ok = allowed[ci]
                    qi, ci, sv = qi[ok], ci[ok], sv[ok]
                if len(qi):
                    if not seeded:  # (a seeded chunk's best are merged already)
                        best = _merge_sparse(best, qi, _lower(sv, a[qi], rel))
                    found_q.append(qi)
                    found_r.append(ci + self.offsets[i] + lo)
                    found_s.append(sv)
                    found_a.append(a[qi])
        if not found_q:
            return torch.empty(b, 0, dtype=torch.int64), torch.empty(b, 0), 0
        qi = np.concatenate(found_q)
        rows = np.concatenate(found_r)
        sv = np.concatenate(found_s)
        av = np.concatenate(found_a)
        keep = _upper(sv, av, rel) >= best[qi, -1]
        qi, rows = qi[keep], rows[keep]
        with few_threads(len(rows) * self.dim < SMALL_WORK):
            exact = self.rescore(q64, qi, rows)
        out_rows, out_scores = _top_k(qi, rows, exact, b, k)
        return out_rows, out_scores, int(len(rows))

    def rescore(self, q64, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32(float64 dot product) of queries ``q64[qi]`` with index rows ``rows``."""
        import torch

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
        import torch

        out = torch.empty(len(rows), self.dim)
        for j, r in enumerate(rows):
            i, local = self.row_location(int(r))
            out[j] = self.parts[i][local].float()
        return out


# -------------------------------------------------------------------------- helpers


def _lower(s: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    """Lower bound of the exact score of pass scores ``s`` (error a + rel |s|)."""
    a = a if np.ndim(a) == 0 or np.ndim(s) == 1 else a[:, None]
    return s - a - rel * np.abs(s)


def _upper(s: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    a = a if np.ndim(a) == 0 or np.ndim(s) == 1 else a[:, None]
    return s + a + rel * np.abs(s)


def _score_floor(tau: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    """The smallest pass score whose upper bound reaches ``tau`` (per query), rounded
    down a little so that float rounding can only add candidates, never lose one."""
    y = tau - a  # s + rel |s| >= y
    s = np.where(y >= 0, y / (1 + rel), y / (1 - rel))
    return s - np.abs(s) * 1e-6 - 1e-30


def _above(s, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, column, score as float64) of the entries of ``s`` >= ``floor`` per row.

    bfloat16 on CPU: positive bfloat16 values order like their bit patterns read as
    int16, so the test runs on the raw bits (and negative values are below any positive
    floor). The row maxima are checked first: most rows have no entry to report.
    """
    import torch

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
    hot = np.flatnonzero(x.max(1) >= f) if b else np.empty(0, np.int64)
    if len(hot) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    r, c = _nonzero2d(x[hot] >= f[hot, None])
    qi = hot[r]
    return qi, c, x[qi, c].astype(np.float64)


def _nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-d mask, many times faster through ``flatnonzero``."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])


def _merge(best: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The k largest of two [B, *] arrays (rows sorted descending)."""
    k = best.shape[1]
    both = np.concatenate([best, new], axis=1)
    return -np.sort(-both, axis=1)[:, :k]


def _merge_sparse(best: np.ndarray, qi: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Merge values for queries ``qi`` (sorted ascending) into ``best``."""
    b = best.shape[0]
    counts = np.bincount(qi, minlength=b)
    width = int(counts.max())
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dense = np.full((b, width), -np.inf)
    dense[qi, np.arange(len(qi)) - start[qi]] = vals
    return _merge(best, dense)


def _top_k(qi: np.ndarray, rows: np.ndarray, scores: np.ndarray, b: int, k: int):
    """Per query: the k best (score desc, row asc) of the candidates, as [b, k] tensors."""
    import torch

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


def exact_search_reference(queries, rows, k: int):
    """Reference implementation (tests, benchmarks): full float64 scores, full sort."""
    import torch

    s = (torch.as_tensor(queries).double() @ torch.as_tensor(rows).double().T).float().numpy()
    n = s.shape[1]
    idx = np.arange(n)
    out_rows = np.empty((s.shape[0], min(k, n)), dtype=np.int64)
    out_scores = np.empty((s.shape[0], min(k, n)), dtype=np.float32)
    for i in range(s.shape[0]):
        order = np.lexsort((idx, -s[i].astype(np.float64)))[:k]
        out_rows[i], out_scores[i] = order, s[i, order]
    return out_rows, out_scores


__all__ = ["ExactIndex", "SearchResult", "exact_search_reference", "fast_bf16_available"]
