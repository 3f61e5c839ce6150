"""Merge many ``mmcli eval`` result files into one table (CSV or markdown).

    mmcli eval --summarize results/*.json -o summary.csv

One row per result file: ``file``, ``dataset``, ``model``, ``task``, then every metric
key found in any file (in first-seen order; empty where a file lacks it).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.userfiles import read_file

FORMATS = ("csv", "markdown", "json")
FIXED = ("file", "dataset", "model", "task")


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    import glob

    files: list[str] = []
    for p in paths:
        s = str(p)
        if any(c in s for c in "*?["):
            found = sorted(glob.glob(s))
            if not found:
                raise BadInput("the pattern matches no files", where=s)
            files += found
        elif Path(s).is_dir():
            files += sorted(str(f) for f in Path(s).glob("*.json"))
        else:
            files.append(s)
    if not files:
        raise BadInput("no result files given", hint="mmcli eval --summarize results/*.json")
    out = []
    for f in files:
        try:
            obj = safejson.loads(read_file(f).decode("utf-8"))
        except (safejson.JSONError, UnicodeDecodeError):
            raise BadInput(
                "not a JSON file", where=f, hint="pass files written by mmcli eval"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("metrics"), dict):
            raise BadInput(
                "not an mmcli eval result (no metrics)",
                where=f,
                hint="pass files written by mmcli eval",
            )
        obj["file"] = f
        out.append(obj)
    return out


def summary_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    keys: list[str] = []
    rows = []
    for r in results:
        for k in r["metrics"]:
            if k not in keys:
                keys.append(k)
        rows.append({**{f: r.get(f) for f in FIXED}, **r["metrics"]})
    return [*FIXED, *keys], rows


def render_summary(results: Sequence[dict[str, Any]], fmt: str = "csv") -> str:
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    columns, rows = summary_rows(results)
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        return buf.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def format_for(path: str | None, fmt: str | None) -> str:
    """The format asked for, or the one the output's extension implies (csv by default)."""
    if fmt:
        return fmt
    if path and str(path).endswith((".md", ".markdown")):
        return "markdown"
    if path and str(path).endswith(".json"):
        return "json"
    return "csv"


def is_result_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ``mmcli eval`` result (what eval may replace unasked)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) and "task" in obj


def is_summary_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ``eval --summarize`` table (CSV, markdown or JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    first = head.split("\n", 1)[0]
    if first.startswith(",".join(FIXED)) or first.startswith("| " + " | ".join(FIXED) + " |"):
        return True
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "file" in r for r in rows)
