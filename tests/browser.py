"""A real browser for the HTML tests: Debian's chromium, headless.

``page_checks(html)`` loads the page, lets its inline script fill ``<pre id="checks">``
on load, and returns that JSON (``{"images", "loaded", "hits"}``) read back through
``--dump-dom``; ``screenshot(html, png)`` writes what a person would see.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # .ci/run installs it, so CI never skips
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _run(*args: str, timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory(prefix="mmcli-chromium-") as profile:
        r = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=timeout,
            text=True,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def page_checks(page: str | Path) -> dict:
    dom = _run("--virtual-time-budget=5000", "--dump-dom", Path(page).resolve().as_uri())
    m = re.search(r'<pre id="checks">(.*?)</pre>', dom, re.S)
    assert m and m.group(1).strip(), "the page's check script did not run"
    return json.loads(m.group(1))


def screenshot(page: str | Path, png: str | Path, size: str = "1200,2000") -> Path:
    _run(f"--screenshot={Path(png).resolve()}", f"--window-size={size}",
         "--virtual-time-budget=5000", Path(page).resolve().as_uri())  # fmt: skip
    assert Path(png).stat().st_size > 0
    return Path(png)
