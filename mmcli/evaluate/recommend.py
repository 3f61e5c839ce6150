"""``eval --task recommend``: leave-last-out next-item recommendation against baselines.

    metrics, info = evaluate_recommend(["out/joint"], "histories.jsonl", ks=[1, 5, 10])
    metrics["recall@10"], metrics["popularity_recall@10"], metrics["random_recall@10"]

For each user with 2 or more history items the last one is held out and the others are
the user's *seen* items. Each method ranks the catalogue (the target table's items, or
those of ``--split``) without the seen items, and the held-out item's rank r (1-based;
none when it is not in the top max(k)) gives, averaged over the users:

* ``recall@k``: the share of users with r <= k (one relevant item, so also the hit rate);
* ``ndcg@k``: 1 / log2(1 + r) when r <= k, else 0 (the ideal DCG of one item is 1);
* ``coverage@k``: the share of the catalogue in at least one user's top k;
* ``cold_share@k``: the share of the top-k slots given to items that no seen part of any
  history holds (popularity never recommends one; content can).

Methods, in one run: the content model (``Recommender``: the seen items' embeddings,
``aggregate`` and ``diversity`` as in ``retrieve``; unprefixed keys), ``popularity_``
(the items most often in the seen parts of all histories, ties to the lower row) and
``random_`` (a seeded random order of the unseen items), with ``random_expected_``
recall and NDCG computed exactly: with N unseen candidates, recall@k = min(k, N) / N and
ndcg@k = (1/N) sum_{r <= min(k, N)} 1/log2(1 + r).

A history repeating its held-out item among the seen ones cannot be hit (seen items are
never recommended); it still counts. Users with a single item, and users whose held-out
item is not a candidate (another ``--split``), are skipped and counted in ``info``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcli.errors import BadInput
from mmcli.search.queries import read_histories
from mmcli.search.retrieve import RetrieveConfig, Retriever

METHODS = ("", "popularity_", "random_")


def rank_metrics(
    recs: Sequence[np.ndarray], held: np.ndarray, ks: Sequence[int], catalogue: int, cold=None
) -> dict[str, float]:
    """recall@k, ndcg@k, coverage@k (and cold_share@k when ``cold``, a bool mask over items,
    is given) of per-user recommendation lists (item numbers, best first) against each
    user's one held-out item."""
    if not len(recs):
        raise BadInput("no user to evaluate (every history has fewer than 2 items)")
    rank = np.full(len(recs), np.inf)
    for u, (rec, h) in enumerate(zip(recs, held)):
        at = np.flatnonzero(np.asarray(rec) == h)
        if len(at):
            rank[u] = at[0] + 1
    out: dict[str, float] = {}
    for k in ks:
        hit = rank <= k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(
            np.where(hit, 1.0 / np.log2(1.0 + np.where(hit, rank, 1)), 0).mean()
        )
        top = np.concatenate([np.asarray(r[:k], dtype=np.int64) for r in recs])
        out[f"coverage@{k}"] = float(len(np.unique(top)) / catalogue)
        if cold is not None:
            out[f"cold_share@{k}"] = float(cold[top].mean()) if len(top) else 0.0
    return out


def expected_random(unseen: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """The exact mean recall@k and ndcg@k of a uniformly random order, for users whose
    held-out item is one of their ``unseen`` candidates (0 where it is not: -1)."""
    out: dict[str, float] = {}
    n = np.asarray(unseen, dtype=np.float64)
    ok = n > 0
    for k in ks:
        top = np.minimum(k, np.where(ok, n, 0)).astype(np.int64)
        gains = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(2.0 + np.arange(max(ks))))])
        out[f"recall@{k}"] = float(np.where(ok, top / np.where(ok, n, 1), 0).mean())
        out[f"ndcg@{k}"] = float(np.where(ok, gains[top] / np.where(ok, n, 1), 0).mean())
    return out


def _users(rec, queries) -> tuple[list[np.ndarray], np.ndarray, dict[str, int]]:
    """(seen items per user, held-out items, skipped counts) of the evaluated users."""
    seen, held = [], []
    skipped = {"users_too_short": 0, "users_held_out_not_candidate": 0}
    mask = rec.exact.row_mask
    for q in queries:
        items = [rec.item(i, "history", q.value.where) for i in q.value.like]
        if len(items) < 2:
            skipped["users_too_short"] += 1
            continue
        if mask is not None and not mask[rec.row_of[items[-1]]]:
            skipped["users_held_out_not_candidate"] += 1
            continue
        seen.append(np.unique(np.array(items[:-1], dtype=np.int64)))
        held.append(items[-1])
    return seen, np.array(held, dtype=np.int64), skipped


def evaluate_recommend(
    index: Sequence[str],
    histories: str,
    *,
    target: str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    split: str | None = None,
    aggregate: str = "mean",
    diversity: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict[str, float], dict[str, Any], str]:
    """(metrics, info, the target table): see the module docstring."""
    cfg = RetrieveConfig(index=list(index), target=target, k=1, split=split, device=device,
                         with_fields=False, aggregate=aggregate, diversity=diversity)  # fmt: skip
    r = Retriever(cfg)
    rec = r.recommender
    candidates = np.unique(r.items_np if rec.exact.row_mask is None
                           else r.items_np[rec.exact.row_mask])  # fmt: skip
    ks = sorted(ks)
    if ks[-1] > len(candidates):
        raise BadInput(
            f"k={ks[-1]} is larger than the {len(candidates)} {r.target} candidates",
            hint="lower --k",
        )
    queries = read_histories(histories)
    seen, held, skipped = _users(rec, queries)
    if not len(held):
        raise BadInput(
            "no user to evaluate: every history has fewer than 2 items (or its last is not "
            "a candidate)",
            where=histories,
        )
    k = ks[-1]
    model = [r.items_np[rows] for rows, _, _ in rec.recommend(seen, seen, k)]
    plays = np.bincount(np.concatenate(seen), minlength=len(r.features.ids))
    for q in queries:  # one-item histories are seen parts too
        if len(q.value.like) == 1:
            plays[rec.item(q.value.like[0], "history", q.value.where)] += 1
    popular = candidates[np.lexsort((candidates, -plays[candidates]))]
    rng = np.random.default_rng(seed)
    pop, rand, unseen = [], [], []
    for s in seen:
        allowed = popular[~np.isin(popular, s)]
        pop.append(allowed[:k])
        rand.append(rng.choice(np.sort(allowed), size=min(k, len(allowed)), replace=False))
        unseen.append(len(allowed))
    cold = plays == 0
    metrics: dict[str, float] = {}
    for prefix, recs in zip(METHODS, (model, pop, rand)):
        m = rank_metrics(recs, held, ks, len(candidates), cold)
        metrics.update({prefix + key: v for key, v in m.items()})
    in_unseen = np.array([n if not np.isin(h, s) else -1 for n, h, s in zip(unseen, held, seen)])
    metrics.update({f"random_expected_{a}": v for a, v in expected_random(in_unseen, ks).items()})
    info = {
        "histories": histories,
        "target": r.target,
        "users": len(queries),
        "users_evaluated": int(len(held)),
        **skipped,
        "candidates": int(len(candidates)),
        "cold_candidates": int(cold[candidates].sum()),
        "aggregate": aggregate,
        "diversity": diversity,
        "backend": "exact",
        "seed": seed,
    }
    return metrics, info, r.target
