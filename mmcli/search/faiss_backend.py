"""Approximate search with FAISS (``pip install "mmcli[faiss]"``) for very large indices.

    index = FaissIndex.open(features, "image", kind="ivf")   # builds once, then reuses
    result = index.search(queries, k=10)

The FAISS index is built on first use and saved next to the features (``--faiss-dir`` to
choose): ``faiss-<kind>-<table>.index`` with ``faiss-<kind>-<table>.json`` beside it,
recording the FAISS recipe and the name, size and modification time of every source
shard. When the features change (or the recipe does), the next use rebuilds it.

``kind`` is ``ivf`` (an inverted file: ``IVF<nlist>,Flat``, trained by k-means on a
sample; ``nprobe`` lists searched per query), ``hnsw`` (a graph: ``HNSW32``,
``ef_search`` candidates explored), ``ivfpq`` (compressed, for indices that do not fit
in memory even as float16: ``OPQ<m>,IVF<nlist>,PQ<m>``, m = dim / 8 bytes a vector, so
512 dims take 64 bytes + 8 for the id instead of 1,024 in float16) or any FAISS
index-factory string (``IVF4096,SQ8``, ``HNSW32,Flat``...). Inner product is the metric.

A newly built index checks itself: 256 stored rows (seeded) as queries, its top 10
(through the exact re-scoring, as ``retrieve`` returns them, each query's own row left
out) against exact search. The recall@10 and the index's bytes per vector are logged and
kept in the JSON beside it (``check``).

FAISS only proposes candidates: ``candidates`` x k of them per query are re-scored
exactly from the stored vectors (the exact backend's scores and tie rule), so the
scores are exact and only the recall is approximate (``benchmarks/bench_search.py``
reports it against exact search).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput, MissingDependency
from mmcli.formats.atomic import atomic_path, atomic_write_bytes
from mmcli.progress import ProgressFactory, null_progress
from mmcli.search.candidates import top_k
from mmcli.search.exact import ExactIndex, SearchResult

log = logging.getLogger("mmcli")

KINDS = ("ivf", "hnsw", "ivfpq")
META_VERSION = 1


def import_faiss():
    """``faiss``, or :class:`MissingDependency` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise MissingDependency("faiss-cpu", extra="faiss", purpose="--backend faiss") from None
    return faiss


@dataclass
class FaissParams:
    kind: str = "ivf"  # ivf | hnsw | a faiss index-factory string
    nlist: int | None = None  # ivf lists (default: about sqrt(rows), a power of two)
    nprobe: int | None = None  # ivf lists searched per query (default: nlist / 16, >= 8)
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    candidates: int | None = None  # k x candidates re-scored exactly per query (2; ivfpq 10)
    train_size: int | None = None  # ivf k-means sample (default: 50 x nlist)
    seed: int = 0

    def factory(self, rows: int, dim: int) -> str:
        if self.kind == "ivf":
            return f"IVF{self.nlist_for(rows)},Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        if self.kind == "ivfpq":
            m = pq_bytes(dim)
            return f"OPQ{m},IVF{self.nlist_for(rows)},PQ{m}"
        return self.kind

    def rescored(self) -> int:
        """Candidates re-scored exactly per hit: more for codes that lose precision."""
        if self.candidates is not None:
            return int(self.candidates)
        return 10 if self.kind == "ivfpq" or ",PQ" in self.kind else 2

    def nlist_for(self, rows: int) -> int:
        if self.nlist:
            return int(self.nlist)
        return int(max(1, min(65536, 2 ** round(math.log2(max(math.sqrt(max(rows, 1)), 1))))))


