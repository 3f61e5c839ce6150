"""What a raw input holds, before preprocessing: items, captions, splits, labels and the
modalities present, for ``mmcli info`` on a manifest, a Karpathy or COCO captions file, a
CSV / TSV, or an ImageFolder / audio folder.

    survey("data/dataset_flickr8k.json")
    # {"kind": "raw", "format": "karpathy", "items": 8091, "captions": 40455, ...}

Files are not opened: a path that does not exist is counted as ``missing``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mmcli.data.importers import ImportOptions, import_items, manifest_in_folder
from mmcli.formats.archive import member_exists
from mmcli.modalities import MODALITIES

#: suffixes `info` reads as raw inputs (folders are told apart by their content)
RAW_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def survey(path: str, fmt: str = "auto", opts: ImportOptions | None = None) -> dict[str, Any]:
    opts = opts or ImportOptions(on_error="skip")
    path = manifest_in_folder(path, fmt)
    used, items = import_items(path, fmt, opts)
    n = captions = 0
    per_item: Counter[int] = Counter()
    splits: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    present = {m: 0 for m in MODALITIES}
    missing = {m: 0 for m in MODALITIES if m != "text"}
    for item in items:
        n += 1
        texts = item.texts
        captions += len(texts)
        per_item[len(texts)] += 1
        splits[item.split if item.split is not None else "(none)"] += 1
        if item.label is not None:
            labels[item.label] += 1
        if texts:
            present["text"] += 1
        for m in missing:
            p = item.path(m)
            if p is not None:
                present[m] += 1
                missing[m] += not (p.exists() or member_exists(p))
    out: dict[str, Any] = {
        "kind": "raw",
        "path": path,
        "format": used,
        "items": n,
        "captions": captions,
        "modalities": {m: c for m, c in present.items() if c},
        "splits": dict(sorted(splits.items())),
    }
    if per_item and captions:
        counts = sorted(per_item.elements())
        out["captions_per_item"] = {
            "min": counts[0],
            "mean": round(captions / n, 2),
            "max": counts[-1],
        }
    if labels:
        out["labels"] = len(labels)
        out["label_counts"] = dict(labels.most_common(12))
    if any(missing.values()):
        out["missing_files"] = {m: c for m, c in missing.items() if c}
    if opts.errors:
        out["rejected_lines"] = len(opts.errors)
    return out
