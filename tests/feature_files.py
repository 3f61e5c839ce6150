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


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square")


def make_pipeline(folder: str | Path, cli) -> dict[str, Path]:
    """Raw images + captions -> mmcli preprocess -> a tiny joint model -> mmcli extract.

    Items: every colour x shape twice (12 items, labelled by colour, splits cycling
    train/val/test), captions "a <colour> <shape>" and "<colour> <shape> number <n>".
    Returns the paths: raw manifest, tensors, model checkpoint, features.
    """
    import torch
    from PIL import Image

    from mmcli.formats.tensorfile import TensorSet
    from mmcli.models import build_model

    folder = Path(folder)
    (folder / "raw" / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, i = [], 0
    yy, xx = np.mgrid[:24, :24]
    for colour, rgb in COLORS.items():
        for shape in SHAPES:
            for rep in range(2):
                a = np.full((24, 24, 3), 255, np.uint8)
                mask = (
                    (yy - 12) ** 2 + (xx - 12) ** 2 < 40
                    if shape == "circle"
                    else (abs(yy - 12) < 6) & (abs(xx - 12) < 6)
                )
                a[mask] = rgb
                a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(folder / "raw" / "imgs" / f"{i}.png")
                rows.append(
                    {
                        "id": f"x{i}",
                        "image": f"imgs/{i}.png",
                        "text": [f"a {colour} {shape}", f"{colour} {shape} number {rep}"],
                        "label": colour,
                        "split": ("train", "val", "test")[i % 3],
                    }
                )
                i += 1
    manifest = write_manifest(folder / "raw" / "manifest.jsonl", rows)
    tensors, feats, model_path = folder / "tensors", folder / "feats", folder / "model.safetensors"
    r = cli("preprocess", manifest, "-o", tensors, "--image-size", 16, "--context-length", 24, "-q")
    assert r.exit_code == 0, r.stderr
    torch.manual_seed(0)
    head = {"kind": "linear", "in_dim": 16, "out_dim": 12}
    model = build_model(
        {"image": "tiny", "text": "tiny"},
        inputs=TensorSet(tensors).specs,
        heads={"image": head, "text": head},
        embed_dim=12,
    )
    model.to_checkpoint(model_path)
    r = cli("extract", tensors, "-o", feats, "--model", model_path, "-q")
    assert r.exit_code == 0, r.stderr
    return {
        "manifest": manifest,
        "tensors": tensors,
        "model": model_path,
        "features": feats,
        "root": folder,
    }
