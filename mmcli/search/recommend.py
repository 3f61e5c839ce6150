"""Recommendations: "more like these" over a feature index (``retrieve --like``, history
lines, ``eval --task recommend``).

    r = Retriever(RetrieveConfig(index=["out/joint"], k=10))
    rec = Recommender(r, aggregate="mean", diversity=0.0)
    rec.lines([like_query({"like": ["toy-00003", "toy-00010"]})])   # result lines
    rec.recommend([np.array([3, 10])], [np.array([], np.int64)], k=10)  # (rows, scores, mmr)

**Scores.** The candidates are the index's items (one row each: the target table's
vectors, cosine similarity for normalised features). With ``aggregate="mean"`` an item's
relevance is the mean of its similarities to the liked items, computed exactly as the
dot product with the mean of the liked vectors; with ``"max"`` it is the largest of them
(each liked vector searched on its own, the lists merged by their best score: exact,
since an item of the true top n is in the top n + excluded of the liked item it is
closest to). Equal relevance is ordered by row, as every search is. The liked items
(``--include-seen`` keeps them) and the ``exclude`` items are never hits.

**Diversity.** ``diversity`` λ in [0, 1] re-ranks by maximal marginal relevance (MMR,
Carbonell & Goldstein 1998): picked one at a time, each next item maximises
``(1 - λ) rel(c) - λ max_{s picked} cos(c, s)`` (the second term 0 for the first pick),
among the ``POOL x k`` most relevant candidates. λ = 0 is the plain ranking exactly
(the same items, order and scores: ``1 x rel - 0``, ties to the first in relevance
order); λ = 1 ignores relevance after the first pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.search.queries import LikeQuery, Query, like_query, read_histories

AGGREGATES = ("mean", "max")
POOL = 10  # MMR re-ranks the POOL x k most relevant candidates


def mmr(rel: np.ndarray, vectors: Any, k: int, diversity: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximal marginal relevance: (positions picked, in order; their MMR scores).

    ``rel`` [P] relevance of the candidates, in relevance order (ties: the first wins);
    ``vectors`` [P, D] their vectors (cosine when unit length)."""
    rel = np.asarray(rel, dtype=np.float64)
    n = min(int(k), len(rel))
    picked, scores = np.empty(n, dtype=np.int64), np.empty(n)
    if n == 0:
        return picked, scores
    v = torch.as_tensor(vectors).double()
    closest = np.zeros(len(rel))  # max cosine to the picked ones (0 before the first pick)
    free = np.ones(len(rel), dtype=bool)
    for step in range(n):
        score = (1.0 - diversity) * rel - diversity * closest
        score[~free] = -np.inf
        j = int(np.argmax(score))  # the first of equal scores
        picked[step], scores[step], free[j] = j, score[j], False
        sim = (v @ v[j]).numpy()
        closest = sim if step == 0 else np.maximum(closest, sim)
    return picked, scores


