"""``fuse-train``: learn a joint embedding space and cross-modal fusion.

    from mmcli.train.fuse import FuseConfig, fuse_train
    summary = fuse_train(["out/tensors"], "runs/toy", FuseConfig(), LoopConfig(epochs=10))

Recipe, in small steps: :func:`setup_data` (join the inputs, pick the splits),
:func:`setup_model` (encoders from the registry or the frozen feature backbones,
projection heads, fusion, classifier / matcher heads), :class:`FuseTask` (the loss of one
batch, and the validation metrics), and the shared loop :func:`mmcli.train.loop.fit`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.multimodal import ModelConfig, MultimodalModel
from mmcli.train import objectives as obj
from mmcli.train.data import Batch, BatchSampler, Dataset, load_dataset
from mmcli.train.parallel import gather, gather_with_grad

log = logging.getLogger("mmcli")

OBJECTIVES = ("contrastive", "sigmoid", "classify", "match")
DEFAULT_ENCODERS = {"image": "convnet", "text": "transformer", "audio": "melcnn"}
PAIR_ORDER = [("image", "text"), ("audio", "text"), ("image", "audio")]
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class FuseConfig:
    pairs: list[tuple[str, str]] | None = None  # None: every pair the data has
    objectives: dict[str, float] = field(default_factory=lambda: {"contrastive": 1.0})
    fusion: str = "none"
    fusion_width: int = 128
    fusion_depth: int = 2
    fusion_heads: int = 4
    embed_dim: int = 256
    head: str = "linear"  # linear | mlp (projection heads)
    encoders: dict[str, str] = field(default_factory=dict)  # end to end: modality -> spec
    weights: dict[str, str] = field(default_factory=dict)
    freeze: list[str] = field(
        default_factory=list
    )  # end to end: modalities whose encoder stays fixed
    temperature: float = 0.07  # initial; learned, clamped at 1/100
    captions_per_item: int = 1
    hard_negatives: str | None = None  # manifest field with hard-negative captions (NegCLIP)
    batch_with: str | None = None  # manifest field naming an item to share the batch with
    train_split: str = "train"
    val_split: str | None = None  # None: "val" when the data has it; a named split must exist
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown:
            raise BadInput(
                f"unknown objective {unknown[0]!r}", hint=f"known: {', '.join(OBJECTIVES)}"
            )
        if not any(w > 0 for w in self.objectives.values()):
            raise BadInput("every objective has weight 0", hint="give one a positive weight")
        if "contrastive" in self.objectives and "sigmoid" in self.objectives:
            raise BadInput("choose contrastive or sigmoid, not both")
        if self.fusion not in ("none", "concat", "attention"):
            raise BadInput(f"unknown fusion {self.fusion!r}", hint="use none, concat or attention")
        if "match" in self.objectives and self.fusion == "none":
            raise BadInput(
                "the match objective needs a fusion module", hint="use --fusion attention or concat"
            )
        if not 0 < self.temperature < 1:
            raise BadInput("--temperature must be in (0, 1)")
        if self.head not in ("linear", "mlp"):
            raise BadInput(f"unknown head {self.head!r}", hint="use linear or mlp")


def parse_pairs(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        if not sep or not a or not b or a == b:
            raise BadInput(f"bad pair {part!r}", hint="write pairs as image-text,audio-text")
        pairs.append((a, b))
    return pairs


def parse_objectives(text: str) -> dict[str, float]:
    """``contrastive`` or ``contrastive=1,classify=0.5`` -> {name: weight}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise BadInput(
                f"bad objective weight in {part!r}", hint="for example contrastive=1,classify=0.5"
            ) from None
    return out


# --------------------------------------------------------------------- setup


@dataclass
class Data:
    dataset: Dataset
    train: np.ndarray
    val_dataset: Dataset | None
    val: np.ndarray | None
    pairs: list[tuple[str, str]]
    modalities: list[str]


def _split_names(ds) -> str:
    return ", ".join(sorted({s for s in ds.splits if s is not None})) or "none"


