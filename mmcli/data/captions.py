"""The captions as given, beside the byte tokens: what pretrained tokenizers read.

``preprocess`` stores every caption twice: the byte tokens (``text``, cut at
``--context-length``) that mmcli's own text encoders take, and the caption string itself
(the string column ``text.raw``, one per text row), so a pretrained model's own tokenizer
sees the full caption, never one an earlier byte cut shortened.

    captions = caption_rows(shard)          # list[str], one per row of shard's text table

Shards written before mmcli kept the strings still work: their byte tokens are decoded
(with a warning naming how many captions were cut at the byte context length).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mmcli")

#: the string column of the captions of table ``text``
RAW_TEXT = "text.raw"
_warned: set[str] = set()


def raw_column(table: str) -> str:
    return f"{table}.raw"


def caption_rows(shard: Any, table: str = "text") -> list[str]:
    """The caption of every row of ``table`` in ``shard`` (a ShardFile), as given."""
    if shard.has_strings(raw_column(table)):
        return shard.strings(raw_column(table))
    from mmcli.data.text import tokenizer_from_spec

    spec = shard.specs.get(table, {})
    tokenizer = tokenizer_from_spec(spec)
    if shard.path not in _warned:
        _warned.add(shard.path)
        cut = int((shard.extra("stats", {}) or {}).get("truncated", 0))
        log.warning(
            "%s holds no caption strings (written by an older mmcli preprocess): decoding its "
            "byte tokens%s; preprocess again to give the model's tokenizer the full captions",
            shard.path,
            f", {cut} caption(s) stay cut at {tokenizer.context_length} bytes" if cut else "",
        )
    return [tokenizer.decode(row) for row in shard.numpy(table)]
