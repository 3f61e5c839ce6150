"""Projection heads from an encoder's features to the joint space.

A head spec is plain JSON, stored in the model config:
``{"kind": "identity" | "linear" | "mlp", "in_dim": 512, "out_dim": 256, "hidden": 1024}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmcli.errors import BadInput

HEAD_KINDS = ("identity", "linear", "mlp")


def build_head(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind", "identity")
    in_dim, out_dim = spec.get("in_dim"), spec.get("out_dim")
    if kind == "identity":
        if in_dim is not None and out_dim is not None and in_dim != out_dim:
            raise BadInput(f"identity head cannot map {in_dim} -> {out_dim} dims")
        return nn.Identity()
    if not isinstance(in_dim, int) or not isinstance(out_dim, int):
        raise BadInput(f"{kind} head needs integer in_dim and out_dim, got {spec}")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        hidden = spec.get("hidden") or max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise BadInput(f"unknown head kind {kind!r}", hint=f"known: {', '.join(HEAD_KINDS)}")


def head_out_dim(spec: dict[str, Any] | None, in_dim: int) -> int:
    if not spec or spec.get("kind", "identity") == "identity":
        return in_dim
    return int(spec["out_dim"])
