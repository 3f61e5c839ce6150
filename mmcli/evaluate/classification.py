"""Classification metrics shared by zero-shot, linear probe and ``classify``.

The rank of the true class follows the same tie rule as retrieval: classes by score,
descending, equal scores by class index, ascending; so ``acc@k`` never depends on the
order ``topk`` returns tied logits in.

Keys (CLIP_benchmark names): ``acc1``, ``acc5`` (only with 5 classes or more: with fewer
it would be 1.0 by construction, so it is left out rather than reported as NaN) and
``mean_per_class_recall`` (the top-1 recall of each class that has samples, averaged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.models.fusion import mean_fusion


def true_class_ranks(logits, labels) -> np.ndarray:
    """1-based rank of each sample's true class among the classes (tie rule above)."""
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels, dtype=torch.int64, device=logits.device)
    true = logits.gather(1, labels[:, None])  # (N, 1)
    classes = torch.arange(logits.shape[1], device=logits.device)[None, :]
    ahead = (logits > true) | ((logits == true) & (classes < labels[:, None]))
    return (ahead.sum(1) + 1).cpu().numpy()


def predicted_classes(logits) -> np.ndarray:
    """The top-1 class of each row; equal logits: the lower class index."""
    logits = torch.as_tensor(logits).float()
    top = logits.max(1, keepdim=True).values
    return (logits == top).int().argmax(1).cpu().numpy().astype(np.int64)


