"""Text encoders over byte tokens: ``tiny``, ``bow``, ``transformer``.

Input: int ids ``[B, L]`` from :class:`mmcli.data.text.ByteTokenizer` (PAD=0 masked out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.base import TextEncoder, eos_positions, masked_mean
from mmcli.models.checkpointing import run_blocks
from mmcli.models.registry import register

# --------------------------------------------------------------------------- tiny


@register("text", "tiny")
@dataclass
class TinyTextConfig:
    """Token embedding, one linear layer, masked mean: for tests."""

    dim: int = 16

    def build(self) -> TinyText:
        return TinyText(self)


class TinyText(TextEncoder):
    name = "tiny"

    def __init__(self, config: TinyTextConfig):
        super().__init__(config)
        self.embed = nn.Embedding(self.vocab_size, config.dim, padding_idx=0)
        self.proj = nn.Linear(config.dim, config.dim)
        self.out_dim = self.token_dim = config.dim

    def forward_tokens(self, x):
        ids, mask = self.prepare(x)
        tokens = torch.tanh(self.proj(self.embed(ids)))  # (B, L, dim)
        return masked_mean(tokens, mask), tokens, mask


# ---------------------------------------------------------------------------- bow


@register("text", "bow")
@dataclass
class BowConfig:
    """Bag of byte tokens: the masked mean of learned token embeddings."""

    dim: int = 256

    def build(self) -> Bow:
        return Bow(self)


class Bow(TextEncoder):
    name = "bow"

    def __init__(self, config: BowConfig):
        super().__init__(config)
        self.embed = nn.Embedding(self.vocab_size, config.dim, padding_idx=0)
        self.out_dim = self.token_dim = config.dim

    def forward_tokens(self, x):
        ids, mask = self.prepare(x)
        tokens = self.embed(ids)  # (B, L, dim)
        return masked_mean(tokens, mask), tokens, mask


# -------------------------------------------------------------------- transformer


@register("text", "transformer")
@dataclass
class TransformerConfig:
    """Byte embedding + learned positions + a pre-LN transformer encoder.

    Padding is masked in attention and pooling. ``pool``: ``eos`` (the state at the EOS
    token, as CLIP) or ``mean`` (masked mean). ``context_length`` is the longest input it
    accepts (the size of the position table).
    """

    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 77
    pool: Literal["eos", "mean"] = "eos"
    dropout: float = 0.0

    def build(self) -> Transformer:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.depth < 1 or self.context_length < 3:
            raise ValueError("depth must be >= 1 and context_length >= 3")
        return Transformer(self)


class Transformer(TextEncoder):
    name = "transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(self.vocab_size, c.width, padding_idx=0)
        # CLIP's init: token and position embeddings on the same small scale. With the
        # default N(0, 1) tokens the positions (std 0.01) are drowned out and word order,
        # which attribute binding needs, is learned several times slower.
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()  # padding
        self.pos = nn.Parameter(torch.randn(c.context_length, c.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            d_model=c.width,
            nhead=c.heads,
            dim_feedforward=int(c.width * c.mlp_ratio),
            dropout=c.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(c.width)
        self.out_dim = self.token_dim = c.width

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.grad_checkpointing = enable  # each transformer layer
        return True

    def forward_tokens(self, x):
        ids, mask = self.prepare(x)
        b, length = ids.shape
        if length > self.config.context_length:
            raise BadInput(
                f"text is {length} tokens long, the transformer takes at most "
                f"{self.config.context_length}",
                hint=f"use --encoder text=transformer:context_length={length}",
            )
        h = self.embed(ids) + self.pos[:length]  # (B, L, width)
        pad = ~mask
        pad[:, 0] = False  # a row of only padding would attend to nothing (NaN)
        if self.grad_checkpointing:
            layers = self.blocks.layers
            h = run_blocks(layers, h, True, src_key_padding_mask=pad)
        else:
            h = self.blocks(h, src_key_padding_mask=pad)
        h = self.ln(h)  # (B, L, width)
        if self.config.pool == "eos":
            pooled = h[torch.arange(b, device=h.device), eos_positions(ids, mask)]
        else:
            pooled = masked_mean(h, mask)
        return pooled, h, mask
