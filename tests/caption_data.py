"""Small captioning data and models for the tests: a few toy items with one caption each,
and a captioner trained on them with the tiny encoders."""

from __future__ import annotations

import json
from pathlib import Path

from mmcli.preprocess import PreprocessConfig, preprocess
from mmcli.train.fuse import FuseConfig, fuse_train
from mmcli.train.loop import LoopConfig

TINY = {"image": "tiny:width=8,dim=32", "text": "tiny", "audio": "tiny:dim=32"}


def one_caption_items(toy_manifest: Path, out: Path, n: int = 8, **extra) -> Path:
    """A manifest of the first ``n`` toy items, each with its first (canonical) caption
    only, every one in the train split; media paths made absolute."""
    base = toy_manifest.parent
    rows = []
    for line in toy_manifest.read_text(encoding="utf-8").splitlines()[:n]:
        r = json.loads(line)
        row = {"id": r["id"], "image": str(base / r["image"]), "text": [r["text"][0]]}
        if "audio" in r:
            row["audio"] = str(base / r["audio"])
        row.update(split="train", objects=r["objects"], **extra)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def tensors_of(manifest: Path, out: Path, image_size: int = 16) -> Path:
    preprocess(
        str(manifest), str(out), config=PreprocessConfig(image_size=image_size, audio_seconds=0.25)
    )
    return out


def train_captioner(
    tensors: Path,
    run: Path,
    *,
    kind: str = "attention:width=32,depth=1,heads=2",
    steps: int = 150,
    source: str = "image",
    lr: float = 1e-2,
    batch_size: int = 8,
    smoothing: float = 0.0,
    objectives: dict | None = None,
    **cfg,
) -> dict:
    """Fit a caption decoder (caption objective alone, no validation); returns the summary."""
    pairs = [(source, "text")]
    config = FuseConfig(
        pairs=pairs,
        objectives=objectives or {"caption": 1.0},
        encoders={m: TINY[m] for m in (source, "text")},
        embed_dim=16,
        caption_decoder=kind,
        caption_from=source,
        label_smoothing=smoothing,
        val_split="none",
        **cfg,
    )
    loop = LoopConfig(epochs=1, max_steps=steps, lr=lr, warmup=0.05, log_every=1)
    return fuse_train(
        [str(tensors)], str(run), config, loop, batch_size=batch_size, device="cpu", overwrite=True
    )
