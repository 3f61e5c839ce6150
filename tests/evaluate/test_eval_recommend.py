"""eval --task recommend: recall@k, NDCG@k, coverage@k and cold_share@k against
hand-computed cases, the popularity and random baselines, random's exact expectation
against every permutation, and the held-out / too-short users."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_files import write_features  # noqa: E402

from mmcli.errors import BadInput  # noqa: E402
from mmcli.evaluate.recommend import evaluate_recommend, expected_random, rank_metrics  # noqa: E402

L2, L3, L4 = np.log2(2.0), np.log2(3.0), np.log2(4.0)


def test_rank_metrics_by_hand():
    recs = [np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9])]
    held = np.array([2, 6, 0])  # ranks 2, 3, none
    cold = np.zeros(10, dtype=bool)
    cold[[1, 5]] = True
    m = rank_metrics(recs, held, [1, 3], catalogue=10, cold=cold)
    assert m["recall@1"] == 0.0
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == 0.0
    assert m["ndcg@3"] == pytest.approx((1 / L3 + 1 / L4) / 3)
    assert m["coverage@1"] == pytest.approx(3 / 10)  # 1, 4, 7
    assert m["coverage@3"] == pytest.approx(9 / 10)
    assert m["cold_share@1"] == pytest.approx(1 / 3)  # 1 of 1, 4, 7
    assert m["cold_share@3"] == pytest.approx(2 / 9)


def test_expected_random_equals_the_mean_over_every_order():
    # user 1: 4 unseen candidates, the held-out one among them; user 2: 3; user 3: held out
    # among its seen items (-1): never hit
    unseen = np.array([4, 3, -1])
    exact = expected_random(unseen, [1, 2, 5])
    for k in (1, 2, 5):
        recall = ndcg = 0.0
        for n in (4, 3):
            perms = list(itertools.permutations(range(n)))
            for p in perms:  # item 0 is the held-out one
                r = p.index(0) + 1
                recall += (r <= k) / len(perms)
                ndcg += (r <= k) / np.log2(1 + r) / len(perms)
        assert exact[f"recall@{k}"] == pytest.approx(recall / 3)
        assert exact[f"ndcg@{k}"] == pytest.approx(ndcg / 3)
    assert exact["recall@1"] == pytest.approx((1 / 4 + 1 / 3) / 3)


# i0..i5: two groups of three directions; i1 and i4 score alike against (i0 + i3) / 2
VECS = np.array(
    [[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0.6, 0.8], [0, 0.8, 0.6]],
    dtype=np.float32,
)
HISTORIES = [
    {"user": "u1", "history": ["i0", "i1"]},  # seen i0, held out i1
    {"user": "u2", "history": ["i3", "i4"]},  # seen i3, held out i4
    {"user": "u3", "history": ["i0", "i3", "i5"]},  # seen i0 i3, held out i5
    {"user": "u4", "history": ["i2"]},  # too short: skipped, but i2 counts as played
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    ids = [f"i{i}" for i in range(6)]
    write_features(root / "f.safetensors", ids, {"image": (VECS, np.arange(6))})
    h = root / "h.jsonl"
    h.write_text("".join(json.dumps(u) + "\n" for u in HISTORIES))
    return root, h


def test_the_model_and_both_baselines_by_hand(case):
    root, h = case
    m, info, target = evaluate_recommend([str(root)], str(h), ks=[1, 3], seed=0)
    assert target == "image"
    assert (info["users"], info["users_evaluated"], info["users_too_short"]) == (4, 3, 1)
    # model: u1 i1 (0.8), i2 (0.6), i3 (0); u2 i4, i5, i0; u3 by the mean (0.5, 0, 0.5):
    # i1 = i4 = 0.4 and i2 = i5 = 0.3 (ties: lower row) -> i1 i4 i2 | i5: rank 4
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx(2 / 3)
    assert m["coverage@1"] == pytest.approx(2 / 6)  # i1, i4
    assert m["coverage@3"] == pytest.approx(6 / 6)
    # played in the seen parts: i0 x2, i3 x2, i2 x1; cold: i1 i4 i5
    assert info["cold_candidates"] == 3
    assert m["cold_share@3"] == pytest.approx(5 / 9)  # i1 | i4 i5 | i1 i4
    # popularity: i0 i3 i2 i1 i4 i5 without the seen -> u1 i3 i2 i1 (rank 3),
    # u2 i0 i2 i1 (i4 at 4), u3 i2 i1 i4 (i5 at 4)
    assert m["popularity_recall@1"] == 0.0
    assert m["popularity_recall@3"] == pytest.approx(1 / 3)
    assert m["popularity_ndcg@3"] == pytest.approx(1 / L4 / 3)
    assert m["popularity_coverage@1"] == pytest.approx(3 / 6)  # i3, i0, i2
    assert m["popularity_coverage@3"] == pytest.approx(5 / 6)
    assert m["popularity_cold_share@3"] == pytest.approx(4 / 9)
    # random, expected: 5, 5 and 4 unseen candidates
    assert m["random_expected_recall@1"] == pytest.approx((1 / 5 + 1 / 5 + 1 / 4) / 3)
    assert m["random_expected_recall@3"] == pytest.approx((3 / 5 + 3 / 5 + 3 / 4) / 3)
    assert m["random_expected_ndcg@1"] == pytest.approx(m["random_expected_recall@1"])


def test_the_random_baseline_is_seeded_and_never_recommends_seen_items(case):
    root, h = case
    a, _, _ = evaluate_recommend([str(root)], str(h), ks=[1, 3, 5], seed=3)
    b, _, _ = evaluate_recommend([str(root)], str(h), ks=[1, 3, 5], seed=3)
    assert {k: v for k, v in a.items() if "random" in k} == {
        k: v for k, v in b.items() if "random" in k
    }
    # k = 5 is every unseen candidate of u3 (4) and 5 of u1 / u2's: all three are hits
    assert a["random_recall@5"] == 1.0 and a["recall@5"] == 1.0
    assert a["random_coverage@5"] == 1.0


def test_max_aggregation_and_k_beyond_the_catalogue(case):
    root, h = case
    m, info, _ = evaluate_recommend([str(root)], str(h), ks=[1], aggregate="max")
    # u3 by max over i0, i3: i1 = i4 = 0.8 first (i1: lower row); held out i5 (0.6) misses
    assert m["recall@1"] == pytest.approx(2 / 3) and info["aggregate"] == "max"
    with pytest.raises(BadInput, match="k=7 is larger than the 6 image candidates"):
        evaluate_recommend([str(root)], str(h), ks=[7])


def test_unknown_ids_and_empty_files_are_one_line(case, tmp_path):
    root, _ = case
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"user": "a", "history": ["i0", "i1"]}\n{"user": "b", "history": ["i0", "zz"]}\n'
    )
    with pytest.raises(BadInput, match=r"line 2 of .*bad.jsonl: unknown item 'zz' in \"history\""):
        evaluate_recommend([str(root)], str(bad), ks=[1])
    short = tmp_path / "short.jsonl"
    short.write_text('{"user": "a", "history": ["i0"]}\n')
    with pytest.raises(BadInput, match="no user to evaluate"):
        evaluate_recommend([str(root)], str(short), ks=[1])
