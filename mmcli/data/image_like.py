"""A pretrained model's own image transform, reproduced to the pixel (``preprocess --like``).

open_clip and timm resize PIL images with torchvision (``Resize`` on the whole image, then
``CenterCrop``, rounding the offset); transformers >= 5 resizes uint8 tensors with
torchvision's v2 antialiased kernels and crops with the offset rounded down. Both paths call
the same torchvision functions, so the uint8 pixels equal the library's own before its
``ToTensor`` / ``Normalize`` (which the encoder does, on its device). What stays
different: mmcli applies the EXIF orientation (the libraries do not), and composites
transparent images over white (open_clip's ``convert("RGB")`` drops the alpha channel).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmcli.data.image import ImageDecodeError, to_rgb


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def open_rgb(path: str | os.PathLike):
    """The decoded RGB image (EXIF orientation applied), no resampling."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return to_rgb(im).copy()
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode image ({e})") from None


def target_size(width: int, height: int, t: Any) -> tuple[int, int]:
    """(h, w) the image is resized to before the crop or pad."""
    side = t.resize_size or t.size
    if t.resize_mode == "squash":
        return side, side
    if t.resize_mode == "longest":  # open_clip / timm ResizeKeepRatio(longest=1)
        ratio = max(height / side, width / side)
        return round(height / ratio), round(width / ratio)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = side, int(side * long / short)  # torchvision's (and transformers') rule
    return (new_long, new_short) if width <= height else (new_short, new_long)


def load_image_like(path: str | os.PathLike, t: Any):
    """uint8 numpy [3, size, size] as the transform ``t`` (an ImageTransform) makes it."""
    import torch
    import torchvision.transforms.functional as F

    im = open_rgb(path)
    h, w = target_size(im.width, im.height, t)
    if t.backend == "hf":  # transformers calls torchvision's v2 kernels on uint8 tensors
        import torchvision.transforms.v2.functional as F2

        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        x = F2.resize(x, [h, w], interpolation=_mode(t.interpolation), antialias=True)
        x = _crop_or_pad(x, t.size, t.fill, floor=True)
        return np.ascontiguousarray(x.numpy())
    im = F.resize(im, [h, w], interpolation=_mode(t.interpolation))
    im = _crop_or_pad(im, t.size, t.fill, floor=False)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _crop_or_pad(img, size: int, fill: int, floor: bool):
    """Center crop to size x size, padding first where the image is smaller (open_clip's
    ``center_crop_or_pad``); the offset rounded (torchvision) or rounded down (transformers)."""
    import torchvision.transforms.functional as F

    _, height, width = F.get_dimensions(img)
    if size > width or size > height:
        pad = [max(size - width, 0) // 2, max(size - height, 0) // 2,
               (max(size - width, 0) + 1) // 2, (max(size - height, 0) + 1) // 2]  # fmt: skip
        img = F.pad(img, pad, fill=fill)
        _, height, width = F.get_dimensions(img)
    if floor:
        top, left = int((height - size) / 2.0), int((width - size) / 2.0)
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return F.crop(img, top, left, size, size)
