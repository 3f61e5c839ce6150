"""The toy histories (examples/toyhistories.py, toydata.py --histories): the preference
structure they promise, the unwatched items, determinism, and the oracle's recall."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from toydata import main as toydata_main
from toyhistories import ATTRIBUTES, color_of, make_histories, oracle_recall, shape_of


def _rows():
    """120 one-shape items (6 colours x 5 shapes x 4 sizes) and 10 two-shape ones."""
    colours = ("red", "orange", "yellow", "green", "blue", "purple")
    shapes = ("circle", "square", "triangle", "star", "cross")
    rows = [{"id": f"o{c}{s}{n}", "objects": [{"color": c, "shape": s, "size": n}]}
            for c in colours for s in shapes for n in range(4)]  # fmt: skip
    rows += [{"id": f"t{i}", "objects": [{"color": "red", "shape": "star"},
                                         {"color": "blue", "shape": "cross"}]} for i in range(10)]  # fmt: skip
    return rows


def test_histories_follow_the_preference_and_never_touch_unwatched_items():
    rows = _rows()
    h = make_histories(rows, ATTRIBUTES, users=60, seed=1, noise=0.1, unwatched=0.2)
    by_id = {r["id"]: r for r in rows}
    assert len(h.unwatched) == 26
    unwatched = set(h.unwatched)
    preferred = total = 0
    for u in h.users:
        (attr, value), = u["prefers"].items()  # fmt: skip
        assert attr in ("color", "shape")
        assert 5 <= len(u["history"]) <= 12 and len(set(u["history"])) == len(u["history"])
        assert not unwatched & set(u["history"])
        preferred += sum(ATTRIBUTES[attr](by_id[i]) == value for i in u["history"])
        total += len(u["history"])
    assert preferred / total > 0.8  # 1 - noise
    assert Counter(next(iter(u["prefers"])) for u in h.users) == {"color": 30, "shape": 30}
    assert color_of(rows[-1]) is None and shape_of(rows[0]) == "circle"
    assert color_of({"id": "v1", "color": "red", "motion": "growing"}) == "red"  # toy videos


def test_histories_are_deterministic_per_seed():
    rows = _rows()
    a = make_histories(rows, users=20, seed=4)
    assert a.users == make_histories(rows, users=20, seed=4).users
    assert a.users != make_histories(rows, users=20, seed=5).users


def test_the_oracle_beats_chance_and_is_one_when_the_choice_is_forced():
    rows = _rows()
    h = make_histories(rows, users=40, seed=0)
    assert oracle_recall(h, rows, k=10) > 10 / len(rows)
    one = make_histories(rows[:3], {"color": color_of}, users=2, length=(3, 3), noise=0.0,
                         unwatched=0.0)  # fmt: skip
    assert oracle_recall(one, rows[:3], {"color": color_of}, k=1) == 1.0  # 1 red item left


def test_toydata_writes_histories_beside_the_manifest(tmp_path, capsys):
    args = [str(tmp_path / "d"), "--items", "60", "--image-size", "16", "--no-audio"]
    assert toydata_main([*args, "--histories", "25"]) == 0
    assert "oracle recall@10" in capsys.readouterr().err
    users = [json.loads(line) for line in (tmp_path / "d" / "histories.jsonl").open()]
    unwatched = (tmp_path / "d" / "unwatched.txt").read_text().split()
    assert len(users) == 25 and len(unwatched) == 6
    ids = {json.loads(line)["id"] for line in (tmp_path / "d" / "manifest.jsonl").open()}
    assert {i for u in users for i in u["history"]} <= ids - set(unwatched)
    with pytest.raises(ValueError):
        make_histories([], users=1)


def test_toy_video_histories_prefer_a_colour_or_a_motion(tmp_path):
    """toydata.py --video --histories: users like one colour or one motion of the clips."""
    toydata_main([str(tmp_path / "v"), "--video", "--items", "40", "--image-size", "16x16",
                  "--video-frames", "4", "--no-audio", "--histories", "20", "--quiet"])  # fmt: skip
    rows = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "v" / "manifest.jsonl").open()}
    users = [json.loads(x) for x in (tmp_path / "v" / "histories.jsonl").open()]
    assert {next(iter(u["prefers"])) for u in users} == {"color", "motion"}
    hits = total = 0
    for u in users:
        ((attr, value),) = u["prefers"].items()
        liked = sum(r[attr] == value for r in rows.values())  # preferred items can run out
        hits += sum(rows[i][attr] == value for i in u["history"])
        total += min(len(u["history"]), liked)
    assert hits >= 0.7 * total