def setup_data(sources: list[str], val_sources: list[str] | None, cfg: FuseConfig) -> Data:
    ds = load_dataset(sources)
    present = ds.modalities
    if cfg.pairs is None:
        pairs = [p for p in PAIR_ORDER if p[0] in present and p[1] in present]
        needs_pairs = "contrastive" in cfg.objectives or "sigmoid" in cfg.objectives
        if not pairs and needs_pairs:
            raise BadInput(
                f"the data has only {', '.join(present)}: contrastive training needs two modalities",
                hint="pass data with image and text (or audio), or use --objective classify",
            )
    else:
        pairs = cfg.pairs
        for a, b in pairs:
            for m in (a, b):
                if m not in present:
                    raise BadInput(
                        f"--pairs asks for {a}-{b} but the data has no {m}",
                        hint=f"the data has: {', '.join(present)}",
                    )
    modalities = [m for m in present if any(m in p for p in pairs)] or present
    if any(s is not None for s in ds.splits):
        train = ds.subset(cfg.train_split)
        if len(train) == 0:
            raise BadInput(
                f"the {cfg.train_split!r} split is empty",
                hint=f"the data's splits: {_split_names(ds)}; check --train-split",
            )
    else:
        train = ds.subset(None)
        log.info("the items have no split: training on all %d of them", len(train))
    val_ds, val = None, None
    if val_sources:
        val_ds = load_dataset(val_sources, modalities=modalities)
        val = val_ds.subset(None)
    elif cfg.val_split == "none":
        log.info("--val-split none: no validation, the last model is kept")
    elif any(s is not None for s in ds.splits):
        val_ds, val = ds, ds.subset(cfg.val_split or "val")
        if len(val) == 0:
            if cfg.val_split is not None:
                raise BadInput(
                    f"the {cfg.val_split!r} split is empty",
                    hint=f"the data's splits: {_split_names(ds)}; check --val-split",
                )
            log.warning("the data has no 'val' split: no validation, the last model is kept")
            val_ds, val = None, None
    else:
        log.warning("no validation data (no splits, no --val): the last model is kept")
    if cfg.hard_negatives:
        n = ds.attach_hard_negatives(cfg.hard_negatives)
        log.info("hard negatives: %d items have %r captions", n, cfg.hard_negatives)
    if "classify" in cfg.objectives and not (ds.labels[train] >= 0).any():
        raise BadInput("--objective classify needs labels, and the training items have none")
    return Data(ds, train, val_ds, val, pairs, modalities)


def setup_model(data: Data, cfg: FuseConfig) -> MultimodalModel:
    """A fresh model: encoders (registry / frozen feature backbones), heads, fusion, heads."""
    from mmcli.models.multimodal import build_model

    ds = data.dataset
    features = ds.kind == "features"
    encoders: dict[str, str] = {}
    for m in data.modalities:
        if features:
            if m in cfg.encoders:
                raise BadInput(
                    "--encoder applies to end-to-end training from tensor shards, not feature files"
                )
            encoders[m] = f"features:dim={ds.tables[m].row_shape[0]}"
        else:
            encoders[m] = cfg.encoders.get(m, DEFAULT_ENCODERS.get(m, "tiny"))
    unknown = sorted(set(cfg.encoders) - set(data.modalities))
    if unknown:
        raise BadInput(f"--encoder for {unknown[0]} but the training data has no {unknown[0]}")
    inputs = {m: ds.spec(m) for m in data.modalities}
    model = build_model(encoders, weights=cfg.weights, inputs=inputs)
    heads = {}
    for m in data.modalities:
        in_dim = model.encoders[m].out_dim
        spec: dict[str, Any] = {"kind": cfg.head, "in_dim": in_dim, "out_dim": cfg.embed_dim}
        if cfg.head == "mlp":
            spec["hidden"] = max(in_dim, cfg.embed_dim)
        heads[m] = spec
    fusion = None
    if cfg.fusion != "none":
        fusion = {"kind": cfg.fusion, "modalities": data.modalities}
        if cfg.fusion == "attention":
            fusion.update(
                width=cfg.fusion_width,
                depth=cfg.fusion_depth,
                heads=cfg.fusion_heads,
                max_tokens=_token_counts(model, ds, data.modalities),
            )
    contrastive = "contrastive" in cfg.objectives or "sigmoid" in cfg.objectives
    config = ModelConfig(
        encoders=model.config.encoders,
        heads=heads,
        embed_dim=cfg.embed_dim,
        fusion=fusion,
        inputs=model.config.inputs,
        logit_scale=math.log(1 / cfg.temperature) if contrastive else None,
        logit_bias=-10.0 if "sigmoid" in cfg.objectives else None,
        classifier={"labels": ds.label_names} if "classify" in cfg.objectives else None,
        matcher="match" in cfg.objectives,
        extra={"features": {m: ds.spec(m) for m in data.modalities}} if features else {},
    )
    if "sigmoid" in cfg.objectives:
        config.logit_scale = math.log(10.0)
    full = MultimodalModel(config)
    # keep the loaded encoder weights (and where they came from)
    for m in data.modalities:
        full.encoders[m].load_state_dict(model.encoders[m].state_dict())
        full.weights[m] = model.weights.get(m)
    for m in cfg.freeze:
        if m not in full.encoders:
            raise BadInput(f"--freeze {m}: the model has no {m} encoder")
        full.encoders[m].requires_grad_(False)
    return full


