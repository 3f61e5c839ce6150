"""Whole pretrained models: both towers of a CLIP / SigLIP in their joint space.

    open_clip_model("ViT-B-32", weights="clip.safetensors")   # --model open_clip:ViT-B-32
    hf_model("path/to/clip")                                  # --model hf:DIR

One library model is built and split between the two encoders (nothing is duplicated);
the model's learned logit scale (and SigLIP's bias) become the MultimodalModel's.
:func:`mmcli.models.pretrained.load_model` is the entry point every command uses.
"""

from __future__ import annotations

from typing import Any

import torch

from mmcli.data.model_transforms import open_clip_like
from mmcli.errors import BadInput
from mmcli.models.adapters.common import (
    library_version,
    load_strict,
    read_library_weights,
    weights_info,
)
from mmcli.models.adapters.open_clip import TOWER_PARAMS, library_model
from mmcli.models.adapters.shared import shared_models

# -------------------------------------------------------------------- open_clip


def open_clip_model(arch: str, weights: str | None = None, pretrained: str | None = None):
    """``--model open_clip:ARCH``: both towers, logit scale (and bias), in the joint space."""
    from mmcli.models.multimodal import ModelConfig, MultimodalModel
    from mmcli.models.registry import config_to_dict, make_config

    image = make_config("open_clip", "image", arch=arch, pretrained=pretrained)
    text = make_config("open_clip", "text", arch=arch, pretrained=pretrained)
    with shared_models():
        clip, pp = library_model(image)
        scale = float(clip.logit_scale.detach())
        bias = getattr(clip, "logit_bias", None)
        config = ModelConfig(
            encoders={
                "image": {"name": "open_clip", "config": config_to_dict(image)},
                "text": {"name": "open_clip", "config": config_to_dict(text)},
            },
            logit_scale=scale,
            logit_bias=None if bias is None else float(bias.detach()),
            inputs={"image": open_clip_like(pp), "text": {"raw_captions": True}},
            extra={"space": "joint", "pretrained": _record(arch, pretrained, weights)},
        )
        model = MultimodalModel(config)
    model.config.embed_dim = model.out_dim("image")
    if weights:
        info = load_open_clip(model, weights, arch)
        model.weights = {"image": info, "text": info}
    return model


def _record(arch: str, pretrained: str | None, weights: str | None) -> dict[str, Any]:
    return {"library": "open_clip", "version": library_version("open_clip"), "arch": arch,
            "pretrained": pretrained, "weights": str(weights) if weights else None}  # fmt: skip


def load_open_clip(model, source: str, arch: str) -> dict[str, Any]:
    """An open_clip state dict into both towers and the logit scale / bias."""
    state = read_library_weights(str(source))
    where = str(source)
    image = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and k not in TOWER_PARAMS}
    load_strict(
        model.encoders["image"].visual, image, where, f"the image tower of open_clip:{arch}"
    )
    load_strict(model.encoders["text"].clip, text, where, f"the text tower of open_clip:{arch}")
    with torch.no_grad():
        for name in TOWER_PARAMS:
            mine = getattr(model, name)
            if (name in state) != (mine is not None):
                raise BadInput(
                    f"weights do not match open_clip:{arch}: {name} "
                    + ("missing" if mine is not None else "unexpected"),
                    where=where,
                    hint="pass weights saved from the same architecture and config",
                )
            if mine is not None:
                mine.copy_(state[name].reshape(()))
                setattr(model.config, name, float(state[name].reshape(())))
    return weights_info(where)


# ---------------------------------------------------------------- transformers


def hf_model(path: str, weights: str | None = None):
    """``--model hf:DIR``: a CLIP / SigLIP model's two towers, logit scale (and bias); a
    text model (BERT, MiniLM, ...): a text-only model, its sentence embeddings."""
    from mmcli.models.adapters.hf import DUAL, LIB, hf_model_object, model_type
    from mmcli.models.multimodal import ModelConfig, MultimodalModel

    if weights:
        raise BadInput(
            "--model hf:DIR reads its weights from DIR",
            hint="drop --weights (or save the weights into DIR)",
        )
    kind = model_type(path)
    record = {"library": "transformers", "path": path, "model_type": kind,
              "version": library_version("transformers")}  # fmt: skip
    if kind not in DUAL:
        return _hf_text_model(path, record)
    with shared_models():
        model = hf_model_object(path)
        bias = getattr(model, "logit_bias", None)
        config = ModelConfig(
            encoders={m: {"name": LIB, "config": {"path": path}} for m in ("image", "text")},
            logit_scale=float(model.logit_scale.detach()),
            logit_bias=None if bias is None else float(bias.detach().reshape(())),
            extra={"space": "joint", "pretrained": record},
        )
        mm = MultimodalModel(config)
    mm.config.embed_dim = mm.out_dim("image")
    mm.config.inputs = {"image": mm.encoders["image"].like, "text": {"raw_captions": True}}
    return mm


def _hf_text_model(path: str, record: dict[str, Any]):
    """A sentence encoder as a one-modality model (``retrieve --text`` over its features)."""
    from mmcli.models.adapters.hf import LIB, load_auto
    from mmcli.models.multimodal import ModelConfig, MultimodalModel
    from mmcli.models.registry import config_to_dict, make_config

    try:
        load_auto(path, "AutoTokenizer")
    except BadInput:
        raise BadInput(
            f"--model hf:... takes a CLIP / SigLIP model or a text model; this {record['model_type']!r} "
            "model has no tokenizer",
            where=path,
            hint="use it as one encoder: --encoder image=hf:DIR or audio=hf:DIR",
        ) from None
    text = make_config(LIB, "text", path=path)
    config = ModelConfig(
        encoders={"text": {"name": LIB, "config": config_to_dict(text)}},
        inputs={"text": {"raw_captions": True}},
        extra={"pretrained": record},
    )
    return MultimodalModel(config)