class Recommender:
    """Recommendations over a :class:`~mmcli.search.retrieve.Retriever`'s index (exact or
    faiss backend); see the module docstring."""

    def __init__(
        self,
        retriever: Any,
        aggregate: str = "mean",
        diversity: float = 0.0,
        include_seen: bool = False,
    ):
        if aggregate not in AGGREGATES:
            raise BadInput(f"unknown --aggregate {aggregate!r}", hint="use mean or max")
        if not 0.0 <= float(diversity) <= 1.0:
            raise BadInput(f"--diversity must be in [0, 1], got {diversity}")
        if retriever.multi_row:
            raise BadInput(
                f"recommendations need one row per item, the {retriever.target} table has "
                "several for some items",
                hint="recommend over an item table: --target image (or audio, fused)",
            )
        self.r = retriever
        self.aggregate, self.diversity, self.include_seen = (
            aggregate,
            float(diversity),
            include_seen,
        )
        self.x, items = retriever._table_rows(retriever.target)  # every item, split or not
        self.row_of = np.full(len(retriever.features.ids), -1, dtype=np.int64)
        self.row_of[items] = np.arange(len(items))
        exact = retriever.index if retriever.cfg.backend == "exact" else retriever.index.exact
        self.exact = exact

    # ----------------------------------------------------------------------- ids
    def item(self, item_id: str, key: str, where: str | None) -> int:
        """The item number of ``item_id`` (one with a row in the target table)."""
        i = self.r.features.item_index(item_id)
        if i is None or self.row_of[i] < 0:
            given = f"--{key}" if where is None else f'"{key}"'  # an option, or a line's field
            raise BadInput(
                f"unknown item {item_id!r} in {given} (no {self.r.target} row in the index)",
                where=where,
                hint="use ids of the index's items (mmcli info INDEX), or remove it",
            )
        return int(i)

    def resolve(self, q: LikeQuery) -> tuple[np.ndarray, np.ndarray]:
        """(liked items, items never to recommend) of a like query."""
        like = np.array([self.item(i, q.key, q.where) for i in q.like], dtype=np.int64)
        skip = [self.item(i, "exclude", q.where) for i in q.exclude]
        if not self.include_seen:
            skip += like.tolist()
        return like, np.unique(np.array(skip, dtype=np.int64))

    # -------------------------------------------------------------------- ranking
    def _rows(self, items: np.ndarray):
        return self.x[torch.from_numpy(self.row_of[items])].float()

    def _search(self, vectors: list, n: int):
        return self.r.search_vectors(vectors, extra=max(0, n - self.r.cfg.k))

    def relevant(
        self, likes: Sequence[np.ndarray], skips: Sequence[np.ndarray], n: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query the ``n`` most relevant allowed (rows, float32 scores), best first."""
        wanted = n + max((len(s) for s in skips), default=0)
        if self.aggregate == "mean":
            means = [self._rows(lk).double().mean(0).float() for lk in likes]
            result = self._search(means, wanted)
            lists = [[result.hits(i)] for i in range(len(likes))]
        else:
            flat = [v for lk in likes for v in self._rows(lk)]
            result = self._search(flat, wanted)
            lists, j = [], 0
            for lk in likes:
                lists.append([result.hits(j + t) for t in range(len(lk))])
                j += len(lk)
        items = self.r.items_np
        out = []
        for hits, skip_items in zip(lists, skips):
            skip = set(skip_items.tolist())
            best: dict[int, float] = {}
            for row, score in (h for one in hits for h in one):
                if score > best.get(row, -np.inf):
                    best[row] = score
            order = sorted(best, key=lambda row: (-best[row], row))
            order = [row for row in order if int(items[row]) not in skip][:n]
            out.append(
                (np.array(order, dtype=np.int64), np.array([best[r] for r in order], np.float32))
            )
        return out

    def recommend(
        self, likes: Sequence[np.ndarray], skips: Sequence[np.ndarray], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per query its ``k`` recommendations: (rows, relevance, MMR scores or None)."""
        pool = k if self.diversity == 0 else min(self.exact.searchable, POOL * k)
        out = []
        for rows, rel in self.relevant(likes, skips, max(k, pool)):
            # λ = 0 runs the same selection; the vectors are then not needed (no similarity term)
            vectors = (
                torch.empty(len(rows), 0)
                if self.diversity == 0
                else self.exact.vectors(rows.tolist())
            )
            picked, scores = mmr(rel, vectors, k, self.diversity)
            out.append((rows[picked], rel[picked], scores if self.diversity else None))
        return out

    def lines(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """One result line per like query: ``{"query": <as given>, "hits": [...]}``."""
        resolved = [self.resolve(q.value) for q in queries]
        recs = self.recommend([a for a, _ in resolved], [b for _, b in resolved], self.r.cfg.k)
        out = []
        for q, (rows, rel, scores) in zip(queries, recs):
            line = self.r.result_line(q.raw, list(zip(rows.tolist(), rel.tolist())))
            if scores is not None:
                for hit, s in zip(line["hits"], scores.tolist()):
                    hit["mmr"] = float(str(np.float32(s)))  # the fewest digits, as "score"
            out.append(line)
        return out


def check_like_options(other_queries: bool, like, exclude, histories) -> None:
    """``retrieve``'s like options make sense together (else one :class:`BadInput`)."""
    if (like or histories) and other_queries:
        raise BadInput("--like / --histories cannot be combined with other queries")
    if like and histories:
        raise BadInput("--like and --histories are two ways to ask: give one")
    if exclude and not like:
        raise BadInput("--exclude goes with --like", hint='in a file: {"like": [...]}')


def like_batches(
    rec: Recommender,
    like: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    histories: str | None = None,
    size: int = 256,
):
    """The like queries of ``retrieve --like`` (one query) or ``--histories FILE`` (one per
    line), in batches; every id is checked before the first line is answered."""
    if like:
        obj = {"like": list(like), **({"exclude": list(exclude)} if exclude else {})}
        queries = [like_query(obj, None)]
    else:
        queries = read_histories(histories)
    for q in queries:
        rec.resolve(q.value)
    return (queries[i : i + size] for i in range(0, len(queries), size))
