"""make -C examples quickstart ends with the pictures (hits.html, curves.png) and says
where they are; `make pictures` adds the eval PNGs and a screenshot. Slow (a whole small
training run): `pytest -m slow tests/test_examples_pictures.py`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser import page_checks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_ends_with_the_gallery_and_curves(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    args = ["make", "-C", str(EXAMPLES), f"OUT={out}", f"PYTHON={sys.executable}",
            "ITEMS=150", "EPOCHS=2", "IMAGE_SIZE=32"]  # fmt: skip
    r = subprocess.run([*args, "quickstart"], capture_output=True, text=True, env=env,
                       timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    hits, curves = out / "results" / "hits.html", out / "run" / "curves.png"
    last = [line for line in r.stdout.splitlines() if not line.startswith("make")][-1]
    assert last == f"== pictures: {hits} (open it in a browser), training curves: {curves} =="
    assert curves.read_bytes()[:4] == b"\x89PNG"
    checks = page_checks(hits)  # 6 held-out captions x 6 test images, every one decoded
    assert checks == {"images": 36, "loaded": 36, "hits": 36}
    r = subprocess.run([*args, "pictures"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("retrieval-recall", "zeroshot-confusion", "zeroshot-per-class-recall", "hits"):
        assert (out / "results" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
