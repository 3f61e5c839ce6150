"""Captions for a pretrained text tower that trains: tokenized once by its own tokenizer.

A text encoder with its own tokenizer (``open_clip``, ``hf``: ``takes_text``) reads the
full caption strings the shards keep (``text.raw``), not mmcli's byte tokens. For
training they are tokenized once, up front, into one int64 table ``[rows, K, L]`` (K:
the tokenizer's outputs, ids and an attention mask for transformers) that the sampler
reads like any other table; :class:`PackedText` unpacks a batch of those rows into the
encoder's own :class:`~mmcli.models.adapters.common.TextBatch`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from mmcli.data.captions import caption_rows
from mmcli.models.adapters.common import TextBatch
from mmcli.models.base import TextEncoder

log = logging.getLogger("mmcli")


class TokenTable:
    """Every caption of a text table tokenized by ``encoder.tokenize`` (see the module doc);
    rows in the table's global order. Fetched like :class:`mmcli.train.data._Table`."""

    name = "text"
    bf16 = False

    def __init__(self, source, encoder):
        captions = [c for shard in source.shards for c in caption_rows(shard, "text")]
        batch = encoder.tokenize(captions)
        self.keys = list(batch.tensors)
        self.dtypes = [batch[k].dtype for k in self.keys]
        self.data = torch.stack([batch[k].long() for k in self.keys], 1)  # (N, K, L)
        self.spec = dict(source.spec("text"))
        self.row_shape = tuple(self.data.shape[1:])
        self.dtype = np.dtype(np.int64)
        if batch.truncated:
            log.info(
                "%d of %d captions are longer than the text tower's %d tokens: cut",
                batch.truncated, len(captions), getattr(encoder, "context_length", 0),
            )  # fmt: skip

    def fetch(self, rows: np.ndarray) -> torch.Tensor:
        return self.data[torch.from_numpy(np.asarray(rows, dtype=np.int64))]

    def model_input(self, encoder, rows: np.ndarray) -> torch.Tensor:
        """What the (packed) text encoder takes for ``rows``: their tokens, already made
        (the interface of :meth:`mmcli.train.data._Table.model_input`)."""
        return self.fetch(np.asarray(rows))


class PackedText(TextEncoder):
    """A pretrained text encoder over :class:`TokenTable` rows ``[B, K, L]``."""

    def __init__(self, inner: nn.Module, table: TokenTable):
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name
        self.keys, self.dtypes = table.keys, table.dtypes
        self.out_dim, self.token_dim = inner.out_dim, inner.token_dim

    def _batch(self, x: torch.Tensor) -> TextBatch:
        return TextBatch({k: x[:, i].to(d) for i, (k, d) in enumerate(zip(self.keys, self.dtypes))})

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        return self.inner.set_grad_checkpointing(enable)

    def forward(self, x):
        return self.inner(self._batch(x))

    def forward_tokens(self, x):
        return self.inner.forward_tokens(self._batch(x))
