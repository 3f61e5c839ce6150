"""What ``mmcli info`` shows, for any path a person points it at: mmcli tensor / feature /
model files (:func:`mmcli.formats.describe.describe`), training run folders and states
(:mod:`mmcli.formats.runs`), and raw inputs before preprocessing
(:func:`mmcli.data.survey.survey`). No torch.

    summaries = summarize(["out/tensors", "runs/toy/", "data/dataset_flickr8k.json"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcli.data.survey import survey
from mmcli.errors import BadInput
from mmcli.formats import runs
from mmcli.formats.atomic import is_stdio
from mmcli.formats.describe import describe
from mmcli.formats.tensorfile import META_KIND, read_header


def summarize(paths: Sequence[str], *, plot: bool = False) -> list[dict[str, Any]]:
    """What ``mmcli info`` shows: run folders (with ``plot``, their curves drawn), training
    states, raw inputs (manifests, dataset files and folders) and the mmcli files
    :func:`describe` summarises, in the order given."""
    out: list[dict[str, Any]] = []
    rest: list[str] = []
    for path in paths:
        kind = _input_kind(path)
        if kind == "files":
            rest.append(path)
            continue
        if rest:
            out.extend(describe(rest))
            rest = []
        if kind == "run":
            summary = runs.describe_run(path)
            if plot:
                summary["curves"] = _plot_run(path)
            out.append(summary)
        elif kind == "state":
            out.append(runs.describe_state(path))
        else:
            out.append(survey(path))
    if rest:
        out.extend(describe(rest))
    if plot and not any(s["kind"] == "run" for s in out):
        raise BadInput("--plot draws a training run's curves: pass a run folder")
    return out


def _input_kind(path: str) -> str:
    """run (a training run folder), state (a training state file), raw (a manifest, dataset
    file or folder not written by mmcli) or files (mmcli tensor / feature / model files)."""
    if is_stdio(path):
        return "files"
    p = Path(path)
    if runs.is_run_folder(p):
        return "run"
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        return "raw"
    if p.is_file() and p.suffix == ".safetensors":
        _, metadata, _ = read_header(p)
        return "state" if metadata.get(META_KIND) == runs.STATE_KIND else "files"
    if p.is_dir() and not any(p.glob("*.safetensors")):
        return "raw"  # an ImageFolder / audio folder, or a folder holding manifest.jsonl
    return "files"


def _plot_run(path: str) -> str:
    from mmcli.plots.curves import training_curves  # matplotlib only when drawing

    records = runs.read_metrics(Path(path) / runs.METRICS_FILE)
    if not records:
        raise BadInput("the run has no metrics.jsonl to draw", where=path)
    out = Path(path) / runs.CURVES_FILE
    training_curves(records, out, title=str(path))
    return str(out)
