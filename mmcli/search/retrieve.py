"""``mmcli retrieve`` as a library: an index over a feature table, queries in, hits out.

    r = Retriever(RetrieveConfig(index=["feats/"], target="image", model="model.safetensors"))
    for line in r.search([Query("text", "a red circle", {"text": "a red circle"})]):
        print(line)   # {"query": {...}, "hits": [{"rank": 1, "id": ..., "score": ..., "item": {...}}]}

The index (memory-mapped shards, or a FAISS index built once and saved) is opened once
and serves every query batch. A hit carries its rank, item id, exact score, the row
within the item when the table has several rows per item (captions), and the item's
manifest fields with image / audio / video paths resolved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput, MmcliError
from mmcli.formats.features import FeatureSet
from mmcli.modalities import MODALITIES
from mmcli.progress import ProgressFactory, null_progress
from mmcli.search.exact import ExactIndex, resolve_scoring
from mmcli.search.faiss_backend import FaissIndex, FaissParams
from mmcli.search.model_check import model_for
from mmcli.search.queries import Query, QueryEncoder
from mmcli.search.recommend import Recommender

log = logging.getLogger("mmcli")

SEARCH_BATCH = 1024  # query vectors scored together by the exact backend


@dataclass
class RetrieveConfig:
    index: list[str] = field(default_factory=list)
    target: str | None = None  # table searched (default: image, else the first table)
    query_table: str | None = (
        None  # table of --id / --queries rows (default: the target / the only one)
    )
    k: int = 10
    threshold: float | None = None
    backend: str = "exact"  # exact | faiss
    scoring: str = "auto"  # exact backend's first pass: auto | fp32 | bf16
    faiss_index: str = "ivf"
    faiss_dir: str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    rescore: int | None = None  # faiss: candidates re-scored exactly per hit (2; ivfpq 10)
    rebuild: bool = False
    model: str | None = None
    weights: str | None = None  # the weights file of --model open_clip:ARCH
    precision: str = "fp32"  # query encoding: bf16 on the CPU casts the model to bfloat16
    device: str = "cpu"
    batch_size: int = 256
    with_fields: bool = True
    split: str | None = None  # search only the items of this manifest split
    exclude_self: bool = True  # an --id query's own item is not among its hits
    aggregate: str = "mean"  # like queries: mean | max of the similarities to the liked items
    diversity: float = 0.0  # like queries: MMR's lambda (0: the plain ranking)
    include_seen: bool = False  # like queries: the liked items may be hits
    #: encode queries with a model other than the one the index records (a warning, not exit 2)
    allow_model_mismatch: bool = False


def default_target(tables: list[str]) -> str:
    for name in ("image", "video", "audio", "text", "fused"):
        if name in tables:
            return name
    return tables[0]


class Retriever:
    def __init__(self, cfg: RetrieveConfig, progress: ProgressFactory = null_progress):
        if not isinstance(cfg.k, int) or isinstance(cfg.k, bool) or cfg.k < 1:
            raise BadInput(f"-k must be a whole number >= 1, got {cfg.k!r}")
        if cfg.threshold is not None and math.isnan(cfg.threshold):
            raise BadInput("--threshold must be a number, got nan")
        if cfg.backend == "exact":  # faiss-only options would be silently ignored
            faiss_only = (("--nprobe", cfg.nprobe), ("--ef-search", cfg.ef_search),
                          ("--rescore", cfg.rescore), ("--faiss-dir", cfg.faiss_dir),
                          ("--rebuild-index", cfg.rebuild))  # fmt: skip
            used = [flag for flag, value in faiss_only if value]
            if used:
                raise BadInput(f"{used[0]} applies to --backend faiss", hint="add --backend faiss")
        self.cfg = cfg
        self.features = FeatureSet.open(cfg.index)
        if cfg.split:
            self.features.select_split(cfg.split)
        self.target = cfg.target or default_target(self.features.tables)
        self.features.require(self.target, hint="pick the table to search with --target")
        self.features.dim(self.target)
        if cfg.backend == "exact":
            self.index = ExactIndex.from_features(self.features, self.target)
            self.scoring = resolve_scoring(cfg.scoring, cfg.device)
            self.items = self.index.items
        elif cfg.backend == "faiss":
            params = FaissParams(kind=cfg.faiss_index, nprobe=cfg.nprobe, candidates=cfg.rescore)
            if cfg.ef_search:
                params.ef_search = cfg.ef_search
            self.index = FaissIndex.open(
                self.features,
                self.target,
                params,
                index_dir=cfg.faiss_dir,
                rebuild=cfg.rebuild,
                progress=progress,
            )
            self.items = self.index.exact.items
            self.scoring = None
        else:
            raise BadInput(f"unknown backend {cfg.backend!r}", hint="use exact or faiss")
        self.items_np = self.items.numpy()
        self.multi_row = len(self.items_np) > len(np.unique(self.items_np))
        exact = self.index if cfg.backend == "exact" else self.index.exact
        self.candidates = int(exact.searchable)
        if cfg.k > self.candidates:  # eval refuses; a search answers with what there is
            log.warning(
                "-k %d is larger than the %d %s candidates: at most %d hits per query",
                cfg.k, self.candidates, self.target, self.candidates,
            )  # fmt: skip
        #: cosine scores (unit vectors before 16-bit rounding) are clamped to [-1, 1]
        self.normalized = bool(self.features.spec(self.target).get("normalized"))
        self._row_in_item: np.ndarray | None = None
        self._encoder: QueryEncoder | None = None
        self._query_rows: dict[str, tuple[Any, np.ndarray]] = {}
        self._recommender = None

    @property
    def recommender(self):
        """The :class:`~mmcli.search.recommend.Recommender` answering like queries."""
        if self._recommender is None:
            c = self.cfg
            self._recommender = Recommender(self, c.aggregate, c.diversity, c.include_seen)
        return self._recommender

    # -------------------------------------------------------------- query vectors
    @property
    def encoder(self) -> QueryEncoder:
        if self._encoder is None:
            model = model_for(
                self.features,
                [self.target],
                self.cfg.model,
                weights=self.cfg.weights,
                device=self.cfg.device,
                allow=self.cfg.allow_model_mismatch,
                purpose="text, image, audio and video queries need --model",
            )
            self._encoder = QueryEncoder(model, self.cfg.device, precision=self.cfg.precision)
        return self._encoder

    def _table_rows(self, table: str) -> tuple[Any, np.ndarray]:
        if table not in self._query_rows:
            self.features.require(table, hint="pick the table of --id queries with --query-table")
            x, items = self.features.table(table, every_item=True)  # a query may be any item
            self._query_rows[table] = (x, items.numpy())
        return self._query_rows[table]

    def id_vectors(self, item_id: str) -> list[Any]:
        """The feature rows of item ``item_id`` in the query table (several for captions)."""
        table = self.cfg.query_table or self.target
        x, items = self._table_rows(table)
        i = self.features.item_index(item_id)
        rows = np.flatnonzero(items == i) if i is not None else np.empty(0, np.int64)
        if len(rows) == 0:
            raise BadInput(
                f"no {table} row for item {item_id!r} in the index features",
                hint="check the id, or pick another table with --query-table",
            )
        return [x[int(r)] for r in rows]

    def embed(self, queries: list[Query]) -> list[list[tuple[dict[str, Any], Any]]]:
        """Per query, its (query object to echo, vector) pairs: one, or one per row for an
        id whose item has several rows in the query table (``"row"`` added)."""
        out: list[list[tuple[dict[str, Any], Any]]] = [[] for _ in queries]
        by_kind: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            by_kind.setdefault(q.kind, []).append(i)
        for kind, idx in by_kind.items():
            if kind in MODALITIES:
                vecs = self.encoder.encode(
                    kind, [queries[i].value for i in idx], batch_size=self.cfg.batch_size
                )
                for j, i in enumerate(idx):
                    out[i] = [(queries[i].raw, vecs[j])]
            elif kind == "vector":
                for i in idx:
                    out[i] = [(queries[i].raw, queries[i].value)]
            elif kind == "id":
                for i in idx:
                    vecs = self.id_vectors(queries[i].value)
                    raw = queries[i].raw
                    out[i] = (
                        [(raw, vecs[0])]
                        if len(vecs) == 1
                        else [({**raw, "row": r}, v) for r, v in enumerate(vecs)]
                    )
            else:
                raise BadInput(f"unknown query kind {kind!r}")
        return out

    # --------------------------------------------------------------------- search
    def search_vectors(self, vectors: Any, extra: int = 0):
        q = (
            torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vectors])
            if isinstance(vectors, list)
            else vectors
        )
        if q.shape[-1] != self.index_dim:
            raise BadInput(
                f"queries have {q.shape[-1]} dimensions, the {self.target} index {self.index_dim}",
                hint="encode queries with the model that produced the index features",
            )
        if self.cfg.backend == "exact":
            return self.index.search(
                q,
                self.cfg.k + extra,
                scoring=self.scoring,
                threshold=self.cfg.threshold,
                device=self.cfg.device,
                batch_size=SEARCH_BATCH,
            )
        return self.index.search(q, self.cfg.k + extra, threshold=self.cfg.threshold)

    @property
    def index_dim(self) -> int:
        return self.index.dim if self.cfg.backend == "exact" else self.index.exact.dim

    def search(self, queries: list[Query]) -> list[dict[str, Any]]:
        """One result object per query vector (an id query with several rows gives several)."""
        return [line for group in self.search_grouped(queries) for line in group]

    def search_grouped(self, queries: list[Query]) -> list[list[dict[str, Any]]]:
        """Result objects grouped by query."""
        if any(q.kind == "like" for q in queries):  # recommendations: one line each
            likes = iter(self.recommender.lines([q for q in queries if q.kind == "like"]))
            others = iter(self.search_grouped([q for q in queries if q.kind != "like"]))
            return [[next(likes)] if q.kind == "like" else next(others) for q in queries]
        groups = self.embed(queries)
        flat = [p for g in groups for p in g]
        sizes = [len(g) for g in groups]
        if not flat:
            return [[] for _ in queries]
        # --exclude-self: an id query searching its own table leaves its own item out
        own_table = (self.cfg.query_table or self.target) == self.target
        drop = self.cfg.exclude_self and own_table
        own = [
            self.features.item_index(q.value) if drop and q.kind == "id" else None
            for q, g in zip(queries, groups)
            for _ in g
        ]
        extra = 0
        if any(i is not None for i in own):
            counts = np.bincount(self.items_np, minlength=len(self.features.ids))
            extra = max(int(counts[i]) for i in own if i is not None)
        result = self.search_vectors([v for _, v in flat], extra)
        lines = []
        for i, (obj, _) in enumerate(flat):
            hits = result.hits(i)
            if own[i] is not None:
                hits = [(r, s) for r, s in hits if int(self.items_np[r]) != own[i]]
            lines.append(self.result_line(obj, hits[: self.cfg.k]))
        out, j = [], 0
        for n in sizes:
            out.append(lines[j : j + n])
            j += n
        return out

    def result_line(self, query: dict[str, Any], hits: list[tuple[int, float]]) -> dict[str, Any]:
        out = []
        for rank, (row, score) in enumerate(hits, 1):
            item = int(self.items_np[row])
            hit: dict[str, Any] = {
                "rank": rank,
                "id": self.features.ids[item],
                "score": _short_float(min(max(score, -1.0), 1.0) if self.normalized else score),
            }
            if self.multi_row:
                hit["row"] = int(self.row_in_item[row])
            if self.cfg.with_fields:
                fields = self.features.manifest_fields(item)
                if fields is not None:
                    hit["item"] = fields
            out.append(hit)
        return {"query": query, "hits": out}

    @property
    def row_in_item(self) -> np.ndarray:
        """Position of each index row among the rows of its item (caption 0, 1, ...)."""
        if self._row_in_item is None:
            items = self.items_np
            order = np.argsort(items, kind="stable")
            sorted_items = items[order]
            start = np.searchsorted(sorted_items, sorted_items, "left")
            pos = np.empty(len(items), dtype=np.int64)
            pos[order] = np.arange(len(items)) - start
            self._row_in_item = pos
        return self._row_in_item

    def run(
        self,
        batches: Iterable[list[Query | Exception]],
        on_error: str = "skip",
    ) -> Iterator[dict[str, Any]]:
        """Answer batches of queries (or the errors met parsing them), one line per query.

        With ``on_error="skip"`` a bad query gives ``{"query": ..., "error": "..."}`` (and
        a warning on stderr) instead of stopping; with ``"fail"`` the error is raised.
        """
        for batch in batches:
            good = [q for q in batch if isinstance(q, Query)]
            try:
                groups = iter(self.search_grouped(good))
            except MmcliError:
                if on_error != "skip":
                    raise
                groups = iter([self._one_safely(q) for q in good])  # isolate the bad one
            for q in batch:
                lines = (
                    next(groups)
                    if isinstance(q, Query)
                    else [_error_line(getattr(q, "raw", None), q)]
                )
                for line in lines:
                    if "error" in line:
                        if on_error != "skip":
                            raise q if not isinstance(q, Query) else BadInput(line["error"])
                        log.warning("%s", line["error"])
                    yield line

    def _one_safely(self, q: Query) -> list[dict[str, Any]]:
        try:
            return self.search_grouped([q])[0]
        except MmcliError as e:
            return [_error_line(q.raw, e)]


def _error_line(raw: Any, e: Exception) -> dict[str, Any]:
    return {"query": raw, "error": str(e)}


def _short_float(x: float) -> float:
    """The float32 value written with the fewest digits that read back to it."""
    return float(str(np.float32(x)))
