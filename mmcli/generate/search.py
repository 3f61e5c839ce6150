"""Decoding a caption decoder: greedy and beam search, with or without the KV cache.

    out = generate(decoder, memory, DecodeOptions(beam=4, max_tokens=40))
    out[0].tokens, out[0].score      # token ids after BOS (no EOS), log-probability

Both run a whole batch at once. ``cache=True`` (the default) feeds one new token per
step through :meth:`CaptionDecoder.step` (keys and values of the earlier positions are
kept); ``cache=False`` recomputes the whole prefix every step (the reference the cache is
tested against). A caption's ``score`` is its log-probability under the decoder (natural
log, summed over its tokens including the end token); beam search ranks the finished
beams by ``score / length ** length_penalty`` (``length``: tokens including the end
token), so 0 (the default) picks the most probable caption and larger values favour
longer ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmcli.errors import BadInput
from mmcli.models.decoder import CaptionDecoder, Memory


@dataclass
class DecodeOptions:
    beam: int = 1
    max_tokens: int | None = None  # tokens after BOS, the end token included (None: the most)
    length_penalty: float = 0.0
    cache: bool = True

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise BadInput("--beam must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadInput("--max-tokens must be at least 1")


@dataclass
class Generated:
    tokens: list[int]  # after BOS, without the end token
    score: float  # log-probability (natural log) of tokens + the end token
    finished: bool  # False: cut at max_tokens before the end token


def _score_dtype(decoder: CaptionDecoder) -> torch.dtype:
    return torch.promote_types(decoder.pos.dtype, torch.float32)


def max_tokens(decoder: CaptionDecoder, opts: DecodeOptions) -> int:
    most = decoder.config.context_length - 1  # BOS + tokens fit the position table
    if opts.max_tokens is None:
        return most
    return min(opts.max_tokens, most)


def _next_logp(decoder: CaptionDecoder, memory: Memory, seq: torch.Tensor, cache) -> torch.Tensor:
    if cache is not None:
        logits = decoder.step(cache, seq[:, -1])
    else:
        logits = decoder(memory, seq)[:, -1]
    return decoder.log_probs(logits)


def _results(decoder: CaptionDecoder, seq, scores, finished) -> list[Generated]:
    c = decoder.config
    out = []
    for row, score, done in zip(seq[:, 1:].tolist(), scores.tolist(), finished.tolist()):
        if c.eos_id in row:
            row = row[: row.index(c.eos_id)]
        out.append(Generated([t for t in row if t != c.pad_id], float(score), bool(done)))
    return out


@torch.no_grad()
def greedy(decoder: CaptionDecoder, memory: Memory, opts: DecodeOptions) -> list[Generated]:
    """The most probable token at each step, for every row of ``memory``."""
    c = decoder.config
    b = len(memory)
    device = decoder.pos.device
    seq = torch.full((b, 1), c.bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(b, device=device, dtype=_score_dtype(decoder))
    done = torch.zeros(b, dtype=torch.bool, device=device)
    cache = decoder.start(memory) if opts.cache else None
    for _ in range(max_tokens(decoder, opts)):
        logp = _next_logp(decoder, memory, seq, cache)
        tok = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, tok[:, None]).squeeze(1))
        tok = tok.masked_fill(done, c.pad_id)
        seq = torch.cat([seq, tok[:, None]], dim=1)
        done |= tok == c.eos_id
        if bool(done.all()):
            break
    return _results(decoder, seq, scores, done)


@torch.no_grad()
def beam_search(decoder: CaptionDecoder, memory: Memory, opts: DecodeOptions) -> list[Generated]:
    """``opts.beam`` hypotheses per row, extended by their best continuations each step; a
    finished hypothesis stays in the beam (its score fixed) until better ones push it out."""
    c = decoder.config
    b, n = len(memory), opts.beam
    device = decoder.pos.device
    rows = torch.arange(b, device=device).repeat_interleave(n)
    memory = memory.index(rows)
    seq = torch.full((b * n, 1), c.bos_id, dtype=torch.long, device=device)
    scores = torch.full((b, n), float("-inf"), device=device, dtype=_score_dtype(decoder))
    scores[:, 0] = 0.0  # one live hypothesis at first: the others would repeat it
    done = torch.zeros(b * n, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * n, device=device, dtype=scores.dtype)
    cache = decoder.start(memory) if opts.cache else None
    frozen = None
    base = (torch.arange(b, device=device) * n)[:, None]
    for _ in range(max_tokens(decoder, opts)):
        logp = _next_logp(decoder, memory, seq, cache)  # (b*n, V)
        if frozen is None:
            frozen = torch.full_like(logp[0], float("-inf"))
            frozen[c.pad_id] = 0.0  # a finished hypothesis continues with padding, at no cost
        logp = torch.where(done[:, None], frozen, logp)
        vocab = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(b, n * vocab)
        scores, index = cand.topk(n, dim=1)
        pick = (base + index // vocab).view(-1)
        tok = (index % vocab).view(-1)
        lengths = lengths[pick] + (~done[pick]).float()
        done = done[pick] | (tok == c.eos_id)
        seq = torch.cat([seq[pick], tok[:, None]], dim=1)
        if cache is not None:
            cache.reorder(pick)
        if bool(done.all()):
            break
    ranked = scores / lengths.view(b, n).clamp_min(1) ** opts.length_penalty
    # a finished hypothesis beats one cut at max_tokens
    ranked = torch.where(done.view(b, n), ranked, ranked - 1e9)
    best = (base[:, 0] + ranked.argmax(1)).long()
    return _results(decoder, seq[best], scores.view(-1)[best], done[best])


def generate(decoder: CaptionDecoder, memory: Memory, opts: DecodeOptions) -> list[Generated]:
    """Greedy decoding for ``beam == 1``, else beam search."""
    if opts.beam == 1:
        return greedy(decoder, memory, opts)
    return beam_search(decoder, memory, opts)
