"""Kills, signals and concurrent writers: preprocess, extract and eval as real processes
(tests/killpoints.py), resumed and compared with an uninterrupted run by torch.equal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from killpoints import assert_same_tensors, run_until_event, signal_at_event, temp_files

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import TensorSet

PRE = [
    "--image-size",
    "16",
    "--audio-seconds",
    "0.25",
    "--shard-size",
    "24",
]  # 16 kHz: no resampling
SHARDS = [f"data-0000{i}-of-00004.safetensors" for i in range(4)]
ENC = ["-e", "image=tiny", "-e", "text=tiny", "-e", "audio=tiny", "--device", "cpu"]


def _lines(stderr: bytes) -> list[str]:
    return stderr.decode().strip().splitlines()


def _one_line(r, code=2) -> str:
    lines = _lines(r.stderr)
    assert r.returncode == code and len(lines) == 1, r.stderr.decode()
    return lines[0]


@pytest.fixture(scope="module")
def clean(toy_data, tmp_path_factory):
    """An uninterrupted preprocess of the toy data (4 shards), as a process."""
    out = tmp_path_factory.mktemp("kills") / "clean"
    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "preprocess", toy_data, "-o", out, *PRE, "-q"]
    )
    assert r.returncode == 0
    return out


def _preprocess(toy_data, out, *extra):
    return ["preprocess", toy_data, "-o", out, *PRE, "-q", *extra]


def _assert_same_run(clean, out):
    assert_same_tensors(clean, out)
    assert (clean / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()
    assert json.loads((out / "preprocess.json").read_text())["complete"] is True
    assert temp_files(out) == [] and not list(out.parent.glob(f".{out.name}.lock"))


# ------------------------------------------------------------------ preprocess


@pytest.mark.parametrize(
    "path, nth, late",
    [
        ("data-00002-of-00004.safetensors", 1, False),  # mid-run
        ("manifest.jsonl", 1, True),  # after the last shard, before the manifest
        ("preprocess.json", 2, True),  # after the manifest, before the completion record
    ],
)
def test_preprocess_killed_then_resumed_equals_a_clean_run(
    toy_data, clean, tmp_path, cli, path, nth, late
):
    out = tmp_path / "killed"
    r = run_until_event(_preprocess(toy_data, out), event="rename", path=f"{out}/{path}", nth=nth)
    assert r.returncode == -signal.SIGKILL and r.stderr == b""
    assert temp_files(out), "the write being committed is left as a temporary file"
    record = json.loads((out / "preprocess.json").read_text())
    assert record["complete"] is False
    if late:  # every shard is there: only the completion record tells
        assert all((out / s).exists() for s in SHARDS)
        with pytest.raises(BadInput, match="unfinished preprocess output.*--resume"):
            TensorSet(out)
        for reader in (
            ["info", out],
            ["fuse-train", out, "-o", tmp_path / "run", "--encoder", "image=tiny"],
        ):
            res = cli(*reader)
            assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
            assert "unfinished preprocess output" in res.stderr and "--resume" in res.stderr
        assert not (tmp_path / "run").exists()
    res = subprocess.run(
        [sys.executable, "-m", "mmcli", *map(str, _preprocess(toy_data, out, "--resume"))]
    )
    assert res.returncode == 0
    _assert_same_run(clean, out)


def test_a_folder_without_a_completion_record_reads_as_before(clean, tmp_path):
    """Folders that have no preprocess.json (made by hand, or by extract) keep the old
    rules: complete when every shard is there."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    (copy / "preprocess.json").unlink()
    assert TensorSet(copy).num_items == TensorSet(clean).num_items == 96
    (copy / SHARDS[1]).unlink()
    with pytest.raises(BadInput, match="incomplete shard set.*--resume"):
        TensorSet(copy)


