"""Shared test helpers.

``cli`` runs mmcli in-process (typer's CliRunner, stdout and stderr kept apart);
``run_mmcli`` runs it as a real subprocess (for pipes, exit codes, torchrun).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

# the files checkpoints carry (hf:DIR's config, tokenizer) are unpacked here, not in ~/.cache
if not os.environ.get("MMCLI_CACHE_DIR"):
    os.environ["MMCLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmcli-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMCLI_CACHE_DIR"], True)


@pytest.fixture
def cli():
    """cli("info", path, "--json") -> click Result (exit_code, stdout, stderr)."""
    from mmcli.cli.app import app

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def mmcli_subprocess(*args, input: bytes | None = None, timeout: float = 300, env=None, cwd=None):
    """Run ``python -m mmcli ARGS`` and return the CompletedProcess (bytes stdout/stderr)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mmcli", *map(str, args)],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


@pytest.fixture
def run_mmcli():
    return mmcli_subprocess


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small toy dataset (examples/toydata.py): 96 items, 48 px PNGs, 0.25 s audio."""
    from toydata import generate

    out = tmp_path_factory.mktemp("toy") / "data"
    return generate(out, items=96, seed=0, image_size=(48, 48), audio_seconds=0.25)


@pytest.fixture(scope="session")
def toy_tensors(toy_data, tmp_path_factory):
    """The toy data preprocessed: 32 px images, byte tokens, 0.25 s audio at 16 kHz."""
    from mmcli.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("toy") / "tensors"
    preprocess(
        str(toy_data),
        str(out),
        config=PreprocessConfig(image_size=32, audio_seconds=0.25, shard_size=40),
    )
    return out
