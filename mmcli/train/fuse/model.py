"""fuse-train's set-up: the data and a fresh model for it."""

from __future__ import annotations

import math

from mmcli.errors import BadInput
from mmcli.modalities import train_encoder
from mmcli.models.multimodal import ModelConfig, MultimodalModel, build_model
from mmcli.train.fuse.caption import captioner_spec
from mmcli.train.fuse.config import FuseConfig
from mmcli.train.splits import Data, load_splits
from mmcli.train.task import head_spec, token_counts


def setup_data(sources: list[str], val_sources: list[str] | None, cfg: FuseConfig) -> Data:
    """Join the inputs, pick the pairs and the train / validation items."""
    return load_splits(sources, val_sources, cfg.split_spec())


def setup_model(data: Data, cfg: FuseConfig) -> MultimodalModel:
    """A fresh model: encoders (registry / frozen feature backbones), heads, fusion, heads."""
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
            encoders[m] = cfg.encoders.get(m) or train_encoder(m, ds.tables[m].row_shape)
    unknown = sorted(set(cfg.encoders) - set(data.modalities))
    if unknown:
        raise BadInput(f"--encoder for {unknown[0]} but the training data has no {unknown[0]}")
    inputs = {m: ds.spec(m) for m in data.modalities}
    model = build_model(encoders, weights=cfg.weights, inputs=inputs)
    heads = {
        m: head_spec(cfg.head, model.encoders[m].out_dim, cfg.embed_dim) for m in data.modalities
    }
    fusion = None
    if cfg.fusion != "none":
        fusion = {"kind": cfg.fusion, "modalities": data.modalities}
        if cfg.fusion == "attention":
            fusion.update(
                width=cfg.fusion_width,
                depth=cfg.fusion_depth,
                heads=cfg.fusion_heads,
                max_tokens=token_counts(model, ds, data.modalities),
            )
    contrastive = cfg.contrastive
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
        captioner=captioner_spec(cfg, data, model) if "caption" in cfg.objectives else None,
        extra={"features": {m: ds.spec(m) for m in data.modalities}} if features else {},
    )
    if "sigmoid" in cfg.objectives:
        config.logit_scale = math.log(10.0)
    full = MultimodalModel(config)
    # keep the loaded encoder weights (and where they came from)
    for m in data.modalities:
        full.encoders[m].load_state_dict(model.encoders[m].state_dict())
        full.weights[m] = model.weights.get(m)
    freeze_encoders(full, cfg.freeze)
    return full


def freeze_encoders(model: MultimodalModel, modalities) -> None:
    """``--freeze``: the encoders of ``modalities`` keep their weights."""
    for m in modalities:
        if m not in model.encoders:
            raise BadInput(f"--freeze {m}: the model has no {m} encoder")
        model.encoders[m].requires_grad_(False)
