"""preprocess: every importer on fixtures written here, corrupt inputs, resume, pipes."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmcli.data.importers import ImportOptions, detect_format, import_items
from mmcli.errors import BadInput
from mmcli.formats.describe import describe
from mmcli.formats.tensorfile import TensorSet
from mmcli.preprocess import PreprocessConfig, preprocess


def assert_same_shards(a, b):
    """Shards in folders a and b hold the same tensors and metadata (the output path aside)."""
    from safetensors.numpy import load_file

    from mmcli.formats.tensorfile import read_header

    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k])
        ma, mb = read_header(a / name)[1], read_header(b / name)[1]
        ma.pop("mmcli.source"), mb.pop("mmcli.source")
        assert ma == mb


SMALL = PreprocessConfig(image_size=16, audio_seconds=0.25, sample_rate=8000, context_length=24)


def _png(path, color=(255, 0, 0), size=(24, 18)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _wav(path, freq=440.0, sr=8000, seconds=0.3):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def manifest(tmp_path):
    """6 items with images, audio, English + Chinese captions; one corrupt image, one missing."""
    rows = []
    for i in range(6):
        _png(tmp_path / "imgs" / f"{i}.png", color=(40 * i, 0, 0))
        _wav(tmp_path / "wav" / f"{i}.wav", freq=200 + 100 * i)
        rows.append(
            {
                "id": f"i{i}",
                "image": f"imgs/{i}.png",
                "audio": f"wav/{i}.wav",
                "text": [f"item {i}", f"第{i}个红色的方块"],
                "label": "odd" if i % 2 else "even",
                "split": "test" if i == 5 else "train",
                "extra": {"k": i},
            }
        )
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows.insert(2, {"id": "bad", "image": "imgs/bad.png", "text": "corrupt"})
    rows.insert(4, {"id": "gone", "image": "imgs/missing.png", "text": "missing"})
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_manifest_to_shards(manifest, tmp_path):
    out = tmp_path / "out"
    config = PreprocessConfig(**{**SMALL.__dict__, "shard_size": 3})
    s = preprocess(str(manifest), str(out), config=config)
    assert (s["items"], s["kept"], s["skipped"], s["shards"]) == (8, 6, 2, 3)
    ts = TensorSet(out)
    assert ts.ids() == [f"i{i}" for i in range(6)]
    images, image_items = ts.table("image")
    assert images.shape == (6, 3, 16, 16) and images.dtype.is_floating_point is False
    assert image_items.tolist() == list(range(6))
    assert images[3, 0].float().mean() == pytest.approx(120, abs=2)  # red channel of item i3
    tokens, text_items = ts.table("text")
    assert tokens.shape == (12, 24) and text_items.tolist() == [i // 2 for i in range(12)]
    from mmcli.data.text import ByteTokenizer

    assert ByteTokenizer(24).decode(tokens[3].tolist()) == "第1个红色的方块"
    audio, _ = ts.table("audio")
    assert audio.shape == (6, 2000) and str(audio.dtype) == "torch.float16"
    assert ts.label_names == ["even", "odd"] and ts.labels().tolist() == [0, 1, 0, 1, 0, 1]
    # the normalized manifest: kept items in row order, paths relative to OUT, unknown keys kept
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ts.ids()
    assert lines[0]["image"] == "../imgs/0.png" and lines[0]["extra"] == {"k": 0}
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"bad", "gone"}
    assert any("file not found" in e["reason"] for e in errors)
    assert ts.source["manifest"] == str((out / "manifest.jsonl").resolve())


def test_split_and_modalities(manifest, tmp_path):
    config = PreprocessConfig(**{**SMALL.__dict__, "split": "test", "modalities": ["text"]})
    s = preprocess(str(manifest), str(tmp_path / "o"), config=config)
    ts = TensorSet(tmp_path / "o")
    assert s["kept"] == 1 and ts.tables == ["text"] and ts.ids() == ["i5"]


def test_on_error_fail_names_the_file_and_writes_nothing(manifest, tmp_path):
    config = PreprocessConfig(**{**SMALL.__dict__, "on_error": "fail", "shard_size": 100})
    with pytest.raises(
        BadInput, match=r"imgs/bad.png \(line 3 of m.jsonl, id bad\): cannot decode image"
    ):
        preprocess(str(manifest), str(tmp_path / "o"), config=config)
    assert not list((tmp_path / "o").glob("*.safetensors"))
    # nothing is left behind: not even the run's state, so a plain rerun is not refused
    assert not (tmp_path / "o").exists()
    config = PreprocessConfig(**{**SMALL.__dict__, "shard_size": 100})
    assert preprocess(str(manifest), str(tmp_path / "o"), config=config)["kept"] == 6


def test_parallel_workers_give_identical_shards(manifest, tmp_path):
    a = preprocess(
        str(manifest),
        str(tmp_path / "a"),
        config=PreprocessConfig(**{**SMALL.__dict__, "shard_size": 2}),
    )
    b = preprocess(
        str(manifest),
        str(tmp_path / "b"),
        config=PreprocessConfig(**{**SMALL.__dict__, "shard_size": 2, "workers": 2}),
    )
    assert a["shards"] == b["shards"] == 4
    assert_same_shards(tmp_path / "a", tmp_path / "b")


def test_existing_output_is_protected(manifest, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(BadInput, match="not empty"):
        preprocess(str(manifest), str(out), config=SMALL)
    preprocess(str(manifest), str(out), config=SMALL, overwrite=True)
    assert (out / "precious.txt").read_text() == "mine"
    with pytest.raises(BadInput, match="already holds a preprocess run"):
        preprocess(str(manifest), str(out), config=SMALL)
    with pytest.raises(BadInput, match="cannot resume: .* different options"):
        preprocess(str(manifest), str(out), config=PreprocessConfig(image_size=8), resume=True)


# ------------------------------------------------------------------ importers


def test_karpathy(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(tmp_path / "Images" / name)
    data = {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": "a.jpg",
                "split": "train",
                "sentences": [{"raw": "A dog runs."}, {"raw": "A brown dog."}],
            },
            {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A cat."}]},
            {"filename": "c.jpg", "split": "test", "sentences": [{"tokens": ["a", "bird"]}]},
        ],
    }
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    path = str(tmp_path / "dataset_flickr8k.json")
    assert detect_format(path) == "karpathy"
    fmt, items = import_items(path, "auto", ImportOptions(images_dir=str(tmp_path / "Images")))
    items = list(items)
    assert [it.id for it in items] == ["a", "b", "c"]
    assert items[0].texts == ["A dog runs.", "A brown dog."] and items[2].texts == ["a bird"]
    assert [it.split for it in items] == ["train", "train", "test"]
    out = tmp_path / "o"
    config = PreprocessConfig(**{**SMALL.__dict__, "split": "test"})
    preprocess(
        path,
        str(out),
        config=config,
        import_options=ImportOptions(images_dir=str(tmp_path / "Images")),
    )
    assert TensorSet(out).ids() == ["c"]


def test_coco_captions(tmp_path):
    _png(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    _png(tmp_path / "val2014" / "COCO_val2014_000000000073.jpg")
    data = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
            {"id": 73, "file_name": "COCO_val2014_000000000073.jpg"},
        ],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A man. "},
            {"image_id": 73, "id": 2, "caption": "A bus."},
            {"image_id": 42, "id": 3, "caption": "A person."},
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(data))
    path = str(tmp_path / "captions_val2014.json")
    assert detect_format(path) == "coco"
    preprocess(
        path,
        str(tmp_path / "o"),
        config=SMALL,
        import_options=ImportOptions(images_dir=str(tmp_path / "val2014")),
    )
    ts = TensorSet(tmp_path / "o")
    assert ts.ids() == ["42", "73"] and ts.rows("text") == 3
    assert ts.table("text")[1].tolist() == [0, 0, 1]
    lines = [json.loads(x) for x in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert lines[0]["split"] == "val" and lines[0]["text"] == ["A man.", "A person."]


def test_imagefolder_with_split_folders(tmp_path):
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            _png(tmp_path / "root" / split / label / f"{split}_{label}.png")
    root = str(tmp_path / "root")
    assert detect_format(root) == "imagefolder"
    preprocess(root, str(tmp_path / "o"), config=SMALL)
    ts = TensorSet(tmp_path / "o")
    assert ts.ids() == [
        "train/cat/train_cat",
        "train/dog/train_dog",
        "val/cat/val_cat",
        "val/dog/val_dog",
    ]
    assert [ts.label_names[i] for i in ts.labels()] == ["cat", "dog", "cat", "dog"]
    manifest = [json.loads(x) for x in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert [m["split"] for m in manifest] == ["train", "train", "val", "val"]


def test_audiofolder(tmp_path):
    for label, freq in (("low", 200), ("high", 2000)):
        for k in range(2):
            _wav(tmp_path / "sounds" / label / f"{k}.wav", freq=freq)
    _wav(tmp_path / "sounds" / "high" / "x.flac").unlink()
    sf.write(
        tmp_path / "sounds" / "high" / "x.flac", np.zeros(800, np.float32), 8000, format="FLAC"
    )
    root = str(tmp_path / "sounds")
    assert detect_format(root) == "audiofolder"
    preprocess(root, str(tmp_path / "o"), config=SMALL)
    ts = TensorSet(tmp_path / "o")
    assert ts.tables == ["audio"] and ts.num_items == 5 and ts.label_names == ["high", "low"]


def test_csv_groups_captions_by_image(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    with open(tmp_path / "caps.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "caption", "category", "source"])
        w.writerows(
            [
                ["a.png", "first a", "x", "web"],
                ["b.png", "only b", "y", "web"],
                ["a.png", "second a", "x", "web"],
            ]
        )
    path = str(tmp_path / "caps.tsv")
    assert detect_format(path) == "csv"
    _, items = import_items(path)
    items = list(items)
    assert [it.id for it in items] == ["a.png", "b.png"]
    assert items[0].texts == ["first a", "second a"] and items[0].label == "x"
    assert items[0].fields["source"] == "web"  # unknown columns are kept
    with pytest.raises(BadInput, match="no column 'nope' for --image-col"):
        list(import_items(path, "csv", ImportOptions(image_col="nope"))[1])


def test_csv_on_stdin_through_a_pipe(run_mmcli, tmp_path):
    """A pipe cannot seek: the CSV delimiter sniffing must not need it."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    data = b"image;text;label\na.png;a red one;x\nb.png;a blue one;y\n"
    r = run_mmcli(
        "preprocess", "-", "-f", "csv", "-o", tmp_path / "o", "--image-size", "16", "-q",
        input=data, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    ts = TensorSet(tmp_path / "o")
    assert ts.ids() == ["a.png", "b.png"] and ts.label_names == ["x", "y"]
    r = run_mmcli("preprocess", "-", "-f", "csv", "-o", tmp_path / "o2", input=b"\xff\xfe,x\n")
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"<stdin>: not valid UTF-8" in r.stderr


def test_imagefolder_with_symlinked_files(tmp_path):
    """Class folders of links to files elsewhere (a shared store) are read, named by their
    path under ROOT."""
    store = tmp_path / "store"
    _png(store / "x1.png")
    _png(store / "x2.png", color=(0, 255, 0))
    for label, name in (("cat", "x1"), ("dog", "x2")):
        (tmp_path / "root" / label).mkdir(parents=True)
        (tmp_path / "root" / label / f"{name}.png").symlink_to(store / f"{name}.png")
    preprocess(str(tmp_path / "root"), str(tmp_path / "o"), config=SMALL)
    ts = TensorSet(tmp_path / "o")
    assert ts.ids() == ["cat/x1", "dog/x2"]
    assert int(ts.shards[0].numpy("image")[1, 1].max()) == 255  # the green one, decoded


def test_unknown_layouts(tmp_path):
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(BadInput, match="neither a Karpathy split file nor a COCO"):
        detect_format(str(tmp_path / "x.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images, audio or video"):
        detect_format(str(tmp_path / "empty"))


# ------------------------------------------------------------------ CLI and pipes


def test_cli_summary_and_errors(cli, manifest, tmp_path):
    r = cli(
        "preprocess",
        manifest,
        "-o",
        tmp_path / "o",
        "--image-size",
        "16",
        "--audio-seconds",
        "0.25",
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "detected format: jsonl" in r.stderr and "preprocessed 6 of 8 items" in r.stderr
    r = cli("preprocess", manifest, "-o", tmp_path / "o2", "--on-error", "fail")
    assert r.exit_code == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: imgs/bad.png (line 3 of m.jsonl, id bad)")
    )
    assert "Traceback" not in r.stderr
    r = cli("preprocess", tmp_path / "nope.jsonl", "-o", tmp_path / "o3")
    assert r.exit_code == 2 and "input not found" in r.stderr


def test_stdin_to_stdout_pipe(run_mmcli, manifest, tmp_path):
    """cat m.jsonl | mmcli preprocess - -o - | mmcli info - --json, through real processes."""
    os.chdir(tmp_path)  # relative paths on stdin resolve against the working directory
    p1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmcli",
            "preprocess",
            "-",
            "-o",
            "-",
            "--image-size",
            "16",
            "--audio-seconds",
            "0.25",
            "-q",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    p2 = subprocess.Popen(
        [sys.executable, "-m", "mmcli", "info", "-", "--json"],
        stdin=p1.stdout,
        stdout=subprocess.PIPE,
    )
    p1.stdin.write(manifest.read_bytes())
    p1.stdin.close()
    p1.stdout.close()
    out, _ = p2.communicate(timeout=120)
    assert p1.wait(timeout=60) == 0 and p2.returncode == 0
    info = json.loads(out)
    assert info["items"] == 6 and info["tables"]["image"]["shape"] == [3, 16, 16]
    assert info["tables"]["text"]["rows"] == 12 and info["stats"]["skipped"] == 2


def test_resume_after_kill(run_mmcli, tmp_path):
    """Kill a run after some shards exist, resume it, and get the same bytes as a clean run."""
    rows = []
    for i in range(40):
        _png(tmp_path / "imgs" / f"{i}.png", color=(i * 6, 100, 0), size=(400, 300))
        rows.append({"id": str(i), "image": f"imgs/{i}.png", "text": f"picture {i}"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        sys.executable,
        "-m",
        "mmcli",
        "preprocess",
        str(manifest),
        "--image-size",
        "64",
        "--shard-size",
        "2",
        "-q",
    ]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "-o", str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("data-*.safetensors"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("data-*.safetensors")}
    assert 3 <= len(done_before) < 20, "the run was not interrupted mid-way"
    assert not (out / "manifest.jsonl").exists()
    with pytest.raises(BadInput, match="incomplete shard set"):
        TensorSet(out)
    r = run_mmcli(
        "preprocess", manifest, "-o", out, "--image-size", "64", "--shard-size", "2", "--resume"
    )
    assert r.returncode == 0, r.stderr
    assert b"resuming:" in r.stderr
    for name, mtime in done_before.items():  # finished shards were kept, not redone
        assert (out / name).stat().st_mtime_ns == mtime
    clean = tmp_path / "clean"
    assert run_mmcli(*args[3:], "-o", clean).returncode == 0
    assert_same_shards(clean, out)
    assert (clean / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()
    assert describe(out)[0]["items"] == 40


def test_a_folder_holding_a_manifest_means_the_manifest(manifest, tmp_path):
    """`mmcli preprocess DATA/` where DATA/manifest.jsonl exists (the toy data's layout,
    with images/ and audio/ subfolders) reads the manifest, not an ImageFolder."""
    (tmp_path / "manifest.jsonl").write_text(manifest.read_text(encoding="utf-8"), "utf-8")
    s = preprocess(str(tmp_path), str(tmp_path / "o"), config=SMALL)
    assert s["format"] == "jsonl" and s["kept"] == 6
    assert TensorSet(tmp_path / "o").tables == ["image", "text", "audio"]


def test_imagefolder_ids_stay_unique_when_only_the_extension_differs(tmp_path):
    _png(tmp_path / "if" / "blue" / "a.png")
    _png(tmp_path / "if" / "blue" / "a.jpg", color=(0, 0, 255))
    _png(tmp_path / "if" / "blue" / "b.png")
    _, items = import_items(str(tmp_path / "if"), "imagefolder")
    assert [it.id for it in items] == ["blue/a.jpg", "blue/a.png", "blue/b"]


def test_resume_refuses_an_input_whose_items_changed(manifest, tmp_path):
    out = tmp_path / "o"
    preprocess(str(manifest), str(out), config=SMALL)
    (out / "preprocess.json").write_text(
        (out / "preprocess.json").read_text().replace('"complete": true', '"complete": false')
    )
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("item 3", "CHANGED"), "utf-8")
    with pytest.raises(BadInput, match="cannot resume: .*different items .*captions"):
        preprocess(str(manifest), str(out), config=SMALL, resume=True)


def test_every_item_skipped_is_an_error_not_an_empty_dataset(tmp_path, cli):
    data = {"images": [{"filename": f"{n}.jpg", "split": "test", "sentences": [{"raw": n}]}
                       for n in ("a", "b")]}  # fmt: skip
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    r = cli("preprocess", path, "-o", tmp_path / "o", "-q")
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert "\n" not in err and "every item was skipped (2)" in err and "--images-dir" in err
    # the reasons stay listed; no shards, manifest or run state are left
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["errors.jsonl"]
    r = cli("preprocess", path, "-o", "-", "-q")
    assert r.exit_code == 2 and r.stdout == "" and "every item was skipped" in r.stderr


def test_bad_json_inputs_are_one_line(tmp_path, cli):
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.json").write_bytes(b'{"images": ["caf\xe9"]}')
    (tmp_path / "t.csv").write_text("image,text\na.png,a cat\n")
    for args, message in (
        (["folder", "--format", "karpathy"], "expected a JSON file, got a folder"),
        (["latin1.json"], "not a UTF-8 text file"),
        (["latin1.json", "--format", "coco"], "not a UTF-8 text file"),
        (["t.csv", "--format", "jsonl"], "all 2 were rejected .*is --format jsonl right"),
    ):
        r = cli("preprocess", *(tmp_path / args[0], *args[1:]), "-o", tmp_path / "o", "-q")
        assert r.exit_code == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert re.search(message, r.stderr), r.stderr


def test_counts_include_rejected_lines(manifest, tmp_path):
    manifest.write_text(
        manifest.read_text(encoding="utf-8") + '{"id": "i0", "text": "again"}\n', "utf-8"
    )
    s = preprocess(str(manifest), str(tmp_path / "o"), config=SMALL)
    assert (s["items"], s["kept"], s["skipped"]) == (9, 6, 3)


def _corrupt_inputs(tmp_path):
    """A manifest with one good item and each kind of bad input the issue lists."""
    from io import BytesIO

    good = _png(tmp_path / "good.png")
    buf = BytesIO()
    Image.new("RGB", (64, 48), (0, 200, 0)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    lines = [
        json.dumps({"id": "ok", "image": good.name, "text": "fine"}),
        json.dumps({"id": "cut", "image": "cut.jpg", "text": "truncated jpeg"}),
        json.dumps({"id": "deaf", "audio": "noise.wav", "text": "unreadable audio"}),
        json.dumps({"id": "gone", "image": "nowhere.png", "text": "missing file"}),
        '{"id": "broken", "text": ',
        json.dumps({"id": "ok", "text": "duplicate id"}),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_corrupt_input_through_preprocess_in_both_modes(tmp_path, cli):
    manifest = _corrupt_inputs(tmp_path)
    # skip: every bad input is skipped, counted and listed with its reason
    r = cli("preprocess", manifest, "-o", tmp_path / "skip", "--image-size", "16",
            "--audio-seconds", "0.25", "--max-skip", "100%", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert TensorSet(tmp_path / "skip").ids() == ["ok"]
    errors = {
        e.get("id") or f"line {e.get('line')}": e["reason"]
        for e in map(json.loads, (tmp_path / "skip" / "errors.jsonl").read_text().splitlines())
    }
    assert "cannot decode image" in errors["cut"]
    assert "audio" in errors["deaf"].lower()
    assert "file not found" in errors["gone"]
    assert any("bad JSON" in v for v in errors.values())
    assert any("duplicate id" in v for v in errors.values())
    # fail: the first bad input stops the run with one line naming it, and nothing is written
    r = cli("preprocess", manifest, "-o", tmp_path / "fail", "--on-error", "fail", "-q")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "line 5" in r.stderr and "bad JSON" in r.stderr  # the manifest is read first
    assert not (tmp_path / "fail").exists()
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:4]) + "\n")  # without the bad lines
    r = cli("preprocess", manifest, "-o", tmp_path / "fail", "--on-error", "fail", "-q")
    assert (
        r.exit_code == 2 and "cut.jpg (line 2 of m.jsonl, id cut): cannot decode image" in r.stderr
    )
    assert not (tmp_path / "fail").exists()


def test_the_cli_offers_exactly_the_importers_formats():
    """cli/preprocess.py spells the formats out (importing the importers would slow
    `--help`): the two lists must not drift apart."""
    import typing

    from mmcli.cli.preprocess import Format
    from mmcli.data.importers import FORMATS

    assert typing.get_args(Format) == FORMATS
