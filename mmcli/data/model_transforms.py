"""A pretrained model's image transform config as mmcli image settings (``preprocess --like``,
by spec: :func:`mmcli.data.like.like`).

    open_clip_like(preprocess_cfg)   # {"image_size": 224, "resize_mode": "shortest",
                                     #  "interpolation": "bicubic", "backend": "torchvision-pil", ...}
    hf_like(preprocessor_config); timm_like(data_config)

The settings are those of :class:`mmcli.data.image.ImageTransform` (see
:mod:`mmcli.data.image` for how each library's resampling is reproduced); the
normalisation (mean / std) is not part of them: the encoder does it on its device.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput

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


def open_clip_files_like(arch: str) -> dict[str, Any] | None:
    """:func:`open_clip_like` of a built-in open_clip architecture without a pretrained tag,
    read from open_clip's own files instead of importing it: the model config JSON
    (``vision_cfg.image_size``) and ``PreprocessCfg``'s defaults in its ``transform.py``
    (parsed with :mod:`ast`, not run; constants from its ``constants.py``), as
    ``create_model_and_transforms`` combines them. Importing open_clip took 8 s on a 2-core
    EPYC (it imports torchvision, transformers and timm), and preprocess needs four values.
    None when anything is not as expected (not installed, a custom config, a tag, another
    layout of those files): then the caller imports open_clip. A test compares both ways
    for every architecture open_clip ships."""
    spec = importlib.util.find_spec("open_clip")  # finds the package, does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    config = root / "model_configs" / f"{arch}.json"
    if Path(arch).name != arch or not config.is_file():
        return None
    try:
        constants = {
            t.id: ast.literal_eval(node.value)
            for node in ast.parse((root / "constants.py").read_text(encoding="utf-8")).body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        tree = ast.parse((root / "transform.py").read_text(encoding="utf-8"))
        cls = next(
            n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PreprocessCfg"
        )
        pp = {}
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                value = node.value
                pp[node.target.id] = (
                    constants[value.id] if isinstance(value, ast.Name) else ast.literal_eval(value)
                )
        vision = json.loads(config.read_text(encoding="utf-8")).get("vision_cfg") or {}
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, StopIteration):
        return None
    if not {"size", "interpolation", "resize_mode", "fill_color"} <= pp.keys():
        return None
    pp["size"] = vision.get("image_size", 224)
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


# ------------------------------------------------------------------------- timm


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