def pq_bytes(dim: int) -> int:
    """Sub-quantizers (one byte each) for ``dim``: dim / 8, or the largest divisor of dim
    below it."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _sources_signature(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"name": Path(p).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class FaissIndex:
    """A FAISS index over one feature table, plus exact re-scoring of its candidates."""

    def __init__(
        self, index: Any, exact: ExactIndex, params: FaissParams, path: Path | None, built: bool
    ):
        self.index = index
        self.exact = exact
        self.params = params
        self.path = path
        self.built = built  # True when this call built it (False: loaded from disk)
        self.check: dict[str, Any] | None = None  # the build's recall / size check

    @classmethod
    def open(
        cls,
        features,
        table: str,
        params: FaissParams | None = None,
        *,
        index_dir: str | os.PathLike | None = None,
        rebuild: bool = False,
        progress: ProgressFactory = null_progress,
    ) -> FaissIndex:
        """Load the saved index of ``features``' ``table`` or build (and save) it."""
        faiss = import_faiss()
        params = params or FaissParams()
        exact = ExactIndex.from_features(features, table)
        paths = features.tensors(table).paths
        if "-" in paths:
            raise BadInput("--backend faiss needs feature files on disk (not stdin)")
        folder = Path(index_dir) if index_dir else Path(paths[0]).parent
        factory = params.factory(exact.size, exact.dim)
        kind = params.kind if params.kind in KINDS else _slug(factory)
        path = folder / f"faiss-{kind}-{table}.index"
        meta = {
            "version": META_VERSION,
            "factory": factory,
            "metric": "inner_product",
            "table": table,
            "dim": exact.dim,
            "rows": exact.size,
            "sources": _sources_signature(paths),
            "train_size": params.train_size,
            "ef_construction": params.ef_construction if "HNSW" in factory else None,
            "seed": params.seed,
        }
        meta_path = path.with_suffix(".json")
        if not rebuild and path.is_file() and meta_path.is_file():
            try:
                saved = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = None
            check = saved.pop("check", None) if isinstance(saved, dict) else None
            if saved == meta:
                index = faiss.read_index(str(path))
                log.info("faiss: using %s (%s, %d rows)", path, factory, exact.size)
                index = cls(index, exact, params, path, built=False)
                index.check = check
                index._configure()
                return index
            log.info(
                "faiss: the features or the recipe changed since %s was built; rebuilding", path
            )
        index = _build(faiss, exact, factory, params, progress)
        out = cls(index, exact, params, path, built=True)
        out._configure()
        try:
            with atomic_path(path) as tmp:
                faiss.write_index(index, str(tmp))
            out.check = meta["check"] = out.self_check(path.stat().st_size)
            atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
            log.info("faiss: built %s (%s, %d rows)", path, factory, exact.size)
        except OSError as e:
            log.warning("faiss: cannot save the index to %s (%s); it is rebuilt next time", path, e)
            out.path = None
            out.check = out.check or out.self_check(None)
        return out

    def self_check(self, size: int | None, queries: int = 256, k: int = 10) -> dict[str, Any]:
        """Recall@k against exact search on stored rows as queries (their own row left
        out), and the index's size per vector (see the module docstring)."""
        n = self.exact.size
        rows = np.sort(np.random.default_rng(0).choice(n, size=min(queries, n), replace=False))
        q = torch.from_numpy(_gather(self.exact, rows))
        kk = min(k + 1, n)
        truth = self.exact.search(q, kk).indices.numpy()
        found = self.search(q, kk).indices.numpy()
        hits = [
            len((set(t) - {r}) & (set(f) - {r})) / max(1, len(set(t) - {r}))
            for r, t, f in zip(rows, truth.tolist(), found.tolist())
        ]
        check = {
            "queries": len(rows),
            f"recall@{k}": round(float(np.mean(hits)), 4),
            "bytes_per_vector": round(size / n, 1) if size else None,
            "float16_bytes_per_vector": 2 * self.exact.dim,
        }
        log.info(
            "faiss: recall@%d %.3f against exact search on %d stored rows; %s bytes per vector "
            "(float16 storage: %d)",
            k, check[f"recall@{k}"], len(rows), check["bytes_per_vector"], 2 * self.exact.dim,
        )  # fmt: skip
        return check

    def _configure(self) -> None:
        faiss = import_faiss()
        ivf = _ivf(faiss, self.index)
        if ivf is not None:
            ivf.nprobe = int(self.params.nprobe or max(8, ivf.nlist // 16))
        hnsw = _hnsw(faiss, self.index)
        if hnsw is not None:
            hnsw.hnsw.efSearch = int(self.params.ef_search)

    def search(self, queries: Any, k: int, *, threshold: float | None = None) -> SearchResult:
        """Top ``k`` per query among FAISS's candidates, scored exactly (see module doc)."""
        q = torch.as_tensor(queries, dtype=torch.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.exact.dim:
            raise BadInput(
                f"queries have {q.shape[1]} dimensions, the index {self.exact.dim}",
                hint="encode queries with the model that produced the index features",
            )
        if k < 1:
            raise BadInput("k must be at least 1")
        k = min(k, max(1, self.exact.searchable))  # never more hits than candidates
        b = q.shape[0]
        mask = self.exact.row_mask  # rows that may be hits (a split), or None
        spread = 1 if mask is None else -(-self.exact.size // max(self.exact.searchable, 1))
        kk = min(max(k, k * self.params.rescored()) * spread, self.exact.size)
        hnsw = _hnsw(import_faiss(), self.index)
        if hnsw is not None and hnsw.hnsw.efSearch < kk:
            hnsw.hnsw.efSearch = kk
        _, labels = self.index.search(np.ascontiguousarray(q.numpy()), kk)
        qi = np.repeat(np.arange(b), kk)
        rows = labels.reshape(-1).astype(np.int64)
        ok = rows >= 0
        if mask is not None:
            ok &= mask[np.maximum(rows, 0)]
        qi, rows = qi[ok], rows[ok]
        scores = self.exact.rescore(q.double(), qi, rows)
        k_eff = min(k, self.exact.searchable)
        out_rows, out_scores = top_k(qi, rows, scores, b, k_eff)
        indices = torch.full((b, k), -1, dtype=torch.int64)
        vals = torch.full((b, k), float("-inf"))
        indices[:, :k_eff], vals[:, :k_eff] = out_rows, out_scores
        if threshold is not None:
            drop = vals < threshold
            indices[drop] = -1
            vals[drop] = float("-inf")
        return SearchResult(indices=indices, scores=vals, candidates=int(len(rows)))


def _ivf(faiss, index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(faiss, index):
    return index if hasattr(index, "hnsw") else None


def _faiss_reason(e: Exception) -> str:
    """The readable end of a faiss C++ error ("Error in <signature> at file:line: reason")."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rsplit(": ", 1)[-1][:160] if " at " in text else text[:160]


def _build(faiss, exact: ExactIndex, factory: str, params: FaissParams, progress: ProgressFactory):
    try:
        index = faiss.index_factory(exact.dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadInput(
            f"faiss cannot build {factory!r} ({_faiss_reason(e)})",
            hint="use --faiss-index ivf, hnsw or a valid faiss factory string",
        ) from None
    if hasattr(index, "hnsw"):
        index.hnsw.efConstruction = int(params.ef_construction)
    if not index.is_trained:
        ivf = _ivf(faiss, index)
        nlist = ivf.nlist if ivf is not None else 256
        n_train = min(exact.size, int(params.train_size or 50 * nlist))
        rng = np.random.default_rng(params.seed)
        rows = np.sort(rng.choice(exact.size, size=n_train, replace=False))
        sample = _gather(exact, rows)
        if ivf is not None and exact.size < nlist:
            raise BadInput(
                f"the index has {exact.size} rows, fewer than the {nlist} IVF lists",
                hint="give a factory string with fewer lists (--faiss-index IVF64,Flat) or use --backend exact",
            )
        log.info("faiss: training %s on %d rows", factory, n_train)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    with progress("faiss index", total=exact.size, unit="rows") as bar:
        for i, lo, hi in exact._chunks:
            x = exact.parts[i][lo:hi].float().numpy()
            index.add(np.ascontiguousarray(x))
            bar.update(hi - lo)
    return index


def _gather(exact: ExactIndex, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), exact.dim), dtype=np.float32)
    shard = np.searchsorted(np.asarray(exact.offsets), rows, "right") - 1
    for i in np.unique(shard):
        sel = np.flatnonzero(shard == i)
        local = torch.from_numpy(rows[sel] - exact.offsets[i])
        out[sel] = exact.parts[i].index_select(0, local).float().numpy()
    return out
