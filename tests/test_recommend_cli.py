"""The recommendation routes of the CLI: retrieve --like / --exclude, {"like"} lines on
stdin mixed with other queries, --histories FILE (one line per user), --diversity, and
eval --task recommend; bad ids are one line and exit 2 (or an error line on stdin)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from feature_files import write_features, write_manifest

# A B liked; C half-way; D near A, E near B; F opposite A (see tests/search/test_recommend.py)
C10, S10 = np.cos(np.radians(10)), np.sin(np.radians(10))
VECS = np.array(
    [[1, 0, 0], [0, 1, 0], [0.7071068, 0.7071068, 0], [C10, S10, 0], [S10, C10, 0], [-1, 0, 0]],
    dtype=np.float32,
)
IDS = ["A", "B", "C", "D", "E", "F"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("recidx")
    write_manifest(root / "manifest.jsonl", [{"id": i, "image": f"{i}.png"} for i in IDS])
    text = np.repeat(VECS, 2, axis=0)  # two captions per item
    write_features(
        root / "f.safetensors",
        IDS,
        {"image": (VECS, np.arange(6)), "text": (text, np.repeat(np.arange(6), 2))},
        source={"manifest": str(root / "manifest.jsonl")},
    )
    return root


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ids(line: dict) -> list[str]:
    return [h["id"] for h in line["hits"]]


def test_like_and_exclude_arguments_give_one_line(cli, index):
    r = cli("retrieve", "--index", index, "--like", "A", "--like", "B", "-k", 3)
    assert r.exit_code == 0, r.stderr
    (out,) = lines(r.stdout)
    assert out["query"] == {"like": ["A", "B"]}
    assert ids(out) == ["C", "D", "E"]
    assert out["hits"][0]["item"]["image"].endswith("C.png")  # manifest fields as usual
    r = cli("retrieve", "--index", index, "--like", "A", "--exclude", "D", "-k", 2,
            "--aggregate", "max", "--no-fields")  # fmt: skip
    (out,) = lines(r.stdout)
    assert out["query"] == {"like": ["A"], "exclude": ["D"]}
    assert ids(out) == ["C", "E"]
    r = cli("retrieve", "--index", index, "--like", "A", "--include-seen", "-k", 1)
    assert ids(lines(r.stdout)[0]) == ["A"]


def test_stdin_like_lines_are_answered_in_order_among_other_queries(cli, index):
    stdin = '{"like": ["A", "B"], "tag": 1}\n{"id": "A"}\n{"like": "A", "exclude": ["D"]}\n'
    r = cli("retrieve", "--index", index, "-k", 2, "--no-fields", input=stdin)
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [o["query"] for o in out] == [
        {"like": ["A", "B"], "tag": 1},
        {"id": "A"},
        {"like": "A", "exclude": ["D"]},
    ]
    assert [ids(o) for o in out] == [["C", "D"], ["D", "C"], ["C", "E"]]


def test_histories_give_one_line_per_user(cli, index, tmp_path):
    h = tmp_path / "h.jsonl"
    h.write_text(
        '{"user": "u1", "prefers": {"color": "red"}, "history": ["A", "B"]}\n\n'
        '{"user": "u2", "history": ["F"]}\n'
    )
    r = cli("retrieve", "--index", index, "--histories", h, "-k", 2, "--no-fields")
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [o["query"]["user"] for o in out] == ["u1", "u2"]
    assert out[0]["query"]["history"] == ["A", "B"]
    assert ids(out[0]) == ["C", "D"]
    assert ids(out[1]) == ["B", "E"]  # F = -A: B (cos 0), E (-0.174), then C, D, A
    plain = lines(cli("retrieve", "--index", index, "--histories", h, "-k", 2).stdout)
    zero = lines(
        cli("retrieve", "--index", index, "--histories", h, "-k", 2, "--diversity", 0).stdout
    )
    assert plain == zero
    diverse = lines(cli("retrieve", "--index", index, "--histories", h, "-k", 2,
                        "--diversity", 0.5, "--no-fields").stdout)  # fmt: skip
    assert all("mmr" in hit for o in diverse for hit in o["hits"])


def _one_error_line(r) -> str:
    assert r.exit_code == 2, r.stdout
    assert r.stdout == ""
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    return err[0]


def test_bad_ids_are_one_line_and_exit_2(cli, index, tmp_path):
    err = _one_error_line(
        cli("retrieve", "--index", index, "-k", 2, "--like", "A", "--like", "nope")
    )
    assert "error: unknown item 'nope' in --like" in err
    h = tmp_path / "h.jsonl"
    h.write_text('{"user": "u1", "history": ["A"]}\n{"user": "u2", "history": ["A", "zz"]}\n')
    err = _one_error_line(cli("retrieve", "--index", index, "-k", 2, "--histories", h))
    assert f"line 2 of {h}: unknown item 'zz' in \"history\"" in err
    h.write_text('{"user": "u1", "like": ["A"]}\n')
    assert 'with "history"' in _one_error_line(
        cli("retrieve", "--index", index, "-k", 2, "--histories", h)
    )
    err = _one_error_line(cli("retrieve", "--index", index, "-k", 2, "--like", "A", "--id", "B"))
    assert "cannot be combined" in err
    err = _one_error_line(cli("retrieve", "--index", index, "-k", 2, "--exclude", "A", "--id", "B"))
    assert "--exclude goes with --like" in err
    err = _one_error_line(
        cli("retrieve", "--index", index, "-k", 2, "--like", "A", "--target", "text")
    )
    assert "one row per item" in err


def test_a_bad_stdin_line_is_answered_in_place_or_stops(cli, index):
    stdin = '{"like": ["A"]}\n{"like": ["A", "nope"]}\n{"text": "x", "like": ["A"]}\n'
    r = cli("retrieve", "--index", index, "-k", 1, "--no-fields", input=stdin)
    assert r.exit_code == 0
    good, bad, mixed = lines(r.stdout)
    assert ids(good) == ["D"]
    assert bad["error"].startswith("line 2 of <stdin>: unknown item 'nope' in \"like\"")
    assert "exactly one of text, image, audio, video, id or like (got text, like)" in mixed["error"]
    r = cli("retrieve", "--index", index, "--on-error", "fail", input=stdin)
    assert r.exit_code == 2 and "line 2 of <stdin>" in r.stderr


def test_eval_task_recommend(cli, index, tmp_path):
    h = tmp_path / "h.jsonl"
    h.write_text('{"user": "u1", "history": ["A", "D"]}\n{"user": "u2", "history": ["B", "C"]}\n')
    r = cli("eval", index, "--task", "recommend", "--histories", h, "--k", "1,2")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["task"], out["target"]) == ("recommend", "image")
    # u1 likes A: D first (hit); u2 likes B: E (0.985) first, C (0.707) second
    assert out["metrics"]["recall@1"] == 0.5 and out["metrics"]["recall@2"] == 1.0
    assert {"popularity_recall@2", "random_recall@2", "random_expected_recall@2"} <= set(
        out["metrics"]
    )
    assert out["info"]["users_evaluated"] == 2
    auto = json.loads(cli("eval", index, "--histories", h, "--k", "1,2").stdout)
    assert auto["task"] == "recommend" and auto["metrics"] == out["metrics"]
    h.write_text('{"user": "u1", "history": ["A", "Q"]}\n')
    err = _one_error_line(cli("eval", index, "--task", "recommend", "--histories", h, "--k", 1))
    assert f"line 1 of {h}: unknown item 'Q'" in err
    err = _one_error_line(cli("eval", index, "--task", "recommend", "--k", 1))
    assert "needs --histories" in err
