"""Query batches for a Python caller of Retriever: values, a feature file, JSONL lines
from any stream (a pipe, a file, an in-memory buffer)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from feature_files import write_features

from mmcli.errors import BadInput
from mmcli.search.queries import Query, feature_query_batches, line_query_batches, value_queries
from mmcli.search.retrieve import RetrieveConfig, Retriever

LINES = b'{"text": "a red circle"}\n\nnot json\n{"id": 7, "tag": "x"}\n\xff\n'


def _check_parsed(batches):
    flat = [q for b in batches for q in b]
    assert [type(q) for q in flat] == [Query, BadInput, Query, BadInput]
    assert (flat[0].kind, flat[0].value) == ("text", "a red circle")
    assert "line 3 of <stdin>: bad JSON" in str(flat[1]) and flat[1].raw["text"] == "not json"
    assert (flat[2].kind, flat[2].value, flat[2].raw) == ("id", "7", {"id": 7, "tag": "x"})
    assert str(flat[3]) == "line 5 of <stdin>: not valid UTF-8" and flat[3].raw == {"line": 5}


@pytest.mark.parametrize("wrap", [io.BytesIO, lambda b: io.StringIO(b.decode("latin-1"))])
def test_lines_from_a_stream_without_a_file_descriptor(wrap):
    data = LINES if wrap is io.BytesIO else LINES.replace(b"\xff\n", b"")
    batches = list(line_query_batches(wrap(data)))
    if wrap is io.BytesIO:
        _check_parsed(batches)
    else:
        assert [type(q) for b in batches for q in b] == [Query, BadInput, Query]


def test_lines_from_a_pipe_in_batches_of_at_most_max_batch():
    r, w = os.pipe()
    os.write(w, LINES)
    os.close(w)
    with os.fdopen(r, "rb") as stream:
        batches = list(line_query_batches(stream, max_batch=2, name="queries.jsonl"))
    assert len(batches) > 1 and all(1 <= len(b) <= 2 for b in batches)
    flat = [q for b in batches for q in b]
    assert [type(q) for q in flat] == [Query, BadInput, Query, BadInput]
    assert "line 3 of queries.jsonl" in str(flat[1])


def test_value_queries_echo_their_value():
    qs = value_queries(text=["a cat"], ids=["it1", "it2"])
    assert [(q.kind, q.value, q.raw) for q in qs] == [
        ("text", "a cat", {"text": "a cat"}),
        ("id", "it1", {"id": "it1"}),
        ("id", "it2", {"id": "it2"}),
    ]


def test_feature_rows_as_queries(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 8)).astype(np.float32)
    txt = rng.standard_normal((6, 8)).astype(np.float32)
    ti = np.array([0, 0, 1, 2, 3, 3])
    index = write_features(
        tmp_path / "f.safetensors", ["a", "b", "c", "d"], {"image": (img, np.arange(4))}
    )
    queries = write_features(tmp_path / "q.safetensors", ["a", "b", "c", "d"], {"text": (txt, ti)})
    retriever = Retriever(RetrieveConfig(index=[str(index)], k=2))
    batches = list(feature_query_batches([str(queries)], retriever, size=4))
    assert [len(b) for b in batches] == [4, 2]
    flat = [q for b in batches for q in b]
    assert [q.raw for q in flat[:3]] == [
        {"id": "a", "table": "text", "row": 0},
        {"id": "a", "table": "text", "row": 1},
        {"id": "b", "table": "text", "row": 0},
    ]
    np.testing.assert_array_equal(np.stack([np.asarray(q.value) for q in flat]), txt)
    lines = list(retriever.run(batches))
    assert len(lines) == 6 and all(len(line["hits"]) == 2 for line in lines)

    other = write_features(
        tmp_path / "o.safetensors", ["a"], {"text": (np.zeros((1, 4), np.float32), [0])}
    )
    with pytest.raises(BadInput, match="the text queries have 4 dimensions, the image index 8"):
        next(feature_query_batches([str(other)], retriever))
