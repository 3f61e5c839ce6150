"""mmcli retrieve: every query route (arguments, feature file, stdin JSONL through a real
pipe), exact results, manifest fields, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from feature_files import make_pipeline, toy_pairs, write_features, write_manifest

from mmcli.formats.features import FeatureSet
from mmcli.search.exact import exact_search_reference
from mmcli.search.queries import QueryEncoder, load_model


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return make_pipeline(tmp_path_factory.mktemp("pipe"), cli)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Image + text features of 30 items (1-5 captions each) with a manifest."""
    root = tmp_path_factory.mktemp("toy")
    img, ii, txt, ti = toy_pairs(30, 16)
    ids = [f"it{i}" for i in range(30)]
    rows = [
        {
            "id": ids[i],
            "image": f"imgs/{i}.png",
            "text": [f"caption {i}.{j}" for j in range(int((ti == i).sum()))],
        }
        for i in range(30)
    ]
    write_manifest(root / "data" / "manifest.jsonl", rows)
    src = {"manifest": str(root / "data" / "manifest.jsonl")}
    write_features(
        root / "f-00000-of-00002.safetensors",
        ids[:20],
        {"image": (img[:20], ii[:20]), "text": (txt[ti < 20], ti[ti < 20])},
        source=src,
        index=0,
        count=2,
    )
    write_features(
        root / "f-00001-of-00002.safetensors",
        ids[20:],
        {"image": (img[20:], ii[20:] - 20), "text": (txt[ti >= 20], ti[ti >= 20] - 20)},
        source=src,
        index=1,
        count=2,
    )
    return {"root": root, "img": img, "txt": txt, "ti": ti, "ids": ids}


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_id_query_matches_a_full_sort_and_attaches_resolved_fields(cli, toy):
    r = cli("retrieve", "--index", toy["root"], "--id", "it7", "--id", "it21", "-k", "5",
            "--no-exclude-self")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [o["query"] for o in out] == [{"id": "it7"}, {"id": "it21"}]
    want, scores = exact_search_reference(
        torch.from_numpy(toy["img"][[7, 21]]), torch.from_numpy(toy["img"]), 5
    )
    for o, w, s in zip(out, want, scores):
        assert [h["id"] for h in o["hits"]] == [toy["ids"][j] for j in w]
        assert [h["rank"] for h in o["hits"]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h["score"] for h in o["hits"]], s, rtol=1e-6)
        hit = o["hits"][0]
        assert hit["item"]["image"] == str(toy["root"] / "data" / "imgs" / f"{w[0]}.png")
        assert hit["item"]["text"][0] == f"caption {w[0]}.0"


def test_caption_targets_give_the_row_and_threshold_drops(cli, toy):
    r = cli(
        "retrieve",
        "--index",
        toy["root"],
        "--id",
        "it3",
        "--target",
        "text",
        "--query-table",
        "image",
        "-k",
        "8",
        "--threshold",
        "0.5",
        "--no-fields",
    )
    assert r.exit_code == 0, r.stderr
    (o,) = lines(r.stdout)
    assert o["hits"] and all(h["score"] >= 0.5 for h in o["hits"])
    assert all("item" not in h and isinstance(h["row"], int) for h in o["hits"])
    assert o["hits"][0]["id"] == "it3"


def test_feature_file_queries_one_line_per_row(cli, toy, tmp_path):
    q = tmp_path / "q.safetensors"
    write_features(q, ["a", "b"], {"text": (toy["txt"][:3], np.array([0, 0, 1]))})
    r = cli("retrieve", "--index", toy["root"], "--queries", q, "-k", "3", "--no-fields")
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [o["query"] for o in out] == [
        {"id": "a", "table": "text", "row": 0},
        {"id": "a", "table": "text", "row": 1},
        {"id": "b", "table": "text", "row": 0},
    ]
    want, _ = exact_search_reference(
        torch.from_numpy(toy["txt"][:3]), torch.from_numpy(toy["img"]), 3
    )
    assert [[h["id"] for h in o["hits"]] for o in out] == [[toy["ids"][j] for j in w] for w in want]


