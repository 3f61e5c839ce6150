"""Cross-modal fusion: one embedding for an item from several modalities.

``attention``
    A small transformer over the tokens of every modality present: each modality's
    tokens are projected to a shared width, get a learned modality embedding and position
    embedding, and a [CLS] token plus all tokens attend to each other. Image tokens attend
    to caption tokens and the reverse (A = Attention(H, H) across modalities), which is
    what lets the fused embedding bind attributes ("red circle" vs "red square").
    A missing modality (absent from the input, or masked out row by row) simply has no
    tokens to attend to.
``concat``
    An MLP over the concatenated joint-space embeddings (zeros for a missing modality).
``none``
    No parameters: the mean of the available normalized joint-space embeddings.

The kinds are registered in :mod:`mmcli.models.registry` (``fusion_kinds()`` lists them).
Config (JSON, stored in the model checkpoint):
``{"kind": "attention", "width": 128, "depth": 2, "heads": 4, "max_tokens": {"image": 64, ...}}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.registry import register_fusion


class AttentionFusion(nn.Module):
    def __init__(
        self,
        token_dims: dict[str, int],
        out_dim: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_tokens: dict[str, int] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width % heads:
            raise BadInput(f"fusion width {width} must be divisible by its heads {heads}")
        self.modalities = list(token_dims)
        self.max_tokens = {m: int((max_tokens or {}).get(m, 256)) for m in self.modalities}
        self.proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in token_dims.items()})
        self.type_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(width)) for m in self.modalities}
        )
        self.pos_embed = nn.ParameterDict(
            {
                m: nn.Parameter(torch.randn(self.max_tokens[m], width) * 0.02)
                for m in self.modalities
            }
        )
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)
        self.width = width

    def forward(
        self, tokens: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens[m] = (tokens [B, T, C_m], mask [B, T] True=valid) -> (fused [B, out], cls state [B, width])."""
        parts, masks = [], []
        batch = None
        for m, (tok, mask) in tokens.items():
            if m not in self.proj:
                raise BadInput(f"this fusion module was not trained with {m}")
            t = tok.shape[1]
            if t > self.max_tokens[m]:
                raise BadInput(
                    f"{m} gives {t} tokens, more than the {self.max_tokens[m]} the fusion module was built for",
                    hint="use the input size the model was trained with",
                )
            h = self.proj[m](tok) + self.type_embed[m] + self.pos_embed[m][:t]  # (B, T, W)
            parts.append(h)
            masks.append(mask)
            batch = tok.shape[0]
        if batch is None:
            raise BadInput("fusion needs at least one modality")
        cls = self.cls.expand(batch, 1, self.width)
        h = torch.cat([cls, *parts], dim=1)  # (B, 1 + sum T, W)
        valid = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=h.device), *masks], dim=1)
        h = self.blocks(h, src_key_padding_mask=~valid)
        state = self.ln(h[:, 0])  # (B, W)
        return self.out(state), state


class ConcatFusion(nn.Module):
    def __init__(self, modalities: list[str], embed_dim: int, hidden: int | None = None):
        super().__init__()
        self.modalities = list(modalities)
        hidden = hidden or 2 * embed_dim
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim * len(self.modalities), hidden),
            nn.GELU(),
            nn.Linear(hidden, embed_dim),
        )
        self.width = embed_dim
        self.embed_dim = embed_dim

    def forward(
        self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
    ):
        """embeddings[m]: normalized [B, D]; present[m]: [B] bool (missing rows are zeroed)."""
        ref = next(iter(embeddings.values()))
        parts = []
        for m in self.modalities:
            e = embeddings.get(m)
            if e is None:
                e = ref.new_zeros(ref.shape[0], self.embed_dim)
            elif present is not None and m in present:
                e = e * present[m].unsqueeze(1).to(e.dtype)
            parts.append(e)
        out = self.mlp(torch.cat(parts, dim=1))
        return out, out


def mean_fusion(
    embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The ``none`` fusion: mean of the normalized embeddings that are present."""
    total, count = None, None
    for m, e in embeddings.items():
        w = (
            present[m].unsqueeze(1).to(e.dtype)
            if present is not None and m in present
            else torch.ones_like(e[:, :1])
        )
        total = e * w if total is None else total + e * w
        count = w if count is None else count + w
    return F.normalize(total / count.clamp_min(1.0), dim=-1)


# ------------------------------------------------------------- the registered kinds


def _modalities(spec: dict[str, Any], model) -> list[str]:
    return spec.get("modalities") or list(model.encoders)


@register_fusion("concat")
def build_concat(spec: dict[str, Any], model) -> ConcatFusion:
    return ConcatFusion(_modalities(spec, model), model.config.embed_dim, hidden=spec.get("hidden"))


@register_fusion("attention")
def build_attention(spec: dict[str, Any], model) -> AttentionFusion:
    return AttentionFusion(
        {m: model.encoders[m].token_dim for m in _modalities(spec, model)},
        model.config.embed_dim,
        width=int(spec.get("width", 128)),
        depth=int(spec.get("depth", 2)),
        heads=int(spec.get("heads", 4)),
        max_tokens=spec.get("max_tokens"),
    )
