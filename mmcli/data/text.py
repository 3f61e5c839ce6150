"""Text tokenization.

The default tokenizer is language-agnostic: UTF-8 bytes, so Chinese, Arabic or emoji
captions work with no vocabulary file. Ids: PAD=0, BOS=1, EOS=2, byte b -> b+3
(vocabulary of 259). Every caption becomes ``[BOS, bytes..., EOS, PAD...]`` of a fixed
context length; a caption that does not fit is cut at a character boundary (never in
the middle of a UTF-8 sequence) and counted as truncated.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from mmcli.errors import BadInput

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
BYTE_VOCAB_SIZE = 256 + OFFSET


def normalize_text(text: str, lowercase: bool = False) -> str:
    """NFC-normalise and collapse whitespace (and lowercase when asked)."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text.lower() if lowercase else text


@dataclass(frozen=True)
class ByteTokenizer:
    context_length: int = 77
    lowercase: bool = False

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __post_init__(self) -> None:
        if self.context_length < 3:
            raise ValueError("context_length must be at least 3 (BOS, one token, EOS)")

    def encode(self, text: str) -> tuple[list[int], bool]:
        """Token ids of one caption (length == context_length) and whether it was cut."""
        data = normalize_text(text, self.lowercase).encode("utf-8")
        room = self.context_length - 2
        truncated = len(data) > room
        if truncated:
            cut = room
            while cut > 0 and (data[cut] & 0xC0) == 0x80:  # don't split a character
                cut -= 1
            data = data[:cut]
        ids = [BOS, *(b + OFFSET for b in data), EOS]
        ids.extend([PAD] * (self.context_length - len(ids)))
        return ids, truncated

    def encode_batch(self, texts: list[str]):
        """int32 numpy array [N, context_length] and the number of truncated captions."""
        return encode_rows(self.encode, texts, self.context_length, "int32")

    def decode(self, ids) -> str:
        data = bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "vocab_size": self.vocab_size,
            "pad_id": PAD,
            "bos_id": BOS,
            "eos_id": EOS,
            **asdict(self),
        }


TOKENIZERS = {"bytes": ByteTokenizer}


def tokenizer_from_spec(spec: dict[str, Any]) -> ByteTokenizer:
    """Rebuild the tokenizer a text table was made with (from its table spec); BadInput
    for an unknown tokenizer or a context length outside :mod:`mmcli.data.limits`."""
    from mmcli.data.limits import check_input_spec

    check_input_spec("text", spec)
    name = spec.get("tokenizer", "bytes")
    if not isinstance(name, str) or name not in TOKENIZERS:
        raise BadInput(
            f"unknown tokenizer {str(name)[:40]!r}", hint=f"known: {', '.join(TOKENIZERS)}"
        )
    return TOKENIZERS[name](
        context_length=int(spec.get("context_length", 77)),
        lowercase=bool(spec.get("lowercase", False)),
    )


def encode_rows(encode, texts: list[str], context_length: int, dtype: str):
    """``encode`` (text -> (ids, truncated)) over ``texts``: a numpy array
    [N, context_length] of ``dtype`` and the number of truncated texts."""
    import numpy as np

    out = np.zeros((len(texts), context_length), dtype=dtype)
    truncated = 0
    for i, text in enumerate(texts):
        ids, cut = encode(text)
        out[i] = ids
        truncated += cut
    return out, truncated
