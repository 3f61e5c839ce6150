"""Training run folders, as files (``mmcli info RUN/``): what was asked for, how far it got,
the best validation figures, and what the folder holds. Headers and JSON only: no torch.

    RUN/
      run.json            the command and its arguments, the mmcli version
      metrics.jsonl       one line per logging step and per evaluation
      state.safetensors   resumable state (model, optimizer, RNG, position)
      last.safetensors    the latest model checkpoint
      model.safetensors   the best model by the validation metric (or the last, without val)
      curves.png          loss, learning rate and validation over steps
      report.json         distill: teacher vs student
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import META_KIND, read_header

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.safetensors"
LAST_FILE = "last.safetensors"
BEST_FILE = "model.safetensors"
CURVES_FILE = "curves.png"
REPORT_FILE = "report.json"
#: the files a run writes (and ``--overwrite`` replaces)
RUN_FILES = (RUN_FILE, METRICS_FILE, STATE_FILE, LAST_FILE, BEST_FILE, REPORT_FILE, CURVES_FILE)
STATE_KIND = "train-state"


def is_run_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / RUN_FILE).is_file()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a partial last line (a killed run) is left out."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _plain(obj: Any) -> Any:
    """A training state's structure (see mmcli.train.state) with tensors left out."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return None
        if "__dict__" in obj:
            return {_plain(k): _plain(v) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_plain(v) for v in obj["__list__"]]
    return obj


def describe_state(path: str | os.PathLike) -> dict[str, Any]:
    """A resumable training state: its position, best figures and size."""
    tensors, metadata, _ = read_header(path)
    if metadata.get(META_KIND) != STATE_KIND:
        raise BadInput("not an mmcli training state file", where=str(path))
    try:
        structure = _plain(json.loads(metadata.get("mmcli.structure", "{}")))
    except (json.JSONDecodeError, RecursionError, TypeError, ValueError):
        raise BadInput(
            "the training state's structure is not readable JSON", where=str(path)
        ) from None
    if not isinstance(structure, dict):
        structure = {}
    return {
        "kind": STATE_KIND,
        "path": str(path),
        "step": structure.get("step"),
        "epoch": structure.get("epoch"),
        "batch_in_epoch": structure.get("micro"),
        "best": structure.get("best"),
        "best_metrics": structure.get("best_metrics") or {},
        "tensors": len(tensors),
        "bytes": os.path.getsize(path),
    }


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def describe_run(folder: str | os.PathLike) -> dict[str, Any]:
    """A run folder: the command and its configuration, progress, best figures, files."""
    root = Path(folder)
    run = _json_file(root / RUN_FILE)
    if not isinstance(run, dict):
        raise BadInput("run.json is not a JSON object", where=str(root / RUN_FILE))
    records = read_metrics(root / METRICS_FILE)
    steps = [r for r in records if "loss" in r and "eval" not in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    out: dict[str, Any] = {
        "kind": "run",
        "path": str(root),
        "command": run.get("command"),
        "mmcli": run.get("mmcli"),
        "args": run.get("args") or {},
        "files": {
            name: os.path.getsize(root / name) for name in RUN_FILES if (root / name).is_file()
        },
        "logged_steps": len(steps),
        "evaluations": len(evals),
    }
    if steps:
        last = steps[-1]
        out["last"] = {k: last.get(k) for k in ("step", "epoch", "loss", "lr", "samples_per_s")}
    if (root / STATE_FILE).is_file():
        try:
            state = describe_state(root / STATE_FILE)
            out["state"] = {k: state[k] for k in ("step", "epoch", "batch_in_epoch")}
            out["best"] = state["best"]
            out["best_metrics"] = state["best_metrics"]
        except BadInput as e:
            out["state"] = {"error": str(e)}
    if "best_metrics" not in out and evals:
        out["best_metrics"] = evals[-1]["eval"]
    report = _json_file(root / REPORT_FILE)
    if isinstance(report, dict) and isinstance(report.get("headline"), dict):
        out["report_headline"] = report["headline"]
    return out
