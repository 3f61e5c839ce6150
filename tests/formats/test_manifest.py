import io
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcli.errors import BadInput
from mmcli.formats.manifest import read_manifest, write_manifest

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
items = st.lists(
    st.fixed_dictionaries(
        {"id": st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)},
        optional={
            "text": st.one_of(texts, st.lists(texts, max_size=4)),
            "image": texts,
            "label": texts,
            "split": st.sampled_from(["train", "val", "test"]),
            "extra": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        },
    ),
    max_size=20,
    unique_by=lambda d: d["id"],
)


@settings(max_examples=60, deadline=None)
@given(items)
def test_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("m") / "m.jsonl"
    assert write_manifest(path, rows) == len(rows)
    back = [it.fields for it in read_manifest(path)]
    assert back == rows


def _write(tmp_path, lines):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "m.jsonl"
    p.write_text(json.dumps({"id": "a", "image": "imgs/a.jpg", "audio": "/abs/a.wav"}) + "\n")
    (item,) = read_manifest(p)
    assert item.path("image") == (tmp_path / "sub" / "imgs" / "a.jpg").resolve()
    assert str(item.path("audio")) == "/abs/a.wav"
    assert item.path("text") is None


def test_integer_ids_and_labels_become_strings(tmp_path):
    p = _write(tmp_path, ['{"id": 7, "label": 3, "text": "x"}'])
    (item,) = read_manifest(p)
    assert item.id == "7" and item.label == "3" and item.texts == ["x"]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{bad", "bad JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "no id"}', 'missing "id"'),
        ('{"id": ""}', '"id" is empty'),
        ('{"id": "x", "text": 3}', '"text" must be a string or a list'),
        ('{"id": "x", "image": ["a"]}', '"image" must be a string'),
        ('{"id": true}', '"id" must be a string or an integer'),
    ],
)
def test_bad_rows_name_the_line(tmp_path, line, reason):
    p = _write(tmp_path, ['{"id": "ok"}', "", line])
    with pytest.raises(BadInput) as e:
        list(read_manifest(p))
    assert "line 3 of m.jsonl" in str(e.value) and reason in str(e.value)
    errors = []
    kept = list(read_manifest(p, on_error="skip", errors=errors))
    assert [it.id for it in kept] == ["ok"]
    assert errors[0]["line"] == 3 and reason in errors[0]["reason"]


def test_duplicate_id_names_both_lines(tmp_path):
    p = _write(tmp_path, ['{"id": "a"}', '{"id": "b"}', '{"id": "a"}'])
    with pytest.raises(
        BadInput, match=r"line 3 of m.jsonl: duplicate id \"a\" \(first seen on line 1\)"
    ):
        list(read_manifest(p))


def test_not_utf8(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(BadInput, match="line 2 of m.jsonl: not valid UTF-8"):
        list(read_manifest(p))


def test_stdin(monkeypatch):
    data = '\ufeff{"id": "a", "text": "你好"}\n{"id": "b"}\n'.encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    got = list(read_manifest("-"))
    assert [it.id for it in got] == ["a", "b"] and got[0].texts == ["你好"]
    assert got[0].source == "<stdin>"


def test_write_is_atomic(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": "old"}\n')

    def rows():
        yield {"id": "new"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_manifest(p, rows())
    assert p.read_text() == '{"id": "old"}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["m.jsonl"]


def test_missing_manifest(tmp_path):
    with pytest.raises(BadInput, match="manifest not found"):
        list(read_manifest(tmp_path / "nope.jsonl"))
