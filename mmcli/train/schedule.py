"""The optimizer's schedule: AdamW weight-decay groups, warmup + cosine learning rate, and
which of two validation figures is better."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from mmcli.train.loop import LoopConfig


def decay_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (weights), none on biases, norms, embeddings' scales,
    temperatures and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim < 2 or "logit_" in name or name.endswith("pos_embed") or ".pos" in name
            else decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, cfg: LoopConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr * lr``."""
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * cos)


def is_better(new: float, old: float | None, metric: str) -> bool:
    """Losses and ranks are better lower, everything else higher."""
    lower = any(k in metric for k in ("loss", "rank"))
    return old is None or (new < old if lower else new > old)