def test_stdin_lines_bad_lines_answered_in_place(cli, toy):
    stdin = '{"id": "it1"}\nnot json\n\n{"id": "missing"}\n{"id": "it2", "tag": 7}\n{"text": "x"}\n'
    r = cli("retrieve", "--index", toy["root"], "-k", "1", "--no-fields", "--no-exclude-self",
            input=stdin)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert len(out) == 5
    assert out[0]["hits"][0]["id"] == "it1"
    assert out[1]["query"] == {"line": 2, "text": "not json"} and "bad JSON" in out[1]["error"]
    assert "missing" in out[2]["error"]
    assert out[3]["query"] == {"id": "it2", "tag": 7} and out[3]["hits"][0]["id"] == "it2"
    assert "--model" in out[4]["error"]
    assert r.stderr.count("warning:") == 3
    failing = cli(
        "retrieve",
        "--index",
        toy["root"],
        "--on-error",
        "fail",
        input='{"id": "it1"}\n{"id": "nope"}\n',
    )
    assert (
        failing.exit_code == 2
        and failing.stderr.startswith("error: ")
        and failing.stderr.count("\n") == 1
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--index", "nowhere/"], "file not found"),
        (["--id", "it1", "--target", "audio"], "no audio table"),
        (["--text", "a cat"], "need --model"),
        (["--id", "it1", "-k", "0"], "Invalid value"),
        (["--id", "it1", "--device", "gpu"], "bad device 'gpu'"),
        (["--id", "it1", "--threshold", "nan"], "--threshold must be a number"),
        (["--id", "it1", "--nprobe", "4"], "--nprobe applies to --backend faiss"),
        (["--id", "it1", "--rescore", "40"], "--rescore applies to --backend faiss"),
    ],
)
def test_bad_input_one_line_exit_2(cli, toy, args, message):
    if args[0] != "--index":
        args = ["--index", str(toy["root"]), *args]
    r = cli("retrieve", *args)
    assert r.exit_code == 2
    assert message in r.stderr


def test_feature_queries_of_another_width_stop_once(cli, toy, tmp_path):
    q = write_features(
        tmp_path / "q.safetensors",
        ["a", "b"],
        {"image": (np.ones((2, 8), np.float32), np.arange(2))},
    )
    r = cli("retrieve", "--index", toy["root"], "--queries", q, "--target", "image")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert "the image queries have 8 dimensions, the image index 16" in r.stderr


