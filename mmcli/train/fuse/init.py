"""``fuse-train --init SPEC``: fine-tune a model instead of starting from scratch.

``SPEC`` is an mmcli checkpoint, ``open_clip:ARCH`` (weights from ``--weights FILE``, or
``pretrained=TAG`` when online) or ``hf:DIR`` (:func:`mmcli.models.load_model`). Training
starts from its towers, heads and logit scale (and bias); ``--freeze image`` locks a tower
(LiT). The checkpoint written holds every weight and a config naming the adapter and its
library's version, so it rebuilds with no original file (the library must be installed).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.multimodal import MultimodalModel
from mmcli.train.fuse.config import PAIR_OBJECTIVES, FuseConfig
from mmcli.train.fuse.model import freeze_encoders
from mmcli.train.splits import Data


def check_init_config(cfg: FuseConfig) -> None:
    """What ``--init`` trains: the towers, heads and temperature, with a pair objective."""
    if cfg.encoders or cfg.weights:
        raise BadInput(
            "--encoder and --weights MODALITY=FILE do not apply with --init (the model brings "
            "its encoders)",
            hint="drop them; --weights FILE (no modality) is the weights of --init open_clip:ARCH",
        )
    other = sorted(set(cfg.objectives) - set(PAIR_OBJECTIVES))
    if other or cfg.fusion != "none":
        raise BadInput(
            f"--init fine-tunes the towers with a contrastive or sigmoid objective; "
            f"{'--objective ' + other[0] if other else '--fusion ' + cfg.fusion} is not supported with it",
            hint="use --objective contrastive (or sigmoid) and --fusion none",
        )
    if cfg.hard_negatives:
        raise BadInput("--hard-negatives does not apply with --init")


def init_model(data: Data, cfg: FuseConfig) -> MultimodalModel:
    """The ``--init`` model, checked against the data, with what the objective needs."""
    from mmcli.models.pretrained import load_model

    check_init_config(cfg)
    model = load_model(cfg.init, weights=cfg.init_weights)
    if cfg.pairs is None:  # every pair of the data the model encodes (not the others)
        _keep_pairs(
            data, [p for p in data.pairs if p[0] in model.encoders and p[1] in model.encoders]
        )
    missing = [m for m in data.modalities if m not in model.encoders]
    if missing:
        raise BadInput(
            f"--init {cfg.init} has no {missing[0]} encoder (it has: {', '.join(model.modalities)})",
            hint="train on the modalities it encodes (--pairs), or drop --init",
        )
    for ts in data.dataset.sources:  # the right kind of rows (image size, features width)
        for m in data.modalities:
            if m in ts.tables:
                model.check_input(ts, m)
    _pretrained_config(model)
    with torch.no_grad():
        if model.logit_scale is None:
            model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
            model.config.logit_scale = float(model.logit_scale)
        if "sigmoid" in cfg.objectives and model.logit_bias is None:
            model.logit_bias = nn.Parameter(torch.tensor(-10.0))
            model.config.logit_bias = -10.0
    freeze_encoders(model, cfg.freeze)
    return model.train()


def _pretrained_config(model: MultimodalModel) -> None:
    """The weights will be in the checkpoint: a named tag is not fetched again on rebuild."""
    encoders = copy.deepcopy(model.config.encoders)
    for spec in encoders.values():
        config = spec.get("config") or {}
        if config.get("pretrained"):
            config["pretrained"] = None
    model.config.encoders = encoders
    # what it was fine-tuned from (the adapter and library version: extra["pretrained"])
    model.config.extra = {**(model.config.extra or {}), "init": dict(model.checkpoint or {})}


def _keep_pairs(data: Data, pairs: list) -> None:
    if not pairs or pairs == data.pairs:
        return
    data.pairs = pairs
    data.eval_pairs = [p for p in data.eval_pairs if p in pairs] or list(pairs)
    data.modalities = [m for m in data.modalities if any(m in p for p in pairs)]
