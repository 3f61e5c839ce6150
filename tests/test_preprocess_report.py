"""preprocess's rough edges: an unknown --split names the splits there are, --max-skip
stops a run that skipped too much (exit 2, the count), upsampled images are counted once,
and the share of truncated captions comes with the context length that fits 99%."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mmcli.formats.tensorfile import TensorSet


def _data(tmp_path, n=10, bad=0, size=(24, 24), texts=None):
    rows = []
    for i in range(n):
        name = f"{i}.png"
        if i < bad:
            (tmp_path / name).write_bytes(b"not a png")
        else:
            Image.new("RGB", size, (i * 20, 0, 0)).save(tmp_path / name)
        text = texts[i] if texts else f"item {i}"
        rows.append({"id": f"i{i}", "image": name, "text": text,
                     "split": ("train", "val", "test")[i % 3]})  # fmt: skip
    m = tmp_path / "manifest.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def test_an_unknown_split_lists_the_splits_there_are(cli, tmp_path):
    m = _data(tmp_path)
    r = cli("preprocess", m, "-o", tmp_path / "o", "--split", "tst", "--image-size", "16")
    assert r.exit_code == 2 and r.stderr.count("\n") <= 2
    assert "--split tst: no item is in that split" in r.stderr
    assert "the data's splits: test, train, val" in r.stderr
    assert not (tmp_path / "o").exists()


def test_max_skip_stops_with_the_count(cli, tmp_path):
    m = _data(tmp_path, n=10, bad=6)  # 6 of 10 unreadable: above the default 50%
    r = cli("preprocess", m, "-o", tmp_path / "o", "--image-size", "16")
    assert r.exit_code == 2
    assert "6 of 10 items (60%) were skipped, more than --max-skip 50% (5)" in r.stderr
    assert "errors.jsonl" in r.stderr and len((tmp_path / "o" / "errors.jsonl").read_text()) > 0
    # the folder is not complete: readers refuse it ...
    rec = json.loads((tmp_path / "o" / "preprocess.json").read_text())
    assert rec["complete"] is False
    # ... and a higher limit finishes it with --resume
    r = cli("preprocess", m, "-o", tmp_path / "o", "--image-size", "16", "--resume",
            "--max-skip", "6")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert TensorSet(tmp_path / "o").ids() == [f"i{i}" for i in range(6, 10)]
    r = cli("preprocess", m, "-o", tmp_path / "o2", "--image-size", "16", "--max-skip", "5")
    assert r.exit_code == 2 and "more than --max-skip 5 (5)" in r.stderr
    r = cli("preprocess", m, "-o", tmp_path / "o3", "--max-skip", "lots")
    assert r.exit_code == 2 and "--max-skip 'lots' is not a count or a percentage" in r.stderr


def test_upsampled_images_are_counted_once(cli, tmp_path):
    m = _data(tmp_path, n=6, size=(24, 20))
    r = cli("preprocess", m, "-o", tmp_path / "o", "--image-size", "32", "--shard-size", "2")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("upsampled") == 1
    assert "6 of 6 images (100%) are smaller than --image-size 32 and were upsampled" in r.stderr
    summary = json.loads((tmp_path / "o" / "preprocess.json").read_text())["summary"]
    assert summary["upsampled_images"] == 6
    r = cli("preprocess", m, "-o", tmp_path / "o2", "--image-size", "20")
    assert r.exit_code == 0 and "upsampled" not in r.stderr
    assert (
        json.loads((tmp_path / "o2" / "preprocess.json").read_text())["summary"]["upsampled_images"]
        == 0
    )


def test_truncated_share_and_the_length_that_fits_99_percent(cli, tmp_path):
    # 100 captions: 97 of 10 bytes, 2 of 40, 1 of 200 (all ASCII: bytes == characters)
    texts = ["x" * 10] * 97 + ["y" * 40] * 2 + ["z" * 200]
    m = _data(tmp_path, n=100, texts=texts)
    r = cli("preprocess", m, "-o", tmp_path / "o", "--image-size", "8", "--context-length", "32")
    assert r.exit_code == 0, r.stderr
    s = json.loads((tmp_path / "o" / "preprocess.json").read_text())["summary"]
    lengths = np.array([len(t) for t in texts])
    assert s["truncated_captions"] == int((lengths + 2 > 32).sum()) == 3
    assert s["truncated_share"] == 0.03
    # 99% of captions are at most 40 bytes: 40 + BOS + EOS
    assert s["context_length_99"] == 42
    assert (
        "3 captions (3.0%) were cut at --context-length 32; --context-length 42 fits 99%"
        in r.stderr
    )


def test_a_manifest_given_to_extract_or_fuse_train_says_to_preprocess_it(cli, tmp_path):
    m = _data(tmp_path, n=3)
    for args in (["extract", m, "-o", tmp_path / "f", "-e", "image=tiny"],
                 ["fuse-train", m, "-o", tmp_path / "run", "--epochs", "1"]):  # fmt: skip
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert "this looks like a manifest (JSON text), not a safetensors tensor file" in r.stderr
        assert "mmcli preprocess MANIFEST -o DIR" in r.stderr
        assert "bad header" not in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(b"\xff" * 64)
    r = cli("extract", bad, "-o", tmp_path / "f2", "-e", "image=tiny")
    assert r.exit_code == 2 and "not a safetensors file (bad header" in r.stderr