def test_a_model_trained_on_the_index_features_is_not_the_indexs_model(cli, pipe, tmp_path):
    """A model trained on the index's features maps them into another space: text queries it
    encodes do not belong with the index, one line says so."""
    r = cli("fuse-train", pipe["features"], "-o", tmp_path / "heads", "--max-steps", "1",
            "--batch-size", "4", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("retrieve", "--index", pipe["features"], "--model", tmp_path / "heads" /
            "last.safetensors", "--text", "a red circle")  # fmt: skip
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "is another model" in r.stderr


def test_missing_faiss_says_how_to_install(cli, toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    r = cli("retrieve", "--index", toy["root"], "--id", "it1", "--backend", "faiss")
    assert r.exit_code == 2
    assert (
        r.stderr
        == 'error: faiss-cpu is not installed (needed for --backend faiss); install it with: pip install "mmcli[faiss]"\n'
    )


# ------------------------------------------------------------------ with a model


def test_raw_queries_are_preprocessed_like_the_index(cli, pipe):
    feats = FeatureSet.open(pipe["features"])
    enc = QueryEncoder(load_model(str(pipe["model"])))
    x, items = feats.table("image")
    q = enc.encode("image", [str(pipe["root"] / "raw" / "imgs" / "3.png")])
    # the same pixels through the same transform and model: equal up to float16 storage
    assert torch.allclose(q[0], x[3], atol=2e-3)
    t, titems = feats.table("text")
    qt = enc.encode("text", ["a red circle"])
    assert torch.allclose(qt[0], t[0], atol=2e-3)

    r = cli(
        "retrieve",
        "--index",
        pipe["features"],
        "--model",
        pipe["model"],
        "--text",
        "red circle number 1",
        "--target",
        "text",
        "-k",
        "1",
    )
    assert r.exit_code == 0, r.stderr
    (o,) = lines(r.stdout)
    assert o["hits"][0]["id"] == "x1" and o["hits"][0]["row"] == 1
    assert o["hits"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    r = cli(
        "retrieve",
        "--index",
        pipe["features"],
        "--model",
        pipe["model"],
        "--image",
        pipe["root"] / "raw" / "imgs" / "5.png",
        "-k",
        "12",
    )
    (o,) = lines(r.stdout)
    score = {h["id"]: h["score"] for h in o["hits"]}
    assert score["x5"] == pytest.approx(1.0, abs=2e-3)
    assert os.path.exists(o["hits"][0]["item"]["image"])


def test_streaming_stdin_through_a_real_pipe(pipe):
    """A long-running retrieve answers each line as it arrives, stdin still open."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmcli",
            "retrieve",
            "--index",
            str(pipe["features"]),
            "--model",
            str(pipe["model"]),
            "-k",
            "2",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for text in ("a red circle", "a blue square"):
            proc.stdin.write((json.dumps({"text": text}) + "\n").encode())
            proc.stdin.flush()
            deadline = time.time() + 120
            ready = []
            while not ready and time.time() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                assert proc.poll() is None, proc.stderr.read().decode()
            assert ready, "no answer while stdin stays open"
            line = json.loads(proc.stdout.readline())
            # what `jq -r .hits[0].item.image` would print: a usable path
            assert line["query"] == {"text": text}
            assert len(line["hits"]) == 2 and os.path.exists(line["hits"][0]["item"]["image"])
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()


def test_split_restricts_the_index_not_the_queries(cli, pipe):
    r = cli("retrieve", "--index", pipe["features"], "--id", "x0", "--split", "test", "-k", "20")
    assert r.exit_code == 0, r.stderr
    (o,) = lines(r.stdout)
    assert o["query"] == {"id": "x0"}  # a train item may query the test items
    assert len(o["hits"]) == 4 and {h["item"]["split"] for h in o["hits"]} == {"test"}
    r = cli("retrieve", "--index", pipe["features"], "--id", "x0", "--split", "nope")
    assert r.exit_code == 2 and "no item of split 'nope'" in r.stderr and "train" in r.stderr


def test_a_moved_folder_tree_still_finds_its_manifest(tmp_path):
    """Shards record their manifest's absolute path and its path relative to them: after
    the whole tree is moved (or copied to another machine) item fields and splits are
    still found."""
    import shutil

    from typer.testing import CliRunner

    from mmcli.cli.app import app
    from mmcli.train.data import load_dataset

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    paths = make_pipeline(tmp_path / "before", cli)
    shutil.move(str(paths["root"]), tmp_path / "after")
    root = tmp_path / "after"
    r = cli(
        "retrieve", "--index", root / "feats", "--id", "x0", "--target", "text", "-k", "1", "-q",
        "--no-exclude-self",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    hit = json.loads(r.stdout.splitlines()[0])["hits"][0]
    assert hit["item"]["label"] == "red"
    assert hit["item"]["image"] == os.path.normpath(root / "raw" / "imgs" / "0.png")
    assert os.path.isfile(hit["item"]["image"])
    # the training splits come from the manifest too, for tensors and features alike
    for data in ("tensors", "feats"):
        assert len(load_dataset([str(root / data)]).subset("train")) == 4


def test_table_for_people_on_stderr_data_on_stdout(cli, toy):
    r = cli("retrieve", "--index", toy["root"], "--id", "it3", "--target", "image", "-k", "2",
            "--table", "--no-exclude-self")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    line = json.loads(r.stdout)  # stdout is still one JSON line per query
    assert [h["id"] for h in line["hits"]][0] == "it3"
    assert "it3" in r.stderr and "score" in r.stderr.lower()
