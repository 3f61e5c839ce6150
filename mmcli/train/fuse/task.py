"""fuse-train's task: the loss of one batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcli.models.multimodal import MultimodalModel
from mmcli.train import objectives as obj
from mmcli.train.fuse.caption import METRICS as CAPTION_METRICS
from mmcli.train.fuse.caption import caption_metrics, caption_term
from mmcli.train.fuse.caption_text import CaptionIds, plain_table
from mmcli.train.fuse.config import FuseConfig
from mmcli.train.parallel import gather, gather_with_grad
from mmcli.train.sampler import Batch
from mmcli.train.splits import Data
from mmcli.train.task import JointTask


class FuseTask(JointTask):
    """The loss of a batch: contrastive / sigmoid over each pair, classification and
    image-text matching through the fusion module."""

    def __init__(
        self, model: MultimodalModel, cfg: FuseConfig, data: Data, *, seed: int = 0, saved=None
    ):
        super().__init__(data, cfg.eval_batch_size)
        self.model = model
        # the whole model the checkpoints hold (``model`` may be a view of it that reads
        # cached frozen-tower outputs: mmcli.train.fuse.frozen); not a submodule
        self.__dict__["saved"] = saved if saved is not None else model
        self.cfg = cfg
        self.pairs = data.pairs
        self.modalities = data.modalities
        self.seed = seed
        # the caption objective: the source it reads, and whether that is all there is
        self.caption_from = model.captioner.config.source if model.captioner else None
        self.caption_only = set(cfg.objectives) == {"caption"}
        self.encoded = [self.caption_from] if self.caption_only else self.modalities
        self._caption_tokenizer = None  # built once, shared by the train and val captions
        self.caption_text = self._caption_ids(data.dataset)
        val = data.val_dataset
        same = val is None or val is data.dataset
        self.val_caption_text = self.caption_text if same else self._caption_ids(val)

    def _caption_ids(self, ds) -> CaptionIds | None:
        """The captions in the decoder's vocabulary (None: the text table's byte ids)."""
        if self.model.captioner is None:
            return None
        from mmcli.models.tokenizers import tokenizer_from_spec

        spec = self.model.captioner.config.tokenizer
        if spec.get("tokenizer", "bytes") == "bytes" and plain_table(ds):
            return None  # the text table's rows are the decoder's ids
        if self._caption_tokenizer is None:
            self._caption_tokenizer = tokenizer_from_spec(spec)
        return CaptionIds(ds, self._caption_tokenizer)

    # -- helpers ------------------------------------------------------------------
    def _encode(self, batch: Batch):
        """Normalized embeddings of every row, tokens of block 0 when fusion needs them, and
        the caption source's (pooled, tokens, mask) of block 0 (None without captioning)."""
        model = self.model
        emb, toks, src = {}, {}, None
        need_tokens = model.fusion is not None and model.config.fusion["kind"] == "attention"
        cap_tokens = model.captioner is not None and model.captioner.config.kind == "attention"
        for m in self.encoded:
            fused = need_tokens and m in model.config.fusion.get("modalities", self.modalities)
            want = fused or (m == self.caption_from and cap_tokens)
            pooled, tm = self.pooled_rows(model, batch, m, batch.data[m], tokens=want)
            if fused:
                toks[m] = tm
            if m == self.caption_from:
                src = (pooled[: len(batch)], *(tm if cap_tokens else (None, None)))
            emb[m] = F.normalize(_head(model, m, pooled).float(), dim=-1)
        if "text_neg" in batch.data:
            text = model.encoders["text"]
            if need_tokens and "text" in toks:
                pooled, tok, mask = text.forward_tokens(batch.data["text_neg"])
                toks["text_neg"] = (tok, mask & batch.present["text_neg"][:, None])
            else:
                pooled = text(batch.data["text_neg"])
            emb["text_neg"] = F.normalize(_head(model, "text", pooled).float(), dim=-1)
        return emb, toks, src

    def _rows(self, batch: Batch, emb: dict[str, torch.Tensor], m: str):
        """(embeddings, item ids) of the rows of ``m`` that exist, gathered over ranks.

        For text, hard-negative captions are appended as rows of no item (id -1): they
        are negatives of every image and never a positive.
        """
        e, items = self.gathered_rows(batch, emb[m], m)
        if m == "text" and "text_neg" in emb:
            neg = gather_with_grad(emb["text_neg"])[gather(batch.present["text_neg"])]
            e = torch.cat([e, neg])
            items = torch.cat([items, items.new_full((len(neg),), -1)])
        return e, items

    def save_model(self, path, **meta) -> None:
        self.saved.to_checkpoint(path, **meta)

    # -- the loss -----------------------------------------------------------------
    @property
    def coupled(self) -> bool:
        """contrastive, sigmoid and match (in-batch negatives) couple the batch's rows."""
        return bool(set(self.cfg.objectives) & {"contrastive", "sigmoid", "match"})

    def represent(self, batch: Batch, cached=None):
        """(embeddings, tokens, caption source) of :meth:`_encode`."""
        return self._encode(batch)

    def batch_loss(self, batch: Batch, reps):
        """contrastive / sigmoid over each pair, and match with in-batch negatives."""
        model, w = self.model, self.cfg.objectives
        emb, toks, _ = reps
        losses: dict[str, torch.Tensor] = {}
        if "contrastive" in w or "sigmoid" in w:
            scale = model.logit_scale.exp()
            parts = []
            for a, b in self.pairs:
                ea, ia = self._rows(batch, emb, a)
                eb, ib = self._rows(batch, emb, b)
                if "contrastive" in w:
                    parts.append(obj.contrastive_loss(ea, eb, ia, ib, scale))
                else:
                    parts.append(obj.sigmoid_loss(ea, eb, ia, ib, scale, model.logit_bias))
            name = "contrastive" if "contrastive" in w else "sigmoid"
            losses[name] = torch.stack(parts).mean()
        if "match" in w:
            first = {m: e[: len(batch)] for m, e in emb.items()}
            losses["match"] = self._match_loss(batch, first, toks)
        return _weighted(losses, w)

    def row_loss(self, batch: Batch, reps):
        """classify (the fused embedding's label) and caption: means over rows."""
        model, w = self.model, self.cfg.objectives
        emb, toks, src = reps
        losses: dict[str, torch.Tensor] = {}
        if "classify" in w:
            first = {m: e[: len(batch)] for m, e in emb.items()}
            fused, _ = model.fuse_parts(toks, first, batch.present)
            losses["classify"] = obj.classify_loss(model.classifier(fused), batch.labels)
        if "caption" in w:
            losses["caption"] = caption_term(
                model, batch, src, self.cfg.label_smoothing, self.caption_text
            )
        return _weighted(losses, w)

    # -- validation with a caption decoder --------------------------------------------
    def metric_names(self) -> list[str] | None:
        names = None if self.caption_only else super().metric_names()
        if self.caption_from and self.data.validates:
            names = (names or []) + CAPTION_METRICS
        return names

    def evaluate(self) -> dict[str, float]:
        metrics = {} if self.caption_only else super().evaluate()
        if self.caption_from and self.data.validates:
            data = self.data
            metrics.update(
                caption_metrics(
                    self.model,
                    data.val_dataset,
                    data.val,
                    self.eval_batch_size,
                    self.val_caption_text,
                )
            )
        return metrics

    def default_best_metric(self) -> str | None:
        if self.caption_only:
            return "caption/loss" if self.data.val is not None else None
        return super().default_best_metric()

    def _match_loss(self, batch: Batch, emb: dict[str, torch.Tensor], toks: dict) -> torch.Tensor:
        """Image-text matching with in-batch hard negatives (for every pair (a, b) trained)."""
        model = self.model
        g = torch.Generator(device="cpu")
        g.manual_seed(batch.key)  # the same negatives after a resume or on another rank count
        parts = []
        for a, b in self.pairs:
            both = batch.present[a] & batch.present[b]
            idx = torch.nonzero(both).squeeze(1)
            if len(idx) < 2:
                continue
            ea, eb = emb[a][idx], emb[b][idx]
            items = batch.items[idx]
            same = items[:, None] == items[None, :]
            # sample negatives by the contrastive logits (ALBEF): the most confusable pairs
            scale = model.logit_scale.detach().exp() if model.logit_scale is not None else 1.0
            sim = (ea @ eb.T).detach() * scale
            neg_b = obj.hard_negatives(sim.cpu(), same.cpu(), g).to(
                idx.device
            )  # for each a, a wrong b
            neg_a = obj.hard_negatives(sim.T.cpu(), same.T.cpu(), g).to(
                idx.device
            )  # for each b, a wrong a
            pos = model.match_score(self._pick(toks, emb, {a: idx, b: idx}))
            negs = [
                model.match_score(self._pick(toks, emb, {a: idx, b: idx[neg_b]})),
                model.match_score(self._pick(toks, emb, {a: idx[neg_a], b: idx})),
            ]
            if (
                b == "text" and "text_neg" in emb
            ):  # the hard-negative captions: (item, its wrong caption)
                keep = idx[batch.present["text_neg"][idx]]
                if len(keep):
                    negs.append(
                        model.match_score(self._pick(toks, emb, {a: keep, "text_neg": keep}))
                    )
            parts.append(obj.match_loss(pos, torch.cat(negs)))
        if not parts:
            return emb[self.modalities[0]].sum() * 0.0
        return torch.stack(parts).mean()

    def _pick(self, toks: dict, emb: dict, rows: dict[str, torch.Tensor]):
        """Fusion inputs for the given rows of each modality (others absent); the rows of
        ``text_neg`` stand in as the text."""
        t = {
            m.removesuffix("_neg"): (toks[m][0][r], toks[m][1][r])
            for m, r in rows.items()
            if m in toks
        }
        e = {m.removesuffix("_neg"): emb[m][r] for m, r in rows.items()}
        return t, e


def _weighted(losses: dict[str, torch.Tensor], w: dict[str, float]):
    """(the weighted sum of ``losses`` or None, their values by name)."""
    if not losses:
        return None, {}
    total = sum(w[k] * v for k, v in losses.items())
    return total, {k: float(v.detach()) for k, v in losses.items()}


def _head(model: MultimodalModel, m: str, pooled: torch.Tensor) -> torch.Tensor:
    """The projection head of ``m`` (a pretrained CLIP's towers end in the joint space)."""
    return model.heads[m](pooled) if m in model.heads else pooled