def classification_metrics(
    logits, labels, n_classes: int | None = None, prefix: str = "", details: dict | None = None
) -> dict[str, float]:
    """acc1, acc5 (n_classes >= 5) and mean per-class recall of ``logits`` [N, C].
    ``details`` (for ``eval --plot``) receives ``labels`` and ``predictions`` (the
    top-1 class under the tie rule)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise BadInput("no labelled samples to evaluate")
    n_classes = int(n_classes if n_classes is not None else np.shape(logits)[1])
    ranks = true_class_ranks(logits, labels)
    if details is not None:
        details.update(labels=labels, predictions=predicted_classes(logits))
    out = {f"{prefix}acc1": float((ranks <= 1).mean())}
    if n_classes >= 5:
        out[f"{prefix}acc5"] = float((ranks <= 5).mean())
    hit = (ranks == 1).astype(np.float64)
    per_class = np.bincount(labels, hit, minlength=n_classes)
    support = np.bincount(labels, minlength=n_classes)
    present = support > 0
    out[f"{prefix}mean_per_class_recall"] = float((per_class[present] / support[present]).mean())
    return out


def labelled_rows(features, table: str) -> tuple[Any, np.ndarray]:
    """(features float32 [n, D], labels int64 [n]) of the rows of ``table`` whose item has
    a label. BadInput when no item has one."""
    labels = features.labels()
    if not features.label_names or not (labels >= 0).any():
        raise BadInput(
            "the features have no labels",
            where=features.paths[0],
            hint='labels come from the manifest\'s "label" field; this task needs them',
        )
    x, items = features.table(table)
    y = labels[items.numpy()]
    keep = y >= 0
    return x[torch.from_numpy(keep)], y[keep]


def evaluate_classifier(
    features, model, *, device: Any = "cpu", batch_size: int = 256, details: dict | None = None
):
    """Accuracy of a classifier checkpoint (``mmcli fuse-train --objective classify``).

    The model's label head scores its fused embedding: ``model.classifier(model.fuse(
    inputs, present))``, with class names in ``model.config.classifier["labels"]``.
    ``inputs`` are, per modality the model encodes, the first row of each item in the
    features (the model's ``features`` encoders take them as they are); an item missing
    a modality is masked out of the fusion (``present``). Items are matched to classes by
    label name; items whose label the classifier does not know are left out.
    """
    head = getattr(model, "classifier", None)
    labels_of_model = list((getattr(model.config, "classifier", None) or {}).get("labels") or [])
    if head is None or not labels_of_model:
        raise BadInput(
            "the checkpoint has no classifier head",
            hint="train one with mmcli fuse-train --objective classify, or use --task zeroshot / linear-probe",
        )
    index = {name: i for i, name in enumerate(labels_of_model)}
    names = features.label_names
    target = np.array(
        [index.get(names[i], -1) if i >= 0 else -1 for i in features.labels()], dtype=np.int64
    )
    if details is not None:
        details["classes"] = labels_of_model
    joint = _own_embeddings(features, model)
    if joint is not None:  # extract --model output of this very checkpoint
        return _classify_embeddings(
            features, model, head, joint, target, labels_of_model, device, details
        )
    modalities = [m for m in model.modalities if m in features.tables]
    if not modalities:
        raise BadInput(
            f"the features have none of the tables the classifier reads ({', '.join(model.modalities)})",
            where=features.paths[0],
        )
    first_row: dict[str, np.ndarray] = {}
    tables = {}
    for m in modalities:
        first_row[m], tables[m] = _first_rows(features, m)
    items = _scored_items(features, first_row, target, labels_of_model)
    logits = []
    with torch.inference_mode():
        for b0 in range(0, len(items), batch_size):
            sel = items[b0 : b0 + batch_size]
            inputs, present = {}, {}
            for m in modalities:
                rows = first_row[m][sel]
                has = rows >= 0
                if not has.any():
                    continue
                fill = np.where(has, rows, rows[has][0])  # masked out below
                inputs[m] = tables[m][torch.from_numpy(fill)].to(device)
                present[m] = torch.from_numpy(has).to(device)
            try:
                fused = model.fuse(inputs, present)
            except ValueError as e:  # e.g. an encoder that takes raw data, not features
                raise BadInput(
                    f"the classifier cannot read these features ({e})", where=features.paths[0]
                ) from None
            logits.append(head(fused).float().cpu())
    metrics = classification_metrics(
        torch.cat(logits), target[items], len(labels_of_model), details=details
    )
    return metrics, {
        "samples": int(len(items)),
        "classes": len(labels_of_model),
        "inputs": modalities,
    }


def _own_embeddings(features, model) -> list[str] | None:
    """The tables of ``features`` that ``extract --model`` wrote with this checkpoint
    (same sha256): ``["fused"]`` when there is a fused table, else the joint tables of a
    model without fusion module (its fused embedding is their mean). None otherwise."""
    mine = (getattr(model, "checkpoint", None) or {}).get("sha256")
    if not mine:
        return None

    def own(table: str) -> bool:
        return ((features.spec(table) or {}).get("model") or {}).get("sha256") == mine

    if "fused" in features.tables and own("fused"):
        return ["fused"]
    if getattr(model, "fusion_kind", "none") == "none":
        tables = [m for m in model.modalities if m in features.tables and own(m)]
        return tables or None
    return None


def _classify_embeddings(
    features, model, head, tables, target, labels_of_model, device, details=None
):
    """Accuracy of the label head on embeddings extracted by the same model: the fused
    table, or (no fusion module) the mean of each item's first joint-space rows."""
    embeddings, present, first_row = {}, {}, {}
    for m in tables:
        row, x = _first_rows(features, m)
        has = row >= 0
        embeddings[m] = x[torch.from_numpy(np.where(has, row, 0))].float()
        present[m], first_row[m] = torch.from_numpy(has), row
    items = _scored_items(features, first_row, target, labels_of_model)
    sel = torch.from_numpy(items)
    if tables == ["fused"]:
        fused = torch.nn.functional.normalize(embeddings["fused"][sel], dim=-1)
    else:
        fused = mean_fusion(
            {m: torch.nn.functional.normalize(e[sel], dim=-1) for m, e in embeddings.items()},
            {m: p[sel] for m, p in present.items()},
        )
    with torch.inference_mode():
        logits = head.to(device)(fused.to(device)).float().cpu()
    metrics = classification_metrics(logits, target[items], len(labels_of_model), details=details)
    return metrics, {"samples": int(len(items)), "classes": len(labels_of_model), "inputs": tables}


def _first_rows(features, table: str):
    """(the first row of each item in ``table``, -1 where it has none; the table)."""
    x, items = features.table(table)
    items = items.numpy()
    row = np.full(features.num_items, -1, dtype=np.int64)
    row[items[::-1]] = np.arange(len(items))[::-1]
    return row, x


def _scored_items(features, first_row: dict, target: np.ndarray, classes: list) -> np.ndarray:
    """Items with a label the classifier knows and a row in at least one table."""
    has_any = np.zeros(features.num_items, dtype=bool)
    for row in first_row.values():
        has_any |= row >= 0
    items = np.flatnonzero((target >= 0) & has_any)
    if len(items) == 0:
        raise BadInput(
            "no item has both a label the classifier knows and rows to classify",
            where=features.paths[0],
            hint=f"the classifier's classes: {', '.join(classes[:8])}",
        )
    return items
