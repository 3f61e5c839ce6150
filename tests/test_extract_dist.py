"""extract as real processes: torchrun with 2 CPU ranks (gloo), and resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from extract_data import make_shards

from mmcli.extract import extract
from mmcli.formats.tensorfile import ShardFile
from mmcli.models import build_model

ENCODERS = [
    "-e",
    "image=convnet:width=8",
    "-e",
    "text=transformer:width=32,depth=1,heads=2",
    "-e",
    "audio=tiny",
]
ENCODER_DICT = dict(e.split("=", 1) for e in ENCODERS[1::2])


def _same_features(a_dir, b_dir, names):
    for name in names:
        a, b = ShardFile(a_dir / name), ShardFile(b_dir / name)
        assert a.ids() == b.ids() and a.tables == b.tables
        for m in a.tables:
            torch.testing.assert_close(
                a.tensor(m).float(), b.tensor(m).float(), rtol=1e-3, atol=2e-3
            )


def test_torchrun_two_processes_equal_one_process(tmp_path):
    make_shards(tmp_path / "tensors", shards=5, items=4, sample_rate=8000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mmcli", "extract", str(tmp_path / "tensors"), "-o", str(tmp_path / "two"),
        *ENCODERS, "--device", "cpu", "--batch-size", "3",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert p.stderr.count("extracted ") == 1  # the summary, from rank 0 only
    assert "5 shard(s) written" in p.stderr and "x 2 processes" in p.stderr

    one = extract(
        tmp_path / "tensors", tmp_path / "one", encoders=ENCODER_DICT, device="cpu", batch_size=3
    )
    assert one["written"] == 5
    names = sorted(f.name for f in (tmp_path / "one").iterdir())
    assert sorted(f.name for f in (tmp_path / "two").iterdir()) == names
    _same_features(tmp_path / "one", tmp_path / "two", names)


def test_resume_after_sigkill(tmp_path):
    """SIGKILL mid-run leaves whole shards (and maybe a temp file); --resume does the rest."""
    make_shards(tmp_path / "tensors", shards=6, items=16, image_size=48, modalities=("image",))
    out = tmp_path / "feats"
    cmd = [
        sys.executable, "-m", "mmcli", "extract", str(tmp_path / "tensors"), "-o", str(out),
        "-e", "image=resnet18", "--batch-size", "2", "-q",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    first = out / "features-00000-of-00006.safetensors"
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    assert first.name in done and len(done) < 6, done  # killed part-way

    summary = extract(tmp_path / "tensors", out, encoders={"image": "resnet18"}, resume=True)
    assert summary["skipped"] == len(done) and summary["written"] == 6 - len(done)
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no stale temp files

    # every shard, the killed run's and the resumed run's, equals a direct forward of the
    # model both built (the same seed)
    torch.manual_seed(0)
    model = build_model({"image": "resnet18"})
    for name in sorted(f.name for f in out.iterdir()):
        got = ShardFile(out / name)
        src = ShardFile(tmp_path / "tensors" / name.replace("features", "tensors"))
        with torch.no_grad():
            want = model.encode("image", src.tensor("image"))
        torch.testing.assert_close(got.tensor("image").float(), want, rtol=2e-3, atol=2e-3)
