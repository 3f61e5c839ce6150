"""Recommendations ("more like these") at the library level: seen and excluded items are
never hits, mean and max aggregation against hand-computed rankings, max's merged lists
against a full sort, MMR by hand, and MMR with λ = 0 equal to the plain ranking."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_files import write_features  # noqa: E402

from mmcli.errors import BadInput  # noqa: E402
from mmcli.search.queries import like_query  # noqa: E402
from mmcli.search.recommend import Recommender, mmr  # noqa: E402
from mmcli.search.retrieve import RetrieveConfig, Retriever  # noqa: E402

C10, S10 = np.cos(np.radians(10)), np.sin(np.radians(10))
#: A, B liked; C half-way; D near A, E near B (E mirrors D: their mean scores tie exactly)
HAND = np.array(
    [[1, 0, 0], [0, 1, 0], [0.7071068, 0.7071068, 0], [C10, S10, 0], [S10, C10, 0], [-1, 0, 0]],
    dtype=np.float32,
)
HAND_IDS = ["A", "B", "C", "D", "E", "F"]


def _index(folder: Path, x: np.ndarray, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_features(folder / "f.safetensors", ids, {"image": (x, np.arange(len(ids)))})
    return folder


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return _index(tmp_path_factory.mktemp("hand"), HAND, HAND_IDS)


@pytest.fixture(scope="module")
def rand(tmp_path_factory):
    """300 random unit vectors, 20 of them repeated (exact ties)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    x[280:] = x[:20]
    x[299] = x[0]  # 0, 280 and 299: one vector
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {
        "x": x,
        "root": _index(tmp_path_factory.mktemp("rand"), x, [f"r{i}" for i in range(300)]),
    }


def _rec(root, k=10, **kw) -> Recommender:
    return Recommender(Retriever(RetrieveConfig(index=[str(root)], k=k, with_fields=False)), **kw)


def _ids(line):
    return [h["id"] for h in line["hits"]]


def test_mean_and_max_rank_as_computed_by_hand(hand):
    # mean of A, B = (0.5, 0.5): C 0.7071, D = E 0.5792 (tie: lower row first), F -0.5
    (line,) = _rec(hand, k=4).lines([like_query({"like": ["A", "B"]})])
    assert _ids(line) == ["C", "D", "E", "F"]
    scores = [h["score"] for h in line["hits"]]
    assert scores == pytest.approx([0.7071068, (C10 + S10) / 2, (C10 + S10) / 2, -0.5], abs=1e-6)
    # max: D = E = cos 10° = 0.9848 (tie: lower row), then C 0.7071, F 0 (cos to B)
    (line,) = _rec(hand, k=4, aggregate="max").lines([like_query({"like": ["A", "B"]})])
    assert _ids(line) == ["D", "E", "C", "F"]
    assert [h["score"] for h in line["hits"]] == pytest.approx([C10, C10, 0.7071068, 0.0], abs=1e-6)


def test_seen_and_excluded_items_are_never_hits(hand):
    rec = _rec(hand, k=6)
    (line,) = rec.lines([like_query({"like": ["A"], "exclude": ["D"]})])
    assert _ids(line) == ["C", "E", "B", "F"]  # A seen, D excluded; only 4 left
    incl = _rec(hand, k=6, include_seen=True)
    (line,) = incl.lines([like_query({"like": ["A"], "exclude": ["D"]})])
    assert _ids(line) == ["A", "C", "E", "B", "F"]  # A is its own best match


