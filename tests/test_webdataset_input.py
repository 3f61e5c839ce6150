"""preprocess reads webdataset tars: img2dataset's layout and CLIP_benchmark's, a folder of
tars and brace patterns, with corrupt samples skipped and listed, and resumable."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from killpoints import assert_same_tensors, run_until_event
from PIL import Image

from mmcli.data.importers import import_items
from mmcli.data.importers.layout import ImportOptions, detect_format
from mmcli.data.importers.webdataset import expand_braces
from mmcli.formats.archive import open_member
from mmcli.formats.tensorfile import TensorSet

PRE = ["--image-size", "32", "--on-error", "skip", "-q"]


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _img2dataset(root, shards=2, per=4) -> dict[str, bytes]:
    """img2dataset's output folder: NNNNN.tar with key.jpg/.txt/.json, parquet + stats
    beside. Returns the JPEG bytes by key."""
    root.mkdir(parents=True, exist_ok=True)
    jpegs = {}
    for s in range(shards):
        members = []
        for i in range(per):
            key = f"{s:05d}{i:04d}"
            jpegs[key] = _jpeg(s * 100 + i)
            meta = {"key": key, "url": f"https://example.com/{key}.jpg", "status": "success"}
            members += [
                (f"{key}.jpg", jpegs[key]),
                (f"{key}.txt", f"photo number {s * per + i}".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        _tar(root / f"{s:05d}.tar", members)
        (root / f"{s:05d}_stats.json").write_text("{}")
    (root / "00000.parquet").write_bytes(b"PAR1")  # beside the tars, not read
    return jpegs


def _items(path, **kw):
    opts = ImportOptions(**kw)
    fmt, items = import_items(str(path), "auto", opts)
    return fmt, list(items), opts.errors


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/{00..02}.tar") == ["d/00.tar", "d/01.tar", "d/02.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == [
        "a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"
    ]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_img2dataset_folder_is_detected_and_read(tmp_path):
    jpegs = _img2dataset(tmp_path / "wds")
    fmt, items, errors = _items(tmp_path / "wds")
    assert fmt == "webdataset" and errors == []
    assert [it.id for it in items] == sorted(jpegs)
    first = items[0]
    assert first.texts == ["photo number 0"]
    assert first.fields["url"] == f"https://example.com/{first.id}.jpg"
    assert open_member(first.path("image")).read() == jpegs[first.id]
    # one tar, and a brace pattern over both, give the same items
    _, one, _ = _items(tmp_path / "wds" / "00001.tar")
    assert [it.id for it in one] == sorted(jpegs)[4:]
    _, braced, _ = _items(f"{tmp_path}/wds/{{00000..00001}}.tar")
    assert [it.id for it in braced] == [it.id for it in items]


def test_preprocess_of_tars_equals_preprocess_of_the_same_files(tmp_path, cli):
    jpegs = _img2dataset(tmp_path / "wds")
    rows = []
    for key, data in jpegs.items():
        (tmp_path / f"{key}.jpg").write_bytes(data)
        rows.append({"id": key, "image": f"{key}.jpg", "text": ["x"]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("preprocess", tmp_path / "wds", "-o", tmp_path / "a", *PRE).exit_code == 0
    assert cli("preprocess", tmp_path / "m.jsonl", "-o", tmp_path / "b", *PRE).exit_code == 0
    a, b = TensorSet(tmp_path / "a"), TensorSet(tmp_path / "b")
    assert a.ids() == b.ids() and torch.equal(a.table("image")[0], b.table("image")[0])
    summary = json.loads((tmp_path / "a" / "preprocess.json").read_text())["summary"]
    assert summary["format"] == "webdataset"


def test_bad_samples_are_skipped_and_listed(tmp_path, cli):
    root = tmp_path / "wds"
    root.mkdir()
    good = [(f"k{i}.jpg", _jpeg(i)) for i in range(4)] + [
        (f"k{i}.txt", f"caption {i}".encode()) for i in range(4)
    ]
    good.sort(key=lambda m: m[0].split(".")[0])  # members of a sample are consecutive
    bad = [
        ("corrupt.jpg", b"\xff\xd8 not really a jpeg"),
        ("corrupt.txt", b"a corrupt image"),
        ("nocaption.jpg", _jpeg(9)),
        ("latin1.jpg", _jpeg(10)),
        ("latin1.txt", "caf\xe9".encode("latin-1")),
    ]
    _tar(root / "00000.tar", good + bad)
    _tar(root / "00001.tar", [("z0.jpg", _jpeg(20)), ("z0.txt", b"last"), ("z1.jpg", _jpeg(21))])
    with tarfile.open(root / "00001.tar") as tar:
        cut = tar.getmember("z1.jpg").offset_data + 100
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[:cut])  # cut inside z1.jpg
    r = cli("preprocess", root, "-o", tmp_path / "out", *PRE)
    assert r.exit_code == 0, r.stderr
    kept = TensorSet(tmp_path / "out").ids()
    assert kept == ["k0", "k1", "k2", "k3", "z0"]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").open()]
    reasons = {e.get("id"): e["reason"] for e in errors}
    assert "decode" in reasons["corrupt"]
    assert "no text" in reasons["nocaption"]
    assert "not UTF-8" in reasons["latin1"]
    assert any("truncated" in e["reason"] and "00001.tar" in str(e) for e in errors)


def test_clip_benchmark_layout_labels_splits_and_captions(tmp_path):
    root = tmp_path / "wds_toy"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="PNG")
    members = []
    for i in range(3):
        members += [
            (f"s{i:07d}.png", buf.getvalue()),
            (f"s{i:07d}.cls", str(i % 2).encode()),
            (f"s{i:07d}.txt", b"a cat\nan animal\n"),
        ]
    _tar(root / "test" / "0.tar", members)
    fmt, items, errors = _items(root)
    assert fmt == "webdataset" and errors == []
    assert [it.label for it in items] == ["cat", "dog", "cat"]
    assert {it.split for it in items} == {"test"}
    assert items[0].texts == ["a cat", "an animal"]


def test_not_a_tar_and_missing_pattern_shards_are_one_line(tmp_path, cli):
    (tmp_path / "x.tar").write_bytes(b"hello, not a tar" * 100)
    r = cli("preprocess", tmp_path / "x.tar", "-o", tmp_path / "o", *PRE)
    assert r.exit_code == 2 and "not a tar archive" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _img2dataset(tmp_path / "wds", shards=1)
    r = cli("preprocess", f"{tmp_path}/wds/{{00000..00003}}.tar", "-o", tmp_path / "o2", *PRE)
    assert r.exit_code == 2 and "3 of the 4 tars" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
    assert detect_format(str(tmp_path / "wds")) == "webdataset"


def test_preprocess_of_tars_killed_then_resumed_equals_a_clean_run(tmp_path):
    _img2dataset(tmp_path / "wds", shards=3, per=4)
    args = ["preprocess", tmp_path / "wds", *PRE, "--shard-size", "4"]
    clean, out = tmp_path / "clean", tmp_path / "killed"

    def run(*extra):
        cmd = [sys.executable, "-m", "mmcli", *map(str, args), *extra]
        return subprocess.run(cmd, capture_output=True)

    assert run("-o", str(clean)).returncode == 0
    r = run_until_event(
        [*args, "-o", out], event="rename", path=f"{out}/data-00001-of-00003.safetensors"
    )
    assert r.returncode == -signal.SIGKILL
    assert run("-o", str(out), "--resume").returncode == 0
    assert_same_tensors(clean, out)
    assert TensorSet(out).ids() == TensorSet(clean).ids() and len(TensorSet(out).ids()) == 12


# ---------------------------------------------------------------------------- parquet


def test_parquet_table_of_paths_and_captions(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for i in range(2):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i))
    table = pa.table(
        {
            "id": ["a", "a", "b", "c"],
            "filepath": ["0.jpg", "0.jpg", "1.jpg", "https://example.com/c.jpg"],
            "caption": ["one", "two", "three", "remote"],
            "label": [3, 3, 4, 5],
            "split": ["train", "train", "test", "train"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    fmt, items, errors = _items(tmp_path / "t.parquet")
    assert fmt == "parquet"
    assert [(it.id, it.texts, it.label, it.split) for it in items] == [
        ("a", ["one", "two"], "3", "train"),
        ("b", ["three"], "4", "test"),
    ]
    assert items[0].path("image") == tmp_path / "0.jpg"
    assert (
        len(errors) == 1 and "URL" in errors[0]["reason"] and "img2dataset" in errors[0]["reason"]
    )


def test_img2dataset_parquet_with_image_bytes(tmp_path, cli):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jpegs = [_jpeg(i) for i in range(6)]
    jpegs[4] = b"\xff\xd8 corrupt"
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(6)],
            "jpg": pa.array(jpegs, type=pa.binary()),
            "txt": [f"caption {i}" for i in range(6)],
            "url": [f"https://example.com/{i}.jpg" for i in range(6)],
            "status": ["success"] * 6,
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=4)  # 2 row groups
    r = cli(
        "preprocess", tmp_path / "00000.parquet", "-o", tmp_path / "out", "--text-col", "txt", *PRE
    )
    assert r.exit_code == 0, r.stderr
    ts = TensorSet(tmp_path / "out")
    assert ts.ids() == ["000000000", "000000001", "000000002", "000000003", "000000005"]
    for i, data in enumerate(jpegs):
        if i != 4:
            (tmp_path / f"{i}.jpg").write_bytes(data)
    rows = [{"id": f"{i:09d}", "image": f"{i}.jpg", "text": ["x"]} for i in (0, 1, 2, 3, 5)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("preprocess", tmp_path / "m.jsonl", "-o", tmp_path / "files", *PRE).exit_code == 0
    assert torch.equal(ts.table("image")[0], TensorSet(tmp_path / "files").table("image")[0])
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").open()]
    assert [e["id"] for e in errors] == ["000000004"]


def test_a_file_that_is_not_parquet_is_one_line(tmp_path, cli):
    pytest.importorskip("pyarrow")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    r = cli("preprocess", tmp_path / "bad.parquet", "-o", tmp_path / "o", *PRE)
    assert r.exit_code == 2 and "not a parquet file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_parquet_table_without_an_id_or_file_column_numbers_its_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["one", "two"]}), tmp_path / "t.parquet")
    _, items, _ = _items(tmp_path / "t.parquet")
    assert [(it.id, it.texts) for it in items] == [("1", ["one"]), ("2", ["two"])]
