"""retrieve's rough edges: an --id query leaves itself out (--exclude-self), cosine scores
of 16-bit storage never exceed 1, -k beyond the candidates warns once, and --table shows
the caption when captions are searched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_files import write_features, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    """40 unit vectors stored as float16 (their norms round to just above or below 1)."""
    root = tmp_path_factory.mktemp("f16")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x16 = x.astype(np.float16)
    ids = [f"i{i}" for i in range(40)]
    rows = [{"id": ids[i], "image": f"{i}.png", "text": [f"cap {i} a", f"cap {i} b"]}
            for i in range(40)]  # fmt: skip
    write_manifest(root / "manifest.jsonl", rows)
    txt = np.repeat(x, 2, axis=0).astype(np.float16)
    write_features(root / "f.safetensors", ids,
                   {"image": (x16, np.arange(40)), "text": (txt, np.repeat(np.arange(40), 2))},
                   source={"manifest": str(root / "manifest.jsonl")})  # fmt: skip
    norms = (x16.astype(np.float64) ** 2).sum(1)
    return {"root": root, "norms": norms}


def _out(r):
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_id_queries_leave_their_own_item_out_by_default(cli, f16):
    r = cli("retrieve", "--index", f16["root"], "--id", "i5", "-k", "3")
    assert r.exit_code == 0, r.stderr
    (line,) = _out(r)
    assert len(line["hits"]) == 3 and "i5" not in [h["id"] for h in line["hits"]]
    r = cli("retrieve", "--index", f16["root"], "--id", "i5", "-k", "4", "--no-exclude-self")
    with_self = _out(r)[0]["hits"]
    assert with_self[0]["id"] == "i5"
    assert [h["id"] for h in with_self[1:]] == [h["id"] for h in line["hits"]]
    # an item with two caption rows, searching captions: neither of its own rows comes back
    r = cli("retrieve", "--index", f16["root"], "--id", "i7", "--target", "text", "-k", "5")
    for q in _out(r):
        assert len(q["hits"]) == 5 and all(h["id"] != "i7" for h in q["hits"])
    # another table as the query (image -> its captions): nothing is left out
    r = cli("retrieve", "--index", f16["root"], "--id", "i7", "--target", "text",
            "--query-table", "image", "-k", "2")  # fmt: skip
    assert [h["id"] for h in _out(r)[0]["hits"]] == ["i7", "i7"]


def test_float16_self_match_score_is_at_most_one(cli, f16):
    over = int(np.argmax(f16["norms"]))
    assert f16["norms"][over] > 1.0  # the stored vector's own dot product exceeds 1
    r = cli("retrieve", "--index", f16["root"], "--id", f"i{over}", "-k", "1",
            "--no-exclude-self")  # fmt: skip
    hit = _out(r)[0]["hits"][0]
    assert hit["id"] == f"i{over}" and hit["score"] == 1.0


def test_k_beyond_the_candidates_warns_once_and_returns_them_all(cli, f16):
    r = cli("retrieve", "--index", f16["root"], "--id", "i1", "--id", "i2", "-k", "100")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("-k 100 is larger than the 40 image candidates") == 1
    assert [len(q["hits"]) for q in _out(r)] == [39, 39]  # all but the query itself


def test_table_shows_the_caption_when_searching_captions(cli, f16, tmp_path):
    # one caption per item: the hits carry no "row", and the items have an image path too
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    ids = [f"j{i}" for i in range(6)]
    rows = [{"id": ids[i], "image": f"{i}.png", "text": f"caption number {i}"} for i in range(6)]
    write_manifest(tmp_path / "manifest.jsonl", rows)
    write_features(tmp_path / "f.safetensors", ids,
                   {"image": (x, np.arange(6)), "text": (x.copy(), np.arange(6))},
                   source={"manifest": str(tmp_path / "manifest.jsonl")})  # fmt: skip
    r = cli("retrieve", "--index", tmp_path / "f.safetensors", "--id", "j3",
            "--query-table", "image", "--target", "text", "-k", "2", "--table")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "row" not in _out(r)[0]["hits"][0]
    assert "caption number 3" in r.stderr and "3.png" not in r.stderr