def _token_counts(model: MultimodalModel, ds: Dataset, modalities: list[str]) -> dict[str, int]:
    """How many tokens each encoder gives for this data's rows (sizes the position tables)."""
    counts = {}
    with torch.no_grad():
        for m in modalities:
            row = ds.tables[m].fetch(np.array([0]))
            _, tokens, _ = model.encoders[m].eval().forward_tokens(row)
            counts[m] = int(tokens.shape[1])
    return counts


# ---------------------------------------------------------------------- task


class FuseTask(nn.Module):
    """The loss of a batch (for the loop) and the validation metrics."""

    def __init__(self, model: MultimodalModel, cfg: FuseConfig, data: Data, *, seed: int = 0):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.data = data
        self.pairs = data.pairs
        self.modalities = data.modalities
        self.seed = seed

    # -- helpers ------------------------------------------------------------------
    def _encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """Normalized embeddings of every row, and tokens of block 0 when fusion needs them."""
        model = self.model
        b = len(batch)
        emb, toks = {}, {}
        need_tokens = model.fusion is not None and model.config.fusion["kind"] == "attention"
        for m in self.modalities:
            x = batch.data[m]
            if need_tokens and m in model.config.fusion.get("modalities", self.modalities):
                pooled, tok, mask = model.encoders[m].forward_tokens(x)
                toks[m] = (tok[:b], mask[:b] & batch.present[m][:, None])
            else:
                pooled = model.encoders[m](x)
            emb[m] = F.normalize(model.heads[m](pooled).float(), dim=-1)
        if "text_neg" in batch.data:
            text = model.encoders["text"]
            if need_tokens and "text" in toks:
                pooled, tok, mask = text.forward_tokens(batch.data["text_neg"])
                toks["text_neg"] = (tok, mask & batch.present["text_neg"][:, None])
            else:
                pooled = text(batch.data["text_neg"])
            emb["text_neg"] = F.normalize(model.heads["text"](pooled).float(), dim=-1)
        return emb, toks

    def _rows(self, batch: Batch, emb: dict[str, torch.Tensor], m: str):
        """(embeddings, item ids) of the rows of ``m`` that exist, gathered over ranks.

        For text, hard-negative captions are appended as rows of no item (id -1): they
        are negatives of every image and never a positive.
        """
        k = emb[m].shape[0] // len(batch)
        items = batch.items.repeat(k)
        present = batch.present[m].repeat(k)
        e, items, present = gather_with_grad(emb[m]), gather(items), gather(present)
        e, items = e[present], items[present]
        if m == "text" and "text_neg" in emb:
            neg = gather_with_grad(emb["text_neg"])[gather(batch.present["text_neg"])]
            e = torch.cat([e, neg])
            items = torch.cat([items, items.new_full((len(neg),), -1)])
        return e, items

    # -- the loss -----------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        model, w = self.model, self.cfg.objectives
        emb, toks = self._encode(batch)
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
        b = len(batch)
        first = {m: e[:b] for m, e in emb.items()}
        if "classify" in w:
            fused, _ = model.fuse_parts(toks, first, batch.present)
            losses["classify"] = obj.classify_loss(model.classifier(fused), batch.labels)
        if "match" in w:
            losses["match"] = self._match_loss(batch, first, toks)
        total = sum(w[k] * v for k, v in losses.items())
        logs = {"loss": float(total.detach())}
        logs.update({k: float(v.detach()) for k, v in losses.items()})
        if model.logit_scale is not None:
            logs["logit_scale"] = float(model.logit_scale.detach().exp())
        return total, logs

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

    def after_step(self) -> None:
        if self.model.logit_scale is not None:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- loop hooks -----------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        from mmcli.train.loop import decay_groups

        return decay_groups(list(self.model.named_parameters()), weight_decay)

    def save_model(self, path, **meta) -> None:
        self.model.to_checkpoint(path, **meta)

    def metric_names(self) -> list[str] | None:
        """The validation metrics this task can report (None: it does not validate)."""
        if self.data.val_dataset is None or self.data.val is None:
            return None
        from mmcli.train.evaluation import metric_names

        return metric_names(self.pairs, self.model.classifier is not None)

    def evaluate(self) -> dict[str, float]:
        if self.data.val_dataset is None or self.data.val is None:
            return {}
        from mmcli.train.evaluation import evaluate_model

        return evaluate_model(
            self.model,
            self.data.val_dataset,
            self.data.val,
            self.pairs,
            batch_size=self.cfg.eval_batch_size,
        )


