"""Caption decoders: a small causal transformer that writes text from a source encoder.

The same decoder writes a caption from image tokens and a transcript from audio frames;
``config["source"]`` names the modality whose encoder it reads. Kinds:

* ``attention`` (Show, Attend and Tell; CoCa's captioner): every layer cross-attends
  over the source encoder's tokens (image grid positions, audio frames) and its pooled
  vector, each with a learned position;
* ``pooled`` (Show and Tell): the pooled vector alone, mapped to one prefix token the
  caption attends to (no cross-attention);
* ``prefix`` (ClipCap): the pooled vector mapped by an MLP to ``prefix_length`` tokens.

Its config is plain JSON in :attr:`ModelConfig.captioner` (the checkpoint rebuilds it
with no code), including the spec of the text table it was trained on (tokenizer, ids,
context length), so captions decode without the training data:

    dec = CaptionDecoder(DecoderConfig.from_dict(model.config.captioner))
    memory = dec.memory(pooled, tokens, mask)       # the source encoder's outputs
    logits = dec(memory, ids)                       # teacher forcing: [B, L, vocab]
    cache = dec.start(memory); logits = dec.step(cache, last_ids)   # one token, KV cache

PAD and BOS are never emitted: :meth:`CaptionDecoder.log_probs` gives them probability 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import BadInput

KINDS = ("attention", "pooled", "prefix")
#: the options of ``--caption-decoder KIND:key=value,...``
SPEC_FIELDS = ("width", "depth", "heads", "mlp_ratio", "prefix_length", "dropout")


@dataclass
class DecoderConfig:
    kind: str
    source: str  # the modality whose encoder the decoder reads
    pooled_dim: int  # the source encoder's pooled width
    token_dim: int = 0  # attention: the width of its tokens
    source_tokens: int = 0  # attention: the most source tokens (size of their position table)
    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    prefix_length: int = 1  # pooled: 1; prefix: ClipCap's prefix tokens
    dropout: float = 0.0
    #: the text table spec the decoder writes: tokenizer, vocab_size, pad/bos/eos ids, context_length
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInput(
                f"unknown caption decoder {self.kind!r}", hint=f"use {' | '.join(KINDS)}"
            )
        for name in ("pooled_dim", "width", "depth", "heads", "prefix_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInput(f"caption decoder: {name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise BadInput(
                f"caption decoder: width {self.width} is not divisible by heads {self.heads}"
            )
        if self.kind == "attention" and (self.token_dim < 1 or self.source_tokens < 1):
            raise BadInput("caption decoder: attention needs token_dim and source_tokens")
        if self.kind == "pooled" and self.prefix_length != 1:
            raise BadInput(
                "the pooled decoder has one prefix token", hint="use prefix:prefix_length=N"
            )
        if not 0 <= self.dropout < 1 or self.mlp_ratio <= 0:
            raise BadInput("caption decoder: dropout must be in [0, 1) and mlp_ratio positive")
        t = self.tokenizer
        ids = [t.get(k) for k in ("vocab_size", "pad_id", "bos_id", "eos_id", "context_length")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
            raise BadInput(
                "caption decoder: the tokenizer spec needs vocab_size, pad_id, bos_id, eos_id "
                "and context_length"
            )
        if max(ids[1:4]) >= ids[0] or ids[4] < 3:
            raise BadInput("caption decoder: bad tokenizer spec (ids outside the vocabulary)")

    # -- the tokenizer's numbers ----------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer["pad_id"])

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer["context_length"])

    @property
    def prefix(self) -> int:
        """Prefix positions before the caption (0 for attention)."""
        return 0 if self.kind == "attention" else self.prefix_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None) -> DecoderConfig:
        if not isinstance(d, Mapping):
            raise BadInput("model config: the caption decoder config is not an object", where=where)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(
                f"model config: the caption decoder has unknown entries ({', '.join(unknown)})",
                where=where,
                hint="it was written by a newer mmcli; upgrade mmcli",
            )
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise BadInput(f"model config: bad caption decoder ({e})", where=where) from None
        except BadInput as e:
            raise BadInput(e.message, where=where, hint=e.hint) from None


def parse_decoder_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``attention:width=128,depth=2`` -> ("attention", {"width": 128, "depth": 2})."""
    kind, _, rest = (text or "").strip().partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise BadInput(
            f"unknown caption decoder {kind!r}", hint=f"use {' | '.join(KINDS)}[:width=256,...]"
        )
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_FIELDS:
            raise BadInput(
                f"bad caption decoder option {part!r}",
                hint=f"options: {', '.join(SPEC_FIELDS)} (e.g. attention:width=128,depth=2)",
            )
        try:
            options[key] = float(value) if key in ("mlp_ratio", "dropout") else int(value)
        except ValueError:
            raise BadInput(f"bad caption decoder option {part!r}: not a number") from None
    if kind == "prefix":
        options.setdefault("prefix_length", 10)
    return kind, options


