"""The captions the caption objective trains on, in the decoder's vocabulary.

With the byte tokenizer they are the text table itself (the ids preprocess wrote). With a
pretrained tokenizer (``--caption-tokenizer open_clip:ARCH | hf:DIR``, or by default the
pretrained text tower's own) every caption string of the data (``text.raw``, the captions
as given) is tokenized once when training starts, and batches read those ids by row.

    ids = CaptionIds(dataset, tokenizer)     # tokenizer None: the text table's byte ids
    ids.fetch(rows)                          # int64 [len(rows), context_length]
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mmcli.data.captions import caption_rows
from mmcli.errors import BadInput
from mmcli.models.tokenizers import caption_tokenizer
from mmcli.train.data import Dataset

log = logging.getLogger("mmcli")


def default_tokenizer(model: Any) -> str:
    """``bytes``, or the pretrained text tower's tokenizer (``open_clip:ARCH``, ``hf:DIR``)."""
    if "text" not in model.encoders:  # an nn.ModuleDict: no .get
        return "bytes"
    text = model.encoders["text"]
    if getattr(text, "takes_text", False):
        return str(text.tokenizer_spec()["tokenizer"])
    return "bytes"


def resolve_tokenizer(name: str | None, model: Any):
    """The caption tokenizer ``--caption-tokenizer`` names (None: :func:`default_tokenizer`);
    None for the byte tokenizer (the text table's own ids)."""
    name = name or default_tokenizer(model)
    if name.strip() == "bytes":
        return None
    return caption_tokenizer(name)


def _row_count(table: Any) -> int:
    starts = getattr(table, "starts", None)  # a shard table, or a text tower's TokenTable
    return int(starts[-1]) if starts is not None else int(len(table.data))


def plain_table(ds: Dataset) -> bool:
    """Whether the text table holds the byte ids preprocess wrote (not a pretrained text
    tower's own tokens, :mod:`mmcli.train.fuse.tokens`)."""
    return hasattr(ds.tables["text"], "starts")


class CaptionIds:
    """Token ids of every row of a dataset's text table, in the decoder's vocabulary."""

    def __init__(self, ds: Dataset, tokenizer: Any | None):
        self.ds = ds
        self.ids: np.ndarray | None = None
        if tokenizer is None:
            return
        sets = [ts for ts in ds.sources if "text" in ts.tables]
        if not sets:
            raise BadInput("the caption objective needs a text table of captions")
        texts = [t for shard in sets[0].shards for t in caption_rows(shard, "text")]
        if len(texts) != _row_count(ds.tables["text"]):
            raise BadInput(
                "the shards hold a different number of caption strings than text rows",
                where=sets[0].paths[0],
                hint="preprocess the data again",
            )
        self.ids, truncated = tokenizer.encode_batch(texts)
        if truncated:
            log.warning(
                "%d of %d captions are longer than the caption decoder's %d tokens: cut",
                truncated,
                len(texts),
                tokenizer.context_length,
            )

    def fetch(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 ids [len(rows), L] of text rows ``rows`` (global row indices; -1: a row
        that is not there, given as row 0, which the caller masks)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.ids is None:
            return self.ds.tables["text"].fetch(np.maximum(rows, 0)).long()
        return torch.from_numpy(self.ids[np.maximum(rows, 0)]).long()