# ----------------------------------------------------------------------- run


def fuse_train(
    sources: list[str],
    run_dir: str,
    cfg: FuseConfig,
    loop,
    *,
    val_sources: list[str] | None = None,
    batch_size: int = 128,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from mmcli.progress import null_progress
    from mmcli.train.loop import fit, training_run

    train_args = args or {"fuse": asdict(cfg), "loop": asdict(loop), "batch_size": batch_size}
    with training_run(
        run_dir,
        command="fuse-train",
        args=train_args,
        loop=loop,
        device=device,
        resume=resume,
        overwrite=overwrite,
    ) as (dev, dist, run):
        data = setup_data(sources, val_sources, cfg)
        model = setup_model(data, cfg)
        if loop.best_metric is None:
            loop.best_metric = _default_best_metric(data, cfg)
        sampler = BatchSampler(
            data.dataset,
            data.train,
            batch_size,
            seed=loop.seed,
            rank=dist.rank,
            world=dist.world_size,
            captions_per_item=cfg.captions_per_item,
            modalities=data.modalities,
            batch_with=cfg.batch_with,
        )
        task = FuseTask(model, cfg, data, seed=loop.seed)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "fuse-train: %d train items, %s val items, pairs %s, %s params (%s trained), fusion %s, device %s",
            len(data.train),
            len(data.val) if data.val is not None else 0,
            ",".join(f"{a}-{b}" for a, b in data.pairs),
            f"{n_params:,}",
            f"{n_train:,}",
            cfg.fusion,
            dev,
        )
        summary = fit(
            task,
            sampler,
            loop,
            run,
            device=dev,
            resume=resume,
            progress=progress or null_progress,
            train_args=train_args,
        )
    summary["parameters"] = n_params
    return summary


def _default_best_metric(data: Data, cfg: FuseConfig) -> str | None:
    if data.val is None:
        return None
    if data.pairs:
        a, b = data.pairs[0]
        return f"{a}-{b}/mean_recall@1"
    return "acc1" if "classify" in cfg.objectives else None


__all__ = ["FuseConfig", "FuseTask", "fuse_train", "parse_objectives", "parse_pairs"]