def _plain(x: np.ndarray, liked: list[int], skip: set[int], k: int, agg: str):
    """Reference: every score in float64 from the stored float32 vectors, full sort."""
    if agg == "mean":
        q = x[liked].astype(np.float64).mean(0).astype(np.float32)
        s = (x.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)
    else:
        s = (x.astype(np.float64) @ x[liked].astype(np.float64).T).astype(np.float32).max(1)
    order = [int(i) for i in np.lexsort((np.arange(len(x)), -s.astype(np.float64)))]
    order = [i for i in order if i not in skip][:k]
    return order, s[order]


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_rankings_equal_a_full_sort_and_diversity_zero_is_the_plain_ranking(rand, agg):
    x = rand["x"]
    rng = np.random.default_rng(1)
    likes = [rng.choice(300, size=n, replace=False) for n in (1, 3, 7)]
    likes.append(np.array([0, 5]))  # 280 and 299 (= 0) tie near the top: the lower row first
    skips = [np.unique(np.concatenate([lk, rng.choice(300, size=4)])) for lk in likes]
    rec = _rec(rand["root"], aggregate=agg, diversity=0.0)
    for (rows, rel, m), lk, sk in zip(rec.recommend(likes, skips, 12), likes, skips):
        order, scores = _plain(x, lk.tolist(), set(sk.tolist()), 12, agg)
        assert rows.tolist() == order
        np.testing.assert_array_equal(rel, scores)
        assert m is None


def test_mmr_with_lambda_zero_keeps_relevance_order_even_with_ties():
    rng = np.random.default_rng(2)
    rel = np.sort(rng.integers(0, 5, 40).astype(np.float64))[::-1]  # many ties
    v = rng.standard_normal((40, 8))
    picked, scores = mmr(rel, v, 15, 0.0)
    assert picked.tolist() == list(range(15))
    np.testing.assert_array_equal(scores, rel[:15])


def test_mmr_by_hand():
    # c0 and c1 are the same direction; c2 is orthogonal and less relevant
    rel = np.array([0.9, 0.89, 0.5])
    v = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    picked, scores = mmr(rel, v, 3, 0.5)
    # 1st: 0.5 * 0.9; then c2: 0.5 * 0.5 - 0.5 * 0 = 0.25 beats c1: 0.5 * 0.89 - 0.5 * 1
    assert picked.tolist() == [0, 2, 1]
    np.testing.assert_allclose(scores, [0.45, 0.25, -0.055])


def test_diversity_reranks_away_from_near_duplicates(hand):
    # liking A: D (cos 0.985) then C (0.707), E (0.174); D and C are close to each other
    plain = _rec(hand, k=3).lines([like_query({"like": ["A"]})])[0]
    diverse = _rec(hand, k=3, diversity=0.9).lines([like_query({"like": ["A"]})])[0]
    assert _ids(plain) == ["D", "C", "E"]
    assert _ids(diverse)[0] == "D" and set(_ids(diverse)) != set(_ids(plain))
    assert all("mmr" in h for h in diverse["hits"]) and "mmr" not in plain["hits"][0]


def test_unknown_ids_name_the_line_and_the_id(hand):
    rec = _rec(hand)
    with pytest.raises(BadInput, match=r"line 4 of h.jsonl: unknown item 'nope' in \"exclude\""):
        rec.lines([like_query({"like": ["A"], "exclude": ["nope"]}, "line 4 of h.jsonl")])
    with pytest.raises(BadInput, match="at least one"):
        like_query({"like": []})
    with pytest.raises(BadInput, match=r"\"like\" or \"history\", not both"):
        like_query({"like": ["A"], "history": ["B"]})


def test_bad_settings_are_refused(hand):
    with pytest.raises(BadInput, match="aggregate"):
        _rec(hand, aggregate="median")
    with pytest.raises(BadInput, match="diversity"):
        _rec(hand, diversity=1.5)


def test_the_faiss_backend_gives_the_exact_backends_recommendations(rand, tmp_path):
    pytest.importorskip("faiss")
    likes = [np.array([3, 40, 77]), np.array([9])]
    skips = [lk for lk in likes]
    exact = _rec(rand["root"], aggregate="max").recommend(likes, skips, 10)
    r = Retriever(RetrieveConfig(index=[str(rand["root"])], k=10, backend="faiss",
                                 faiss_index="Flat", faiss_dir=str(tmp_path)))  # fmt: skip
    approx = Recommender(r, aggregate="max").recommend(likes, skips, 10)
    for (a, sa, _), (b, sb, _) in zip(exact, approx):
        assert a.tolist() == b.tolist()
        np.testing.assert_array_equal(sa, sb)
