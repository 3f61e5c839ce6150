"""The tokenizers a caption decoder writes with: UTF-8 bytes, or a pretrained one.

``fuse-train --caption-tokenizer SPEC`` picks the vocabulary of the caption decoder:

* ``bytes`` (the default without a pretrained text tower): the text table's own byte ids
  (:mod:`mmcli.data.text`), so Chinese captions work with no vocabulary file;
* ``open_clip:ARCH``: open_clip's tokenizer of that architecture (the CLIP BPE bundled with
  open_clip: lowercased, whitespace cleaned);
* ``hf:DIR`` (or a hub id, fetched only when online): a transformers tokenizer folder
  with a fast tokenizer (``tokenizer.json``).

A pretrained tokenizer reads the captions as given (the ``text.raw`` strings preprocess
keeps), and its spec is self-contained, so ``mmcli caption`` decodes with no file:
open_clip's BPE ships inside open_clip; an HF tokenizer's ``tokenizer.json`` is embedded,
with its ``tokenizer_config.json`` and ``special_tokens_map.json``, zlib-compressed and
base64-encoded (``tokenizer_json_z``: all-MiniLM-L6-v2's 466 kB become ~250 kB) and
rebuilt with ``AutoTokenizer`` (checked: vocabulary size and a round trip). Captions are ``[BOS, ids..., EOS, PAD...]``; PAD is an id of its own
(``vocab_size - 1``, added after the tokenizer's vocabulary) so that no real token is
masked as padding.

    tok = caption_tokenizer("hf:path/to/minilm", context_length=32)
    ids, truncated = tok.encode_batch(["a red circle"])      # int32 [1, 32]
    tok.decode(ids[0])                                        # "a red circle"
    tok = tokenizer_from_spec(tok.spec())                     # the same, from the checkpoint
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import numpy as np

from mmcli.data.text import ByteTokenizer, encode_rows
from mmcli.data.text import tokenizer_from_spec as byte_tokenizer_from_spec
from mmcli.errors import BadInput

KINDS = ("bytes", "open_clip", "hf")
#: the most bytes an embedded tokenizer.json may inflate to
MAX_TOKENIZER_JSON = 64 * 2**20
HINT = "use bytes, open_clip:ARCH (e.g. open_clip:ViT-B-32) or hf:DIR (a tokenizer folder)"


class PretrainedTokenizer:
    """Caption ids with a library tokenizer's vocabulary plus BOS / EOS / PAD of the
    decoder. ``encode_ids(text)`` / ``decode_ids(ids)`` are the library's, without
    special tokens."""

    def __init__(
        self,
        kind: str,
        name: str,
        context_length: int,
        encode,
        decode,
        size: int,
        bos: int,
        eos: int,
        extra: dict[str, Any] | None = None,
    ):
        if context_length < 3:
            raise BadInput("the caption context length must be at least 3")
        self.kind, self.name, self.context_length = kind, name, int(context_length)
        self.encode_ids, self.decode_ids = encode, decode
        self.bos_id, self.eos_id = int(bos), int(eos)
        self.pad_id = int(size)  # one id past the library's vocabulary
        self.vocab_size = int(size) + 1
        self.extra = extra or {}

    def encode(self, text: str) -> tuple[list[int], bool]:
        body = list(self.encode_ids(text))
        room = self.context_length - 2
        ids = [self.bos_id, *body[:room], self.eos_id]
        return ids + [self.pad_id] * (self.context_length - len(ids)), len(body) > room

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return encode_rows(self.encode, texts, self.context_length, "int64")

    def decode(self, ids) -> str:
        special = (self.bos_id, self.eos_id, self.pad_id)
        body = []
        for i in (int(x) for x in ids):
            if i == self.eos_id:
                break
            if i not in special:
                body.append(i)
        return self.decode_ids(body).strip()

    def spec(self) -> dict[str, Any]:
        return {
            "tokenizer": f"{self.kind}:{self.name}",
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "context_length": self.context_length,
            **self.extra,
        }


# ------------------------------------------------------------------ the libraries


def _open_clip(arch: str, context_length: int | None) -> PretrainedTokenizer:
    from mmcli.models.adapters.common import quiet_library, require
    from mmcli.models.adapters.open_clip import OpenClipTextConfig, model_name

    oc = require("open_clip", "--caption-tokenizer open_clip:...")
    with quiet_library():
        tok = oc.get_tokenizer(model_name(OpenClipTextConfig(arch=arch)))
    n = int(context_length or tok.context_length)
    if hasattr(tok, "sot_token_id") and hasattr(tok, "encoder"):  # the bundled CLIP BPE
        return _simple(arch, n)
    inner = getattr(tok, "tokenizer", None)
    if inner is None:
        raise BadInput(
            f"open_clip:{arch} has a tokenizer mmcli cannot caption with",
            hint="use hf:DIR with the model's tokenizer folder",
        )
    return _from_hf_object(inner, f"open_clip:{arch}", n)


def _simple(arch: str, context_length: int) -> PretrainedTokenizer:
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    return PretrainedTokenizer(
        "open_clip",
        arch,
        context_length,
        st.encode,
        st.decode,
        len(st.encoder),
        st.sot_token_id,
        st.eot_token_id,
    )


#: the files of a saved tokenizer that travel in the checkpoint
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _from_hf_object(tok: Any, where: str, context_length: int) -> PretrainedTokenizer:
    """An HF tokenizer object, saved and packed into its spec, then rebuilt from it (so
    training and ``mmcli caption`` use the very same tokenizer)."""
    import json
    import tempfile
    from pathlib import Path

    if not getattr(tok, "is_fast", False):
        raise BadInput(
            "captions need a fast tokenizer (tokenizer.json)",
            where=where,
            hint="save the tokenizer with transformers' AutoTokenizer (use_fast=True)",
        )
    with tempfile.TemporaryDirectory(prefix="mmcli-tokenizer-") as folder:
        tok.save_pretrained(folder)
        files = {
            f: (Path(folder) / f).read_text(encoding="utf-8")
            for f in HF_FILES
            if (Path(folder) / f).is_file()
        }
    blob = json.dumps(files, sort_keys=True).encode("utf-8")
    packed = base64.b64encode(zlib.compress(blob, 9)).decode("ascii")
    return _from_files(files, where, context_length, packed)


def _from_files(files: dict[str, str], name: str, n: int, packed: str) -> PretrainedTokenizer:
    import tempfile
    from pathlib import Path

    from mmcli.models.adapters.common import check_hf_tokenizer, quiet_library, require

    tf = require("transformers", "hf tokenizers")
    if not isinstance(files, dict) or "tokenizer.json" not in files:
        raise BadInput("the caption decoder's embedded tokenizer has no tokenizer.json", where=name)
    with tempfile.TemporaryDirectory(prefix="mmcli-tokenizer-") as folder:
        for f in HF_FILES:
            if isinstance(files.get(f), str):
                (Path(folder) / f).write_text(files[f], encoding="utf-8")
        try:
            with quiet_library():
                tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"cannot load the tokenizer ({str(e)[:120]})", where=name) from None
    check_hf_tokenizer(tok, where=name)  # a vocabulary that did not load fails here
    bos = _first(tok, ("bos_token_id", "cls_token_id"))
    eos = _first(tok, ("eos_token_id", "sep_token_id"))
    if bos is None or eos is None or bos == eos:
        raise BadInput(
            "the tokenizer has no distinct start and end tokens (bos/cls, eos/sep)", where=name
        )
    encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    kind, _, rest = name.partition(":")
    return PretrainedTokenizer(
        kind, rest, n, encode, decode, len(tok), bos, eos, {"tokenizer_json_z": packed}
    )


def _first(tok: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(tok, n, None)
        if isinstance(v, int):
            return v
    return None


def _hf(path: str, context_length: int | None) -> PretrainedTokenizer:
    from mmcli.models.adapters.hf import load_auto

    tok = load_auto(path, "AutoTokenizer")
    limit = int(getattr(tok, "model_max_length", 0) or 0)
    n = int(context_length or (min(limit, 77) if limit >= 3 else 77))
    return _from_hf_object(tok, f"hf:{path}", n)


# ------------------------------------------------------------------ entry points


def check_tokenizer_spec(spec: str | None) -> None:
    """The form of ``--caption-tokenizer`` (None: the default), before anything loads."""
    if spec is None:
        return
    kind, _, rest = spec.strip().partition(":")
    if (kind == "bytes" and not rest) or (kind in ("open_clip", "hf") and rest.strip()):
        return
    raise BadInput(f"bad --caption-tokenizer {spec[:80]!r}", hint=HINT)


def caption_tokenizer(spec: str, context_length: int | None = None):
    """The tokenizer ``--caption-tokenizer spec`` names (``context_length``: the caption
    length in ids with BOS and EOS; default the tokenizer's own)."""
    check_tokenizer_spec(spec or "")
    kind, _, rest = spec.strip().partition(":")
    if kind == "bytes":
        return ByteTokenizer(context_length=int(context_length or 77))
    if context_length is not None and not 3 <= context_length <= 4096:
        raise BadInput("the caption context length must be in [3, 4096]")
    return (
        _open_clip(rest.strip(), context_length)
        if kind == "open_clip"
        else _hf(rest.strip(), context_length)
    )


def tokenizer_from_spec(spec: dict[str, Any]):
    """Rebuild a caption decoder's tokenizer from its spec (checkpoint metadata), offline."""
    name = spec.get("tokenizer", "bytes")
    if name == "bytes" or not isinstance(name, str) or ":" not in name:
        return byte_tokenizer_from_spec(spec)
    kind, _, rest = name.partition(":")
    n = int(spec.get("context_length", 77))
    if kind == "open_clip" and "tokenizer_json_z" not in spec:
        return _simple(rest, n)
    packed = spec.get("tokenizer_json_z")
    if kind not in ("open_clip", "hf") or not isinstance(packed, str):
        raise BadInput(f"unknown caption tokenizer {name[:60]!r}", hint=HINT)
    try:
        inflate = zlib.decompressobj()
        blob = inflate.decompress(base64.b64decode(packed, validate=True), MAX_TOKENIZER_JSON)
        if inflate.unconsumed_tail:
            raise ValueError("larger than the limit")
    except (ValueError, zlib.error) as e:
        raise BadInput(f"bad embedded tokenizer of the caption decoder ({e})") from None
    try:
        files = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"bad embedded tokenizer of the caption decoder ({e})") from None
    tok = _from_files(files, name, n, packed)
    if (tok.vocab_size, tok.bos_id, tok.eos_id) != (
        spec.get("vocab_size"),
        spec.get("bos_id"),
        spec.get("eos_id"),
    ):
        raise BadInput("the caption decoder's tokenizer does not match its vocabulary size")
    return tok
