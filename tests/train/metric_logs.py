"""Comparing two runs' metrics.jsonl (a resumed run against an uninterrupted one)."""

from __future__ import annotations

import json
import math

import pytest


def assert_same_losses(a_lines: list[str], b_lines: list[str], rel: float = 1e-4) -> None:
    """Both logs hold the same records in the same order, with losses equal within ``rel``.

    Evaluation records carry no loss: those positions must agree (both None) and are left
    out of the numeric comparison (``pytest.approx`` cannot compare None since pytest 9.2).
    """
    a = [json.loads(x).get("loss") for x in a_lines]
    b = [json.loads(x).get("loss") for x in b_lines]
    assert len(a) == len(b)
    assert [x is None for x in a] == [x is None for x in b]
    nums_a = [x for x in a if x is not None]
    nums_b = [x for x in b if x is not None]
    assert nums_a, "no losses logged"
    assert nums_a == pytest.approx(nums_b, rel=rel, nan_ok=True)
    assert all(isinstance(x, float) and not math.isinf(x) for x in nums_a)


def assert_torchrun_equals_one(common: list[str], out, port: int, batch: int) -> None:
    """``mmcli COMMON`` in one process at ``--batch-size batch`` and under torchrun with 2
    processes at ``batch / 2`` (gloo on the CPU): the same final weights and losses."""
    import os
    import subprocess
    import sys

    import torch

    from mmcli.models import MultimodalModel

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    for name, launcher, size in (
        ("one", [sys.executable], batch),
        ("two", [*torchrun, "--master_port", str(port)], batch // 2),
    ):
        r = subprocess.run(
            [*launcher, "-m", "mmcli", *common, "-o", str(out / name), "--batch-size", str(size)],
            capture_output=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr.decode()
    a = MultimodalModel.from_checkpoint(out / "one" / "last.safetensors").state_dict()
    b = MultimodalModel.from_checkpoint(out / "two" / "last.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    def losses(run):
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    assert losses("one") == pytest.approx(losses("two"), rel=1e-4)
