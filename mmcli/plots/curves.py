"""Training curves from a run's ``metrics.jsonl``: loss, learning rate and the validation
metrics over steps, as one PNG (``RUN/curves.png``).

    from mmcli.plots.curves import training_curves
    training_curves(run.metrics(), "runs/toy/curves.png", title="runs/toy")
"""

from __future__ import annotations

import os
from typing import Any

from mmcli.formats.atomic import atomic_write_bytes
from mmcli.plots import pyplot

#: validation metrics drawn (the others stay in metrics.jsonl): recall@1 means, accuracy
_SHOWN = ("mean_recall@1", "mean_recall@5", "acc1", "binding/acc")


def _shown(key: str, best: str | None) -> bool:
    return key == best or any(key.endswith(s) for s in _SHOWN)


def training_curves(
    records: list[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    best_metric: str | None = None,
) -> dict[str, int]:
    """Draw the curves and write ``path`` atomically. Returns how many points each panel has."""
    steps = [r for r in records if "loss" in r and "eval" not in r]
    evals = [r for r in records if "eval" in r]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    ax_loss, ax_lr, ax_val = axes
    x = [r["step"] for r in steps]
    ax_loss.plot(x, [r["loss"] for r in steps], label="loss", color="#1f77b4")
    parts = sorted({k for r in steps for k in r} - {"step", "epoch", "lr", "loss"})
    parts = [k for k in parts if k not in ("samples_per_s", "logit_scale")]
    if len(parts) == 1 and all(r.get(parts[0]) == r["loss"] for r in steps):
        parts = []  # one objective: its curve is the loss
    for key in parts:
        ax_loss.plot(
            [r["step"] for r in steps if key in r],
            [r[key] for r in steps if key in r],
            label=key,
            linewidth=0.9,
            alpha=0.8,
        )
    ax_loss.set_title("training loss")
    ax_lr.plot(x, [r.get("lr", float("nan")) for r in steps], color="#d62728")
    ax_lr.set_title("learning rate")
    keys = sorted({k for r in evals for k in r["eval"] if _shown(k, best_metric)})
    for key in keys:
        pts = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
        ax_val.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
    ax_val.set_title("validation" if keys else "validation (none: no val split)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(ax_loss.get_lines()) > 1:
        ax_loss.legend(fontsize=7)
    if keys:
        ax_val.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return {"steps": len(steps), "evaluations": len(evals), "metrics": len(keys)}
