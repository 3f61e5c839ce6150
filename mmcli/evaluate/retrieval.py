"""Retrieval metrics (recall@k, ranks, mAP@R, nDCG@10), both directions at once.

Queries of one modality (say text) retrieve candidates of another (say image). The
positives of a query are the candidate rows of the same item (the ``.item`` columns), so
an image with five captions is the single positive of each caption, and each of its
five captions is a positive of the image. The metrics are computed from the exact,
tie-aware ranks of :mod:`mmcli.evaluate.ranks` (the tie rule is there).

    metrics, info = evaluate_retrieval(FeatureSet.open("feats/"), "text", "image")
    metrics["image_retrieval_recall@5"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.evaluate.ranks import BLOCK_ELEMS, PositiveRanks, pair_ranks
from mmcli.progress import ProgressFactory, null_progress

DEFAULT_KS = (1, 5, 10)
NDCG_AT = 10

__all__ = [
    "BLOCK_ELEMS",
    "DEFAULT_KS",
    "NDCG_AT",
    "PositiveRanks",
    "direction_keys",
    "evaluate_retrieval",
    "pair_ranks",
    "parse_ks",
    "retrieval_metrics",
]

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
    details: dict | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Retrieval metrics of a :class:`~mmcli.formats.features.FeatureSet`, both directions.

    Returns ``(metrics, info)``: metrics keyed ``<target>_retrieval_<metric>`` (query ->
    target) and ``<query>_retrieval_<metric>`` (target -> query); info counts queries,
    candidates and queries without a positive per direction.
    """
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
    if details is not None:  # eval --plot: recall at every k from the first hits' ranks
        for key, r, a, b in ((kf, fwd, query, target), (kb, bwd, target, query)):
            details[key] = {
                "first": r.first(),
                "candidates": r.n_candidates,
                "query": a,
                "target": b,
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
