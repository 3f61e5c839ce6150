"""fuse-train's ``caption`` objective: a text decoder over the source encoder.

Alone it trains a captioner (Show and Tell with ``--caption-decoder pooled``, Show,
Attend and Tell with ``attention``); with ``contrastive`` it is CoCa's recipe (the
contrastive loss on the pooled embeddings, the caption loss through the decoder, both
into the same source encoder). Teacher forcing on every sampled caption of an item
(``--captions-per-item``), label smoothing, padding masked. Validation reports
``caption/loss`` (token cross-entropy, no smoothing) and ``caption/token_acc``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.models.decoder import DecoderConfig, parse_decoder_spec
from mmcli.models.multimodal import MultimodalModel
from mmcli.train import objectives as obj
from mmcli.train.data import Dataset
from mmcli.train.fuse.caption_text import CaptionIds, resolve_tokenizer
from mmcli.train.fuse.config import FuseConfig
from mmcli.train.sampler import Batch
from mmcli.train.splits import Data
from mmcli.train.task import token_counts

METRICS = ["caption/loss", "caption/token_acc"]
SOURCES = ("image", "audio")


def caption_source(cfg: FuseConfig, data: Data) -> str:
    """The modality the decoder reads: ``--caption-from``, else image, else audio."""
    if "text" not in data.modalities:
        raise BadInput(
            "the caption objective needs captions: the training data has no text",
            hint=f"the data has: {', '.join(data.modalities)}",
        )
    if cfg.caption_from is not None:
        if cfg.caption_from == "text" or cfg.caption_from not in data.modalities:
            raise BadInput(
                f"--caption-from {cfg.caption_from}: the model trains on "
                f"{', '.join(data.modalities)}",
                hint=f"caption from one of them but text (add {cfg.caption_from}-text to --pairs)",
            )
        return cfg.caption_from
    for m in SOURCES:
        if m in data.modalities:
            return m
    others = [m for m in data.modalities if m != "text"]
    if not others:
        raise BadInput("the caption objective needs a modality to caption besides text")
    return others[0]


def captioner_spec(cfg: FuseConfig, data: Data, model: MultimodalModel) -> dict[str, Any]:
    """The ``captioner`` entry of the model config: the decoder and the text it writes."""
    source = caption_source(cfg, data)
    kind, options = parse_decoder_spec(cfg.caption_decoder)
    enc = model.encoders[source]
    pretrained = resolve_tokenizer(cfg.caption_tokenizer, model)
    if pretrained is not None:  # the caption strings through a pretrained tokenizer
        tokenizer = pretrained.spec()
    else:  # the text table's own byte ids
        tokenizer = dict(data.dataset.spec("text"))
        tokenizer.setdefault("context_length", int(data.dataset.tables["text"].row_shape[0]))
    spec = DecoderConfig(
        kind=kind,
        source=source,
        pooled_dim=enc.out_dim,
        token_dim=enc.token_dim if kind == "attention" else 0,
        source_tokens=(
            token_counts(model, data.dataset, [source])[source] if kind == "attention" else 0
        ),
        tokenizer=tokenizer,
        **options,
    )
    return spec.to_dict()


def caption_rows(
    batch: Batch, source: str, pad_id: int, text: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption ids [K*B, L] cut to the longest caption, the source row of each [K*B]);
    captions of items without text or without the source are all padding. ``text``: the
    batch's caption ids in the decoder's vocabulary (default: its text table rows)."""
    text = (batch.data["text"] if text is None else text).long().to(batch.items.device)
    b = len(batch)
    k = text.shape[0] // b
    keep = (batch.present["text"] & batch.present[source]).repeat(k)
    ids = text.masked_fill(~keep[:, None], pad_id)
    length = max(2, int((ids != pad_id).sum(1).max()))
    return ids[:, :length], torch.arange(b, device=text.device).repeat(k)


def caption_term(
    model: MultimodalModel,
    batch: Batch,
    src: tuple,
    smoothing: float,
    text: CaptionIds | None = None,
):
    """The caption loss of a batch; ``src``: the source encoder's (pooled, tokens, mask) of
    the batch's B items (tokens None for the pooled decoders); ``text``: the captions in
    the decoder's vocabulary (default: the batch's text rows)."""
    dec = model.captioner
    c = dec.config
    ids = text.fetch(batch.rows["text"]) if text is not None else None
    ids, owner = caption_rows(batch, c.source, c.pad_id, ids)
    memory = dec.memory(*src)
    if len(owner) != len(memory):
        memory = memory.index(owner)
    logp = dec.log_probs(dec(memory, ids[:, :-1]))
    return obj.caption_loss(logp, ids[:, 1:], c.pad_id, smoothing)


@torch.no_grad()
def caption_metrics(
    model: MultimodalModel,
    ds: Dataset,
    items: np.ndarray,
    batch_size: int = 256,
    text: CaptionIds | None = None,
) -> dict[str, float]:
    """Teacher-forced cross-entropy (nats per token) and next-token accuracy of every
    caption of ``items`` (``text``: their ids in the decoder's vocabulary)."""
    text = text or CaptionIds(ds, None)
    dec = model.captioner
    c = dec.config
    device = next(model.parameters()).device
    attention = c.kind == "attention"
    total = correct = count = 0.0
    for start in range(0, len(items), batch_size):
        chunk = [i for i in items[start : start + batch_size] if len(ds.rows_of[c.source][i])]
        text_rows = [ds.rows_of["text"][i] for i in chunk]
        if not chunk or not sum(len(r) for r in text_rows):
            continue
        src = np.array([ds.rows_of[c.source][i][0] for i in chunk])
        x = ds.tables[c.source].fetch(src).to(device)
        if attention:
            memory = dec.memory(*model.encoders[c.source].forward_tokens(x))
        else:
            memory = dec.memory(model.encoders[c.source](x))
        owner = torch.from_numpy(
            np.concatenate([np.full(len(r), j) for j, r in enumerate(text_rows)])
        )
        ids = text.fetch(np.concatenate(text_rows)).to(device)
        ids = ids[:, : max(2, int((ids != c.pad_id).sum(1).max()))]
        logp = dec.log_probs(dec(memory.index(owner.to(device)), ids[:, :-1]))
        target = ids[:, 1:]
        valid = target != c.pad_id
        nll = -logp.gather(-1, target[..., None]).squeeze(-1)
        total += float(nll[valid].sum())
        correct += float((logp.argmax(-1) == target)[valid].sum())
        count += float(valid.sum())
    if not count:
        return {}
    return {"caption/loss": total / count, "caption/token_acc": correct / count}
