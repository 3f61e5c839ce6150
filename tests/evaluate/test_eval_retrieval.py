"""Retrieval metrics against an independent brute-force implementation.

The brute force builds the full ranked list of every query (sort by score descending,
then candidate index ascending, candidates numbered in item order then row order) and
reads the metrics off that list. Integer-valued features make every float32 score
exact, so ties are real ties and both sides must agree exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmcli.errors import BadInput
from mmcli.evaluate.retrieval import PositiveRanks, pair_ranks, parse_ks, retrieval_metrics


def candidate_order(items: np.ndarray) -> np.ndarray:
    """Tie-rule index of each candidate row: item order, then row order."""
    order = np.argsort(items, kind="stable")
    index = np.empty(len(items), dtype=np.int64)
    index[order] = np.arange(len(items))
    return index


def brute_metrics(q, q_items, c, c_items, ks):
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    tie_index = candidate_order(c_items)
    per_query = []
    for i in range(len(q)):
        positives = set(np.flatnonzero(c_items == q_items[i]).tolist())
        if not positives:
            continue
        ranked = sorted(range(len(c)), key=lambda j: (-scores[i, j], tie_index[j]))
        hits = [j in positives for j in ranked]
        first = hits.index(True) + 1
        R = len(positives)
        precisions = [sum(hits[: n + 1]) / (n + 1) for n, h in enumerate(hits) if h]
        ap_r = sum(p for p, n in zip(precisions, [n for n, h in enumerate(hits) if h]) if n < R) / R
        dcg = sum(1 / math.log2(n + 2) for n, h in enumerate(hits[:10]) if h)
        idcg = sum(1 / math.log2(n + 2) for n in range(min(R, 10)))
        per_query.append(
            {
                **{f"recall@{k}": float(any(hits[:k])) for k in ks},
                "first": first,
                "mrr": 1 / first,
                "map@r": ap_r,
                "ndcg@10": dcg / idcg,
            }
        )
    if not per_query:
        return None
    out = {
        key: float(np.mean([p[key] for p in per_query])) for key in per_query[0] if key != "first"
    }
    firsts = [p["first"] for p in per_query]
    out["mean_rank"] = float(np.mean(firsts))
    out["median_rank"] = float(np.median(firsts))
    return out


def check(q, qi, c, ci, ks=(1, 2, 5), block_elems=1 << 23, exact_up_to=None):
    fwd, bwd = pair_ranks(
        torch.from_numpy(q),
        qi,
        torch.from_numpy(c),
        ci,
        block_elems=block_elems,
        exact_up_to=exact_up_to,
    )
    for ranks, (a, ai, b, bi) in ((fwd, (q, qi, c, ci)), (bwd, (c, ci, q, qi))):
        want = brute_metrics(a, ai, b, bi, ks)
        if want is None:
            assert ranks.n_queries == 0
            continue
        got = retrieval_metrics(ranks, ks)
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


@st.composite
def datasets(draw):
    n_items = draw(st.integers(1, 9))
    dim = draw(st.integers(1, 4))
    caps = [draw(st.integers(0, 5)) for _ in range(n_items)]
    has_img = [draw(st.booleans()) or i == 0 for i in range(n_items)]
    c_items = np.array([i for i in range(n_items) if has_img[i]], dtype=np.int64)
    q_items = np.array([i for i, n in enumerate(caps) for _ in range(n)], dtype=np.int64)
    if len(q_items) == 0:
        q_items = np.array([0], dtype=np.int64)
    # shuffle rows: the tie rule numbers candidates by item, not by file order
    q_items = q_items[np.array(draw(st.permutations(range(len(q_items)))), dtype=np.int64)]
    c_items = c_items[np.array(draw(st.permutations(range(len(c_items)))), dtype=np.int64)]
    values = st.integers(-2, 2)  # tiny integers: exact float32 scores, many ties
    q = np.array(
        draw(
            st.lists(
                st.lists(values, min_size=dim, max_size=dim),
                min_size=len(q_items),
                max_size=len(q_items),
            )
        ),
        dtype=np.float32,
    )
    c = np.array(
        draw(
            st.lists(
                st.lists(values, min_size=dim, max_size=dim),
                min_size=len(c_items),
                max_size=len(c_items),
            )
        ),
        dtype=np.float32,
    )
    block = draw(st.sampled_from([1, 3, 7, 40, 1 << 20]))
    return q, q_items, c, c_items, block


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_metrics_match_brute_force_with_ties(data):
    q, qi, c, ci, block = data
    check(q, qi, c, ci, ks=(1, 2, 3), block_elems=block)
    # counting positives only up to a cap (what eval does) changes no metric
    check(q, qi, c, ci, ks=(1, 2, 3), block_elems=block, exact_up_to=10)


@pytest.mark.parametrize("block", [50, 1 << 23])
def test_random_embeddings_several_captions(block):
    rng = np.random.default_rng(1)
    n_items, dim = 40, 8
    img = rng.standard_normal((n_items, dim)).astype(np.float32)
    caps = rng.integers(1, 6, size=n_items)
    ti = np.repeat(np.arange(n_items), caps)
    txt = (img[ti] + rng.standard_normal((len(ti), dim))).astype(np.float32)
    txt[3] = txt[1]  # duplicated caption: exact tie
    img[7] = img[5]  # duplicated image
    check(txt, ti, img, np.arange(n_items), ks=(1, 5, 10), block_elems=block)
    check(txt, ti, img, np.arange(n_items), ks=(1, 5, 10), block_elems=block, exact_up_to=10)


def test_hand_checked_case():
    # images: item 0 -> [1, 0], item 1 -> [0, 1]
    img = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # captions: two of item 0, one of item 1
    txt = np.array([[2, 1], [0, 1], [1, 1]], dtype=np.float32)
    ti = np.array([0, 0, 1])
    fwd, bwd = pair_ranks(torch.from_numpy(txt), ti, torch.from_numpy(img), np.array([0, 1]))
    # text -> image. caption 0: scores (2, 1) -> its image first: rank 1.
    # caption 1: scores (0, 1) -> image 1 first: rank 2. caption 2 (item 1): (1, 1) tie;
    # image 0 has the lower index, so image 1 (its positive) is rank 2.
    assert fwd.first().tolist() == [1, 2, 2]
    m = retrieval_metrics(fwd, [1, 2])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == 1.0
    assert m["mean_rank"] == pytest.approx(5 / 3)
    assert m["median_rank"] == 2.0
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # image -> text. image 0: scores (2, 0, 1) -> captions 0, 2, 1: its captions at 1 and 3.
    # image 1: scores (1, 1, 1) all tied -> order 0, 1, 2: its caption (2) at rank 3.
    assert [bwd.ranks[bwd.offsets[i] : bwd.offsets[i + 1]].tolist() for i in range(2)] == [
        [1, 3],
        [3],
    ]
    m = retrieval_metrics(bwd, [1])
    assert m["recall@1"] == 0.5
    assert m["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["map@r"] == pytest.approx((1 / 2 + 0) / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(((1 + 1 / math.log2(4)) / idcg2 + (1 / math.log2(4))) / 2)


def test_queries_without_positive_are_counted_not_scored():
    img = np.eye(3, dtype=np.float32)
    txt = np.eye(3, dtype=np.float32)
    fwd, bwd = pair_ranks(
        torch.from_numpy(txt), np.array([0, 1, 7]), torch.from_numpy(img), np.array([0, 1, 2])
    )
    assert fwd.n_queries == 2 and fwd.n_without_positive == 1
    assert bwd.n_queries == 2 and bwd.n_without_positive == 1
    assert fwd.first().tolist() == [1, 1]


def test_no_positive_at_all_is_bad_input():
    r = PositiveRanks(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 2)
    with pytest.raises(BadInput):
        retrieval_metrics(r)


def test_parse_ks():
    assert parse_ks("10,1,5,5") == [1, 5, 10]
    for bad in ("", "a", "0,1", "-1"):
        with pytest.raises(BadInput):
            parse_ks(bad)


def test_torch_counting_path_gives_the_same_ranks(monkeypatch):
    """The code path GPUs take (torch ops on the score blocks), run on CPU."""
    import mmcli.evaluate.counting as counting

    rng = np.random.default_rng(5)
    img = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    ti = np.repeat(np.arange(30), rng.integers(1, 6, size=30))
    txt = rng.integers(-2, 3, size=(len(ti), 4)).astype(np.float32)
    want = pair_ranks(
        torch.from_numpy(txt), ti, torch.from_numpy(img), np.arange(30), block_elems=200
    )
    monkeypatch.setattr(counting, "HOST_NUMPY", False)
    got = pair_ranks(
        torch.from_numpy(txt), ti, torch.from_numpy(img), np.arange(30), block_elems=200
    )
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w.ranks, g.ranks)
        np.testing.assert_array_equal(w.offsets, g.offsets)
