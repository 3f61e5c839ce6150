"""Feature files and manifests for eval / retrieve tests, written with mmcli.formats directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmcli.formats.tensorfile import Shard, write_shard


def write_features(
    path: str | Path,
    ids: list[str],
    tables: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    labels: np.ndarray | None = None,
    label_names: list[str] | tuple[str, ...] = (),
    source: dict | None = None,
    normalized: bool = True,
    index: int = 0,
    count: int = 1,
) -> Path:
    """One feature shard: ``tables[m] = (data [rows, D], local item index [rows])``."""
    import torch

    path = Path(path)
    specs = {
        m: {
            "encoder": "test",
            "dim": int(np.shape(x)[1]),
            "normalized": normalized,
            "dtype": str(x.dtype),
        }
        for m, (x, _) in tables.items()
    }
    data = {}
    for m, (x, _) in tables.items():
        data[m] = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    shard = Shard(
        ids=list(ids),
        tables=data,
        items={
            m: torch.from_numpy(np.asarray(it, dtype=np.int64)) for m, (_, it) in tables.items()
        },
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )
    write_shard(
        path,
        shard,
        kind="features",
        specs=specs,
        label_names=list(label_names),
        source=source,
        index=index,
        count=count,
    )
    return path


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_pairs(n_items: int = 12, dim: int = 16, captions=(1, 5), noise: float = 0.3, seed: int = 0):
    """Images (one row per item) and captions (a few rows per item) near their image."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_items, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    counts = rng.integers(captions[0], captions[1] + 1, size=n_items)
    txt_items = np.repeat(np.arange(n_items), counts)
    txt = img[txt_items] + noise * rng.standard_normal((len(txt_items), dim)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, np.arange(n_items), txt.astype(np.float32), txt_items