def test_killed_workers_print_nothing(toy_data, tmp_path):
    """kill -9 of preprocess --workers 2 mid-run: no BrokenPipe traceback from the workers."""
    out = tmp_path / "o"
    args = _preprocess(toy_data, out, "--workers", "2", "--shard-size", "8")
    r = run_until_event(args, event="rename", path=f"{out}/data-00003-*", nth=1)
    assert r.returncode == -signal.SIGKILL
    assert r.stderr == b""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_a_signal_ends_preprocess_with_one_line(toy_data, tmp_path, sig, code, word):
    out = tmp_path / "o"
    args = _preprocess(toy_data, out, "--workers", "2", "--shard-size", "4")
    # the signal lands as the second shard is committed (its rename), mid-run
    rc, err = signal_at_event(args, sig=sig, event="rename", path=f"{out}/data-*", nth=2)
    assert rc == code and _lines(err) == [
        f"error: {word}; finished work is kept (rerun with --resume where supported)"
    ], err.decode()
    assert temp_files(out) == []  # the write in flight was cleaned up


@pytest.mark.parametrize("workers", ["0", "2"])
def test_stdout_closed_early_is_quiet(toy_data, workers):
    """mmcli preprocess ... -o - | head -c 10: exit 0, nothing on stderr."""
    cmd = [sys.executable, "-m", "mmcli", "preprocess", str(toy_data), "-o", "-", "-q",
           "--image-size", "64", "--workers", workers]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == b""


def test_a_second_writer_and_a_reader_are_told_who_writes(toy_data, clean, tmp_path, run_mmcli):
    out = tmp_path / "o"
    first = run_until_event(
        _preprocess(toy_data, out), event="rename", path=f"{out}/{SHARDS[1]}", action="stop"
    )
    try:
        for args in (
            _preprocess(toy_data, out, "--resume"),
            _preprocess(toy_data, out, "--overwrite"),
        ):
            line = _one_line(run_mmcli(*args))
            assert f"another mmcli process is writing this output (pid {first.pid}: " in line
            assert "mmcli preprocess" in line
        line = _one_line(run_mmcli("info", out))
        assert f"another mmcli process is still writing this folder (pid {first.pid}" in line
    finally:
        first.kill()
        first.communicate()
    assert (out.parent / f".{out.name}.lock").exists()  # a dead writer's lock blocks nobody
    assert run_mmcli(*_preprocess(toy_data, out, "--resume")).returncode == 0
    _assert_same_run(clean, out)


def test_preprocess_never_writes_over_its_input(toy_data, tmp_path):
    from PIL import Image

    from mmcli.preprocess import preprocess

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(toy_data.read_text())
    (tmp_path / "imgs" / "red").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "imgs" / "red" / "a.png")
    before = manifest.read_bytes()
    for src, out, why in (
        (manifest, tmp_path, "would replace an input file"),
        (tmp_path, tmp_path, "would replace an input file"),  # the folder's manifest.jsonl
        (tmp_path / "imgs", tmp_path / "imgs", "is where the input is read from"),
    ):
        with pytest.raises(BadInput, match=why):
            preprocess(str(src), str(out), overwrite=True)
    assert manifest.read_bytes() == before and not (tmp_path / "preprocess.json").exists()
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["red"]


# --------------------------------------------------------------------- extract


@pytest.fixture(scope="module")
def clean_features(clean, tmp_path_factory):
    out = tmp_path_factory.mktemp("kills") / "feats"
    r = subprocess.run([sys.executable, "-m", "mmcli", "extract", clean, "-o", out, *ENC, "-q"])
    assert r.returncode == 0
    return out


def test_extract_killed_then_resumed_equals_a_clean_run(clean, clean_features, tmp_path, run_mmcli):
    out = tmp_path / "feats"
    args = ["extract", clean, "-o", out, *ENC, "-q"]
    r = run_until_event(args, event="rename", path=f"{out}/features-00002-*", nth=1)
    assert r.returncode == -signal.SIGKILL
    assert len(list(out.glob("features-*"))) == 2 and temp_files(out)
    assert run_mmcli(*args, "--resume").returncode == 0
    assert_same_tensors(clean_features, out, "features-*.safetensors")
    assert temp_files(out) == []


