"""mmcli caption (shards, files, stdin through a real pipe) and mmcli eval --task captioning:
data on stdout, one line and exit 2 for bad input."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest
from caption_data import one_caption_items, tensors_of, train_captioner


@pytest.fixture(scope="module")
def cap(toy_data, tmp_path_factory):
    """Tensors of 8 one-caption items and a captioner (briefly trained) with its inputs."""
    root = tmp_path_factory.mktemp("capcli")
    manifest = one_caption_items(toy_data, root / "data", n=8)
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
    for i, r in enumerate(rows):  # two items in a test split
        r["split"] = "test" if i < 2 else "train"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tensors = tensors_of(manifest, root / "tensors")
    train_captioner(tensors, root / "run", steps=8, batch_size=6)
    # a model without a caption decoder
    train_captioner(tensors, root / "plain", steps=1, batch_size=6, objectives={"contrastive": 1.0})
    return {
        "tensors": tensors,
        "model": root / "run" / "last.safetensors",
        "plain": root / "plain" / "last.safetensors",
        "images": [r["image"] for r in rows],
        "ids": [r["id"] for r in rows],
        "root": root,
    }


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_shards_one_line_per_item_and_split(cli, cap):
    r = cli("caption", cap["tensors"], "--model", cap["model"], "-q")
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [x["id"] for x in out] == cap["ids"]
    assert all(set(x) == {"id", "caption", "score"} and x["score"] <= 0 for x in out)
    r = cli("caption", cap["tensors"], "--model", cap["model"], "--split", "test", "-q")
    assert [x["id"] for x in lines(r.stdout)] == cap["ids"][:2]
    # beam search and its options; --no-cache writes the same captions
    b = cli("caption", cap["tensors"], "--model", cap["model"], "--beam", "3", "-q")
    nc = cli("caption", cap["tensors"], "--model", cap["model"], "--beam", "3", "--no-cache", "-q")
    assert [x["caption"] for x in lines(b.stdout)] == [x["caption"] for x in lines(nc.stdout)]
    short = cli("caption", cap["tensors"], "--model", cap["model"], "--max-tokens", "3", "-q")
    assert all(len(x["caption"].encode()) <= 3 for x in lines(short.stdout))


def test_files_as_arguments_match_the_shards(cli, cap):
    r = cli("caption", *cap["images"][:3], "--model", cap["model"], "-q")
    assert r.exit_code == 0, r.stderr
    files = lines(r.stdout)
    assert [x["id"] for x in files] == cap["images"][:3]
    shards = lines(cli("caption", cap["tensors"], "--model", cap["model"], "-q").stdout)
    # the files are preprocessed as the shards were: the same captions
    assert [x["caption"] for x in files] == [x["caption"] for x in shards[:3]]


def test_stdin_lines_answered_in_place(cli, cap):
    stdin = "\n".join(
        [
            json.dumps({"image": cap["images"][0], "id": "first"}),
            "not json",
            json.dumps({"image": str(cap["root"] / "missing.png")}),
            json.dumps({"text": "a caption is not a source"}),
            json.dumps({"image": cap["images"][1]}),
        ]
    )
    r = cli("caption", "--model", cap["model"], "-q", input=stdin + "\n")
    assert r.exit_code == 0, r.stderr
    out = lines(r.stdout)
    assert [x.get("id") for x in out] == ["first", None, None, None, cap["images"][1]]
    assert "bad JSON" in out[1]["error"] and "line 2 of <stdin>" in out[1]["error"]
    assert "file not found" in out[2]["error"] and "line 3 of <stdin>" in out[2]["error"]
    assert 'no "image" path' in out[3]["error"]
    r = cli("caption", "--model", cap["model"], "--on-error", "fail", "-q", input=stdin + "\n")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_streaming_stdin_through_a_real_pipe(cap):
    """A long-running caption answers each line as it arrives, stdin still open."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcli", "caption", "--model", str(cap["model"]), "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for image in cap["images"][:2]:
            proc.stdin.write((json.dumps({"image": image}) + "\n").encode())
            proc.stdin.flush()
            deadline = time.time() + 120
            ready = []
            while not ready and time.time() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                assert proc.poll() is None, proc.stderr.read().decode()
            assert ready, "no answer while stdin stays open"
            assert json.loads(proc.stdout.readline())["id"] == image
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_input_is_one_line_exit_2(cli, cap, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    cases = [
        (("caption", cap["tensors"], "--model", cap["plain"]), "has no caption decoder"),
        (("caption", broken, "--model", cap["model"]), "cannot decode image"),
        (("caption", cap["tensors"], "--model", cap["model"], "--split", "nope"), "no item of"),
        (("caption", cap["tensors"], cap["images"][0], "--model", cap["model"]), "not both"),
        (("caption", broken, "--model", cap["model"], "--split", "test"), "--split applies"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.stderr)
        assert r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_eval_captioning_from_a_captions_file_and_from_the_model(cli, cap, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(cli("caption", cap["tensors"], "--model", cap["model"], "-q").stdout)
    r = cli("eval", cap["tensors"], "--task", "captioning", "--captions", caps, "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["task"] == "captioning" and res["info"]["items"] == 8
    keys = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "WER"}
    assert set(res["metrics"]) == keys
    # the model captions the items itself (greedy): the same figures
    r2 = cli("eval", cap["tensors"], "--task", "captioning", "--model", cap["model"], "-q")
    assert json.loads(r2.stdout)["metrics"] == res["metrics"]
    # the references as captions: perfect scores; --split keeps the test items only
    from mmcli.evaluate.captioning import references_from_tensors
    from mmcli.formats.tensorfile import open_tensors

    refs = references_from_tensors(open_tensors(str(cap["tensors"])))
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text(
        "".join(json.dumps({"id": k, "caption": v[0]}) + "\n" for k, v in refs.items())
    )
    r = cli(
        "eval", cap["tensors"], "--task", "captioning", "--captions", perfect, "--split", "test"
    )
    res = json.loads(r.stdout)
    assert res["metrics"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and res["metrics"]["WER"] == 0
    assert res["info"]["items"] == 2


def test_eval_captioning_scores_against_the_full_captions_not_their_byte_cut(
    cli, toy_data, tmp_path
):
    """A reference longer than --context-length is the whole caption (text.raw): a
    generated caption equal to it scores perfectly, one equal to its byte cut does not."""
    manifest = one_caption_items(toy_data, tmp_path / "data", n=3)
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
    full = "a large blue circle in the center of a wide and empty grey field beside 红色圆形"
    rows[0]["text"] = [full]
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tensors = tmp_path / "tensors"
    r = cli("preprocess", manifest, "-o", tensors, "--image-size", 8, "--context-length", 24, "-q")
    assert r.exit_code == 0, r.stderr

    from mmcli.data.text import tokenizer_from_spec
    from mmcli.evaluate.captioning import references_from_tensors
    from mmcli.formats.tensorfile import open_tensors

    ts = open_tensors(str(tensors))
    refs = references_from_tensors(ts)
    assert refs[rows[0]["id"]] == [full]
    assert refs[rows[1]["id"]] == rows[1]["text"]
    cut = tokenizer_from_spec(ts.spec("text")).decode(ts.shards[0].numpy("text")[0])
    assert cut != full and full.startswith(cut)  # what the byte tokens alone would give
    scores = {}
    for name, caption in (("full", full), ("cut", cut)):
        caps = tmp_path / f"{name}.jsonl"
        caps.write_text(
            json.dumps({"id": rows[0]["id"], "caption": caption}, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        r = cli("eval", tensors, "--task", "captioning", "--captions", caps, "-q")
        assert r.exit_code == 0, r.stderr
        scores[name] = json.loads(r.stdout)["metrics"]
    assert scores["full"]["WER"] == 0 and scores["full"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cut"]["WER"] > 0.5


def test_eval_captioning_bad_input(cli, cap, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "not-an-item", "caption": "a red circle"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"\n')
    for args, message in [
        (("--captions", other), "not in the shards"),
        (("--captions", bad), "bad JSON"),
        ((), "needs --captions"),
        (("--captions", other, "--model", cap["model"]), "not both"),
    ]:
        r = cli("eval", cap["tensors"], "--task", "captioning", *args)
        assert r.exit_code == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
