"""One place that turns a ``--model`` argument into a model, for every command.

    model = load_model("run/model.safetensors")                    # an mmcli checkpoint
    model = load_model("open_clip:ViT-B-32", weights="clip.safetensors")
    model = load_model("open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k")  # fetched when online
    model = load_model("hf:path/to/clip")                          # a save_pretrained folder

``LIBRARY:SPEC`` builds a pretrained CLIP / SigLIP from its own library
(:mod:`mmcli.models.adapters`): both towers in their joint space, with the logit scale
(and bias); anything else is the path of an mmcli checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mmcli.errors import BadInput

log = logging.getLogger("mmcli")

LIBRARY_PREFIXES = ("open_clip", "hf", "timm")


def split_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"open_clip:ViT-B-32"`` -> ``("open_clip", "ViT-B-32")``; a path -> ``(None, path)``."""
    text = str(spec)
    lib, sep, rest = text.partition(":")
    if sep and lib in LIBRARY_PREFIXES:
        return lib, rest
    return None, text


def is_library_spec(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and split_spec(spec)[0] is not None


def one_weights(weights: dict[str, str] | str | None) -> str | None:
    """The one ``--weights`` file of a whole model (``{"": path}`` as the CLI parses it)."""
    if weights is None or isinstance(weights, (str, os.PathLike)):
        return None if weights is None else str(weights)
    if len(weights) > 1:
        raise BadInput(
            "--model takes one --weights file (the whole model's)", hint="pass --weights FILE once"
        )
    return next(iter(weights.values()), None)


def load_model(spec: str | os.PathLike, *, weights: str | None = None, device: Any = "cpu"):
    """A :class:`~mmcli.models.MultimodalModel` from a checkpoint path or ``LIBRARY:SPEC``."""
    from mmcli.models.multimodal import MultimodalModel

    lib, rest = split_spec(spec)
    if lib is None:
        if weights:
            raise BadInput(
                "--weights applies to --encoder backbones and open_clip:ARCH models; a --model "
                "checkpoint has its weights",
                hint="drop --weights",
            )
        return MultimodalModel.from_checkpoint(spec, device=device)
    if lib == "timm":
        raise BadInput(
            "timm models are image backbones, not joint image-text models",
            hint=f"use --encoder image=timm:{rest}",
        )
    if not rest:
        raise BadInput(
            f"--model {spec}: name the model after the colon", hint=f"e.g. {lib}:{_EXAMPLES[lib]}"
        )
    from mmcli.models.adapters.whole import hf_model, open_clip_model
    from mmcli.models.registry import parse_encoder_spec

    _, options = parse_encoder_spec(f"{lib}:{rest}", modality="image")
    if lib == "open_clip":
        model = open_clip_model(
            options["arch"], weights=weights, pretrained=options.get("pretrained")
        )
    else:
        model = hf_model(options["path"], weights=weights)
    model.checkpoint = {"path": str(spec), "sha256": _weights_sha(model)}
    if not any(model.weights.values()):
        log.info("note: %s has random weights (pass --weights FILE, or pretrained=TAG)", spec)
    return model.to(device).eval()


_EXAMPLES = {"open_clip": "ViT-B-32", "hf": "path/to/clip_folder"}


def _weights_sha(model) -> str | None:
    info = next(iter(model.weights.values()), None) or {}
    return info.get("sha256")
