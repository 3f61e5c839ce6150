"""Past one machine: two torchrun "nodes" on this machine (c10d rendezvous, gloo), one
process each, train exactly as one process with twice the batch and extract the same
features as one process. Slow: four interpreters start torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(
    args: list[str], cwd: Path, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """``mmcli ARGS`` as two torchrun nodes of one process each, started together."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mmcli-test-{port}"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*launcher, "-m", "mmcli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )  # fmt: skip
        for _ in range(2)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_nodes_train_as_one_process_with_twice_the_batch(toy_tensors, tmp_path):
    from mmcli.models import MultimodalModel

    common = ["fuse-train", str(toy_tensors), "--pairs", "image-text", "--encoder",
              "image=tiny", "--encoder", "text=tiny", "--embed-dim", "16", "--max-steps", "3",
              "--device", "cpu", "--lr", "5e-3", "-q", "--log-every", "1"]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "mmcli", *common, "-o", str(tmp_path / "one"), "--batch-size", "12"],
        capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()
    runs = two_nodes([*common, "-o", str(tmp_path / "two"), "--batch-size", "6"], tmp_path)
    for r in runs:
        assert r.returncode == 0, r.stderr.decode()
    a = MultimodalModel.from_checkpoint(tmp_path / "one" / "last.safetensors").state_dict()
    b = MultimodalModel.from_checkpoint(tmp_path / "two" / "last.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_nodes_extract_the_same_features_as_one_process(toy_tensors, tmp_path):
    from mmcli.formats.shardfile import ShardFile

    common = ["extract", str(toy_tensors), "-e", "image=tiny", "-e", "text=tiny", "--device",
              "cpu", "--batch-size", "5", "-q"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "mmcli", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()
    for r in two_nodes([*common, "-o", str(tmp_path / "two")], tmp_path):
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b""
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        if not name.endswith(".safetensors"):
            continue
        a, b = ShardFile(tmp_path / "one" / name), ShardFile(tmp_path / "two" / name)
        assert a.ids() == b.ids() and a.tables == b.tables
        for m in a.tables:
            torch.testing.assert_close(
                a.tensor(m).float(), b.tensor(m).float(), rtol=1e-4, atol=1e-5
            )