# ------------------------------------------------------------------------ modules


@dataclass
class Memory:
    """What the decoder reads of a batch of sources: prefix tokens [B, P, W] (pooled /
    prefix) or source tokens [B, M, W] with their mask [B, M] (attention)."""

    prefix: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        x = self.prefix if self.prefix is not None else self.tokens
        return int(x.shape[0])

    def index(self, rows: torch.Tensor) -> Memory:
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return Memory(pick(self.prefix), pick(self.tokens), pick(self.mask))


@dataclass
class Cache:
    """The KV cache of incremental decoding: per layer the self-attention keys and values
    so far [B, H, T, d], the cross-attention ones of the memory, and the position next."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    cross_mask: torch.Tensor | None
    length: int

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` of the self-attention cache (beam search). The memory's rows
        are the same for every beam of an item, so the cross cache stays."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        return x.view(b, t, self.heads, w // self.heads).transpose(1, 2)  # (B, H, T, d)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, q, k, v, mask=None, causal=False) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        b, h, t, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


class _Block(nn.Module):
    """Pre-LN: causal self-attention, cross-attention over the memory (attention kind), MLP."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.width)
        self.attn = _Attention(c.width, c.heads, c.dropout)
        self.cross: _Attention | None = None
        if c.kind == "attention":
            self.ln2 = nn.LayerNorm(c.width)
            self.cross = _Attention(c.width, c.heads, c.dropout)
        self.ln3 = nn.LayerNorm(c.width)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(c.width, hidden), nn.GELU(), nn.Linear(hidden, c.width), nn.Dropout(c.dropout)
        )

    def forward(self, x, past=None, cross_kv=None, cross_mask=None):
        """``x`` [B, T, W]. Without ``past``: causal over x. With ``past`` (k, v): x is one
        new position that attends to all of them. Returns (x, this layer's (k, v))."""
        h = self.ln1(x)
        q = self.attn.split(self.attn.q(h))
        k, v = self.attn.keys_values(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.attn.attend(q, k, v, causal=past is None and x.shape[1] > 1)
        if self.cross is not None:
            qc = self.cross.split(self.cross.q(self.ln2(x)))
            x = x + self.cross.attend(qc, *cross_kv, mask=cross_mask)
        return x + self.mlp(self.ln3(x)), (k, v)


class CaptionDecoder(nn.Module):
    """See the module docstring."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(c.prefix + c.context_length, c.width) * 0.01)
        if c.kind == "attention":
            self.source_proj = nn.Linear(c.token_dim, c.width)
            self.pooled_proj = nn.Linear(c.pooled_dim, c.width)
            # position 0: the pooled vector; then one per source token (grid cell, frame)
            self.source_pos = nn.Parameter(torch.randn(c.source_tokens + 1, c.width) * 0.02)
            self.source_ln = nn.LayerNorm(c.width)
        elif c.kind == "pooled":
            self.prefix_proj = nn.Linear(c.pooled_dim, c.width)
        else:
            hidden = c.width * c.prefix_length // 2
            self.prefix_proj = nn.Sequential(
                nn.Linear(c.pooled_dim, hidden),
                nn.Tanh(),
                nn.Linear(hidden, c.width * c.prefix_length),
            )
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.depth))
        self.ln = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab_size)
        banned = torch.zeros(c.vocab_size, dtype=torch.bool)
        banned[[c.pad_id, c.bos_id]] = True
        self.register_buffer("banned", banned, persistent=False)

    # -- the source ----------------------------------------------------------------
    def memory(self, pooled: torch.Tensor, tokens=None, mask=None) -> Memory:
        """The decoder's view of the source encoder's outputs (pooled [B, pooled_dim];
        tokens [B, T, token_dim] and mask [B, T] for the attention kind)."""
        c = self.config
        if c.kind != "attention":
            return Memory(prefix=self.prefix_proj(pooled).view(len(pooled), c.prefix, c.width))
        if tokens is None:
            raise ValueError("the attention decoder needs the source tokens")
        if tokens.shape[1] > c.source_tokens:
            raise BadInput(
                f"the {c.source} encoder gives {tokens.shape[1]} tokens, the caption decoder "
                f"was trained on at most {c.source_tokens}",
                hint=f"preprocess the {c.source} inputs as the training data was",
            )
        x = torch.cat([self.pooled_proj(pooled)[:, None], self.source_proj(tokens)], dim=1)
        x = self.source_ln(x + self.source_pos[: x.shape[1]])
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ones = torch.ones(len(mask), 1, dtype=torch.bool, device=mask.device)
        return Memory(tokens=x, mask=torch.cat([ones, mask.bool()], dim=1))

    def _cross(self, memory: Memory):
        if memory.tokens is None:
            return None, None
        kv = [blk.cross.keys_values(memory.tokens) for blk in self.blocks]
        return kv, memory.mask[:, None, None, :]

    # -- teacher forcing -------------------------------------------------------------
    def forward(self, memory: Memory, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] of the token after each of ``ids`` [B, L] (BOS first)."""
        c = self.config
        x = self.embed(ids.long())
        if memory.prefix is not None:
            x = torch.cat([memory.prefix.to(x.dtype), x], dim=1)
        if x.shape[1] > len(self.pos):
            raise BadInput(
                f"{ids.shape[1]} tokens are more than the decoder's {c.context_length}",
                hint=f"decode at most {c.context_length - 1} tokens",
            )
        x = x + self.pos[: x.shape[1]]
        cross_kv, cross_mask = self._cross(memory)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, None, cross_kv[i] if cross_kv else None, cross_mask)
        return self.head(self.ln(x[:, c.prefix :]))

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (float32, or float64 for a float64 model); PAD and BOS are
        impossible (-inf)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.log_softmax(logits.masked_fill(self.banned, float("-inf")), dim=-1)

    def caption_logprob(self, memory: Memory, ids: torch.Tensor) -> torch.Tensor:
        """Log-probability [B] of each caption ``ids`` [B, L] (``[BOS, ..., EOS, PAD...]``):
        the sum over its tokens after BOS up to EOS; padding adds nothing."""
        logp = self.log_probs(self(memory, ids[:, :-1]))
        target = ids[:, 1:].long()
        valid = target != self.config.pad_id
        picked = logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
        return picked.masked_fill(~valid, 0.0).sum(1)

    # -- incremental decoding ----------------------------------------------------------
    def start(self, memory: Memory) -> Cache:
        """An empty cache over ``memory`` (the prefix, if any, already run through)."""
        c = self.config
        cross_kv, cross_mask = self._cross(memory)
        b = len(memory)
        d = c.width // c.heads
        like = memory.prefix if memory.prefix is not None else memory.tokens
        empty = like.new_zeros(b, c.heads, 0, d)
        self_kv = [(empty, empty) for _ in self.blocks]
        if memory.prefix is not None:
            x = memory.prefix + self.pos[: c.prefix]
            for i, blk in enumerate(self.blocks):
                x, self_kv[i] = blk(x)
        return Cache(self_kv, cross_kv, cross_mask, c.prefix)

    def step(self, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the token after ``ids`` [B] (the latest token of each row);
        appends to ``cache``."""
        if cache.length >= len(self.pos):
            raise BadInput(f"the decoder writes at most {self.config.context_length} tokens")
        x = self.embed(ids.long())[:, None] + self.pos[cache.length]
        for i, blk in enumerate(self.blocks):
            cross = cache.cross_kv[i] if cache.cross_kv else None
            x, cache.self_kv[i] = blk(x, cache.self_kv[i], cross, cache.cross_mask)
        cache.length += 1
        return self.head(self.ln(x[:, 0]))


def build_captioner(spec: Mapping[str, Any], encoders: Mapping[str, nn.Module]) -> CaptionDecoder:
    """The decoder of a model config's ``captioner`` entry, over the model's ``encoders``
    (BadInput when it does not fit them)."""
    config = DecoderConfig.from_dict(spec)
    if config.source not in encoders or config.source == "text":
        raise BadInput(
            f"model config: the caption decoder reads {config.source!r}, not a source encoder"
        )
    enc = encoders[config.source]
    dims = (getattr(enc, "out_dim", None), getattr(enc, "token_dim", None))
    want = (config.pooled_dim, config.token_dim if config.kind == "attention" else dims[1])
    if dims != want:
        raise BadInput(
            f"model config: the caption decoder expects {config.source} features of "
            f"{want[0]} (pooled) / {want[1]} (tokens), the encoder gives {dims[0]} / {dims[1]}"
        )
    return CaptionDecoder(config)
