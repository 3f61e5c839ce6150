"""A pretrained model's image transform as mmcli image settings (``preprocess --like``).

    like("open_clip:ViT-B-32")   # {"image_size": 224, "resize_mode": "shortest", "interpolation":
                                 #  "bicubic", "backend": "torchvision-pil", ...}
    like("hf:path/to/clip"); like("timm:resnet50")

The settings are those of :class:`mmcli.data.image.ImageTransform` (see
:mod:`mmcli.data.image_like` for how each library's resampling is reproduced); the
normalisation (mean / std) is not part of them: the encoder does it on its device.
"""

from __future__ import annotations

import math
from typing import Any

from mmcli.errors import BadInput
from mmcli.models.adapters.common import quiet_library, require


def like(spec: str) -> dict[str, Any]:
    """The image settings of ``open_clip:ARCH[,pretrained=TAG]``, ``hf:DIR`` or ``timm:NAME``."""
    from mmcli.models.pretrained import split_spec
    from mmcli.models.registry import parse_encoder_spec

    lib, rest = split_spec(spec)
    if lib is None or not rest:
        raise BadInput(
            f"--like {spec}: expected open_clip:ARCH, hf:DIR or timm:NAME",
            hint="e.g. --like open_clip:ViT-B-32",
        )
    _, options = parse_encoder_spec(f"{lib}:{rest}", modality="image")
    if lib == "open_clip":
        return open_clip_transform(options["arch"], options.get("pretrained"))
    if lib == "hf":
        return hf_transform(options["path"])
    return timm_transform(options["arch"])


# -------------------------------------------------------------------- open_clip


def open_clip_like(pp: dict[str, Any]) -> dict[str, Any]:
    """The image transform settings of an open_clip preprocess cfg (``preprocess --like``)."""
    size = pp.get("size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mode = pp.get("resize_mode", "shortest")
    return {
        "image_size": size,
        "resize_mode": mode,
        "interpolation": "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic",
        "crop": "none" if mode == "squash" else "center",
        "backend": "torchvision-pil",
        "fill": int(pp.get("fill_color", 0) or 0),
    }


def open_clip_transform(arch: str, pretrained: str | None = None) -> dict[str, Any]:
    """``preprocess --like open_clip:ARCH``: the model's transform settings, without building it."""
    from dataclasses import asdict

    from mmcli.models.adapters.open_clip import OpenClipImageConfig, model_name

    oc = require("open_clip", "preprocess --like open_clip:...")
    from open_clip.transform import PreprocessCfg

    name = model_name(OpenClipImageConfig(arch=arch, pretrained=pretrained))
    pp = asdict(PreprocessCfg())  # open_clip's defaults, then the tag's, as create_model does
    if pretrained:
        pp.update(
            {
                k: v
                for k, v in (oc.get_pretrained_cfg(name, pretrained) or {}).items()
                if v is not None
            }
        )
    pp["size"] = ((oc.get_model_config(name) or {}).get("vision_cfg") or {}).get("image_size", 224)
    return open_clip_like(pp)


# ---------------------------------------------------------------- transformers


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def hf_like(pp: dict[str, Any], default_size: int = 224) -> dict[str, Any]:
    """The image transform settings of a ``preprocessor_config.json`` (``preprocess --like hf:DIR``).

    transformers >= 5 processes images with its torchvision backend: an antialiased resize
    of the uint8 tensor, then a center crop rounded down.
    """
    size = pp.get("size") or {}
    crop = pp.get("crop_size") or {}
    interp = _PIL_RESAMPLE.get(int(pp.get("resample", 3)), "bicubic")
    out = {"interpolation": interp, "backend": "hf"}
    if "shortest_edge" in size:
        side = (
            int(crop.get("height", size["shortest_edge"]))
            if pp.get("do_center_crop", True)
            else int(size["shortest_edge"])
        )
        out.update(
            image_size=side,
            resize_mode="shortest",
            resize_size=int(size["shortest_edge"]),
            crop="center",
        )
    else:
        side = int(size.get("height", default_size))
        out.update(image_size=side, resize_mode="squash", crop="none")
    return out


def hf_transform(path: str) -> dict[str, Any]:
    from mmcli.models.adapters.hf import _hub_processor, local_folder, read_json

    folder = local_folder(path)
    pp = read_json(folder, "preprocessor_config.json") if folder else _hub_processor(path)
    if not pp:
        raise BadInput("no preprocessor_config.json: not an image model folder", where=path)
    return hf_like(pp)


# ------------------------------------------------------------------------- timm


def timm_transform(arch: str) -> dict[str, Any]:
    """``preprocess --like timm:NAME``: timm's eval transform settings for the model."""
    timm = require("timm", "preprocess --like timm:...")
    with quiet_library():
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return timm_like(timm.data.resolve_data_config({}, model=model))


def timm_like(data: dict[str, Any]) -> dict[str, Any]:
    """The settings of timm's eval transform for a resolved data config."""
    size = int(data["input_size"][1])
    crop_pct = float(data.get("crop_pct") or 0.875)
    mode = data.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise BadInput(
            f"timm crop_mode {mode!r} is not supported by --like",
            hint="pass the transform flags yourself",
        )
    interp = data.get("interpolation", "bilinear")
    return {
        "image_size": size,
        "resize_size": math.floor(size / crop_pct),
        "resize_mode": "shortest" if mode == "center" else "squash",
        "crop": "center",
        "interpolation": interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        "backend": "torchvision-pil",
    }
