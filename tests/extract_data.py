"""Tiny tensor shards for model and extract tests, written with mmcli.formats directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcli.data.audio import AudioTransform
from mmcli.data.image import ImageTransform
from mmcli.data.text import ByteTokenizer
from mmcli.formats.tensorfile import Shard, shard_name, write_shard

LABELS = ["cat", "dog", "bird"]
SOURCE = {"manifest": "toy.jsonl", "sha256": "0" * 64}


def make_shards(
    folder: str | Path,
    *,
    shards: int = 2,
    items: int = 5,
    modalities: tuple[str, ...] = ("image", "text", "audio"),
    image_size: int = 32,
    context_length: int = 24,
    sample_rate: int = 8000,
    seconds: float = 0.25,
    labels: bool = True,
    seed: int = 0,
    name: str = "tensors",
) -> list[Path]:
    """``shards`` shards of ``items`` items each; item j has 1 + j % 3 captions."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    tok = ByteTokenizer(context_length=context_length)
    specs = {
        "image": ImageTransform(image_size).spec(),
        "text": tok.spec(),
        "audio": AudioTransform(sample_rate, seconds).spec(),
    }
    paths = []
    for s in range(shards):
        ids = [f"s{s}-item{j}" for j in range(items)]
        shard = Shard(ids=ids)
        if "image" in modalities:
            shard.tables["image"] = rng.integers(
                0, 256, (items, 3, image_size, image_size), dtype=np.uint8
            )
            shard.items["image"] = np.arange(items, dtype=np.int64)
        if "text" in modalities:
            captions, owner = [], []
            for j in range(items):
                for c in range(1 + j % 3):
                    captions.append(
                        f"caption {c} of item {ids[j]} — ünïcode 猫 {'x' * int(rng.integers(0, 30))}"
                    )
                    owner.append(j)
            shard.tables["text"] = tok.encode_batch(captions)[0]
            shard.items["text"] = np.asarray(owner, dtype=np.int64)
        if "audio" in modalities:
            n = int(round(sample_rate * seconds))
            t = np.arange(n) / sample_rate
            waves = [np.sin(2 * np.pi * (200 + 50 * j + 10 * s) * t) * 0.5 for j in range(items)]
            shard.tables["audio"] = (np.stack(waves) + rng.normal(0, 0.01, (items, n))).astype(
                np.float16
            )
            shard.items["audio"] = np.arange(items, dtype=np.int64)
        if labels:
            shard.labels = rng.integers(-1, len(LABELS), items).astype(np.int64)
        path = folder / shard_name(name, s, shards)
        write_shard(
            path,
            shard,
            kind="tensors",
            specs={m: specs[m] for m in shard.tables},
            label_names=LABELS if labels else (),
            source=SOURCE,
            index=s,
            count=shards,
        )
        paths.append(path)
    return paths
