"""``eval --plot DIR``: the pictures of an evaluation, as PNG files.

    from mmcli.evaluate.run import EvalConfig, run_eval
    from mmcli.plots.evaluation import eval_pictures
    details = {}
    result = run_eval(EvalConfig(features=["out/joint"]), details=details)
    eval_pictures(result, details, "out/results/")   # -> [Path, ...]

* retrieval: ``<task>-recall.png``, recall@k for every k from 1 to the number of
  candidates (at most 100), one curve per direction, from the exact rank of each query's
  first hit (the same ranks as the JSON's ``recall@k``);
* zeroshot, linear-probe, classify: ``<task>-confusion.png`` (rows: true class, columns:
  predicted class, counts, each row shaded by its share) and ``<task>-per-class-recall.png``
  (top-1 recall of each class with samples, sorted, the mean as a line).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.formats.atomic import atomic_write_bytes
from mmcli.plots import pyplot

MAX_K = 100  # recall curves stop here (or at the number of candidates)
MAX_CLASSES_LABELLED = 40  # beyond this the confusion matrix has no tick labels


def recall_at_every_k(first: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(k = 1..min(candidates, MAX_K), share of queries whose first hit has rank <= k)."""
    ks = np.arange(1, min(int(candidates), MAX_K) + 1)
    first = np.sort(np.asarray(first))
    return ks, np.searchsorted(first, ks, side="right") / max(len(first), 1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    """int64 [n, n]: row = true class, column = predicted class."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(predictions)), 1)
    return m


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _recall_png(details: dict[str, Any], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key, d in details.items():
        ks, recall = recall_at_every_k(d["first"], d["candidates"])
        label = f"{key.replace('_retrieval', '')}: {d['query']} → {d['target']}"
        ax.plot(ks, recall, marker="." if len(ks) <= 20 else None, label=label, alpha=0.9)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _confusion_png(m: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    plt = pyplot()
    n = len(classes)
    side = min(3.5 + 0.35 * n, 14)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=110)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    if n <= MAX_CLASSES_LABELLED:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if m[i, j]:
                        colour = "white" if share[i, j] > 0.5 else "black"
                        ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                                color=colour)  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _per_class_png(m: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    plt = pyplot()
    support = m.sum(1)
    present = np.flatnonzero(support > 0)
    recall = np.diag(m)[present] / support[present]
    order = np.argsort(-recall, kind="stable")
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * len(present), 16), 3.8), dpi=110)
    ax.bar(range(len(order)), recall[order], color="#1f77b4")
    ax.axhline(recall.mean(), color="#d62728", linewidth=1,
               label=f"mean per-class recall {recall.mean():.3f}")  # fmt: skip
    if len(present) <= MAX_CLASSES_LABELLED:
        names = [classes[present[i]] for i in order]
        ax.set_xticks(range(len(order)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1 recall")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title(title, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def eval_pictures(
    result: dict[str, Any], details: dict[str, Any], folder: str | os.PathLike
) -> list[Path]:
    """Write the task's PNGs into ``folder`` (created); returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    task = result["task"]
    title = f"{task}: {result.get('dataset')} / {result.get('model')}"
    if result.get("split"):
        title += f" ({result['split']} split)"
    if task == "retrieval":
        directions = {k: v for k, v in details.items() if isinstance(v, dict) and "first" in v}
        return [_recall_png(directions, out / f"{task}-recall.png", title)]
    if "predictions" not in details:
        return []
    classes = [str(c) for c in details["classes"]]
    m = confusion_matrix(details["labels"], details["predictions"], len(classes))
    return [
        _confusion_png(m, classes, out / f"{task}-confusion.png", title),
        _per_class_png(m, classes, out / f"{task}-per-class-recall.png", title),
    ]