def test_two_extracts_on_one_folder(clean, clean_features, tmp_path, run_mmcli):
    """--seed 0 and --seed 1 at once, and a run with its own --resume: the second writer is
    refused (exit 2, one line naming the first); the folder ends as one run's shards."""
    out = tmp_path / "feats"
    args = ["extract", clean, "-o", out, *ENC, "-q"]
    first = run_until_event(args, event="rename", path=f"{out}/features-00001-*", action="stop")
    try:
        for extra in (["--seed", "1"], ["--resume"]):
            line = _one_line(run_mmcli(*args, *extra))
            assert f"another mmcli process is writing this output (pid {first.pid}: " in line
    finally:
        first.kill()
        first.communicate()
    assert run_mmcli(*args, "--resume").returncode == 0
    assert_same_tensors(clean_features, out, "features-*.safetensors")


def test_extract_never_replaces_an_input_or_a_foreign_file(clean, tmp_path, cli):
    from mmcli.extract import extract

    one = tmp_path / "one.safetensors"
    one.write_bytes((clean / SHARDS[0]).read_bytes())
    other = tmp_path / "notes.safetensors"
    other.write_bytes(b"not mine")
    before = {p: p.read_bytes() for p in (one, other, clean / SHARDS[0])}
    for src, out in ((one, one), (clean, clean), (clean / SHARDS[0], clean)):
        r = cli("extract", src, "-o", out, *ENC, "--overwrite")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "an output is never one of the inputs" in r.stderr
    r = cli("extract", one, "-o", other, *ENC)
    assert r.exit_code == 2 and "is not a features file written by extract" in r.stderr
    assert "--overwrite" in r.stderr
    assert {p: p.read_bytes() for p in before} == before
    enc = {"image": "tiny", "text": "tiny", "audio": "tiny"}
    extract(one, other, encoders=enc, overwrite=True)  # --overwrite replaces it
    extract(one, other, encoders=enc)  # and now it is extract's own: a rerun replaces it
    assert TensorSet(other).kind == "features"


# ------------------------------------------------------------------------ eval


def test_eval_output(clean_features, tmp_path, cli, run_mmcli):
    feats = clean_features / "features-00000-of-00004.safetensors"
    before = feats.read_bytes()
    r = cli("eval", feats, "-o", feats)
    assert r.exit_code == 2 and "would replace an input file" in r.stderr
    assert feats.read_bytes() == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    r = cli("eval", clean_features, "-o", notes)
    assert r.exit_code == 2 and "is not an mmcli eval result" in r.stderr
    assert json.loads(notes.read_text()) == {"mine": True}
    assert cli("eval", clean_features, "-o", notes, "--overwrite").exit_code == 0
    assert cli("eval", clean_features, "-o", notes).exit_code == 0  # its own result: replaced
    # killed before its output was committed: the next run removes the temporary file
    out = tmp_path / "r.json"
    r = run_until_event(["eval", clean_features, "-o", out, "-q"], event="rename", path=str(out))
    assert r.returncode == -signal.SIGKILL and temp_files(tmp_path) and not out.exists()
    assert cli("eval", clean_features, "-o", out).exit_code == 0
    assert temp_files(tmp_path) == [] and "metrics" in json.loads(out.read_text())


def test_a_killed_decode_worker_ends_preprocess_with_one_line(toy_data, tmp_path):
    """A worker the kernel kills (out of memory) as it opens an image: the run stops with
    one line naming it, instead of waiting forever for the worker's answer."""
    out = tmp_path / "o"
    args = _preprocess(toy_data, out, "--workers", "2", "--shard-size", "8")
    r = run_until_event(args, event="open", path="*/images/toy-00050.*")  # in a worker
    lines = _lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1, r.stderr.decode()
    assert "error: a worker process (pid " in lines[0]
    assert (
        "was killed by signal 9 mid-task; if it ran out of memory, use fewer --workers" in lines[0]
    )
    assert temp_files(out) == []
