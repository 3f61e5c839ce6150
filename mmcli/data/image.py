"""Image decoding: any PIL format -> RGB uint8 [3, size, size].

Steps, the same in ``preprocess`` and in ``retrieve --image``: decode (JPEG at a reduced
DCT scale when that still leaves the shorter side >= size), apply the EXIF orientation,
convert to RGB (alpha composited over white; grayscale, palette, CMYK, 16-bit
converted), resize the shorter side to ``size`` (bicubic, antialiased) and take the
center crop. Resize and crop are done in one resampling pass over the crop box.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.data.limits import MAX_IMAGE_PIXELS, check_input_spec
from mmcli.formats.userfiles import NotAFile, open_file


class ImageDecodeError(Exception):
    """The file could not be read as an image."""


def to_rgb(im):
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def center_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source-pixel box that 'resize shorter side to size, center-crop size x size' keeps."""
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def load_image(
    path: str | os.PathLike,
    size: int = 224,
    max_pixels: int = MAX_IMAGE_PIXELS,
    sizes: list | None = None,
):
    """Decode ``path`` into a uint8 numpy array [3, size, size]. Raises ImageDecodeError,
    also for a path that is not a regular file (never opened) and for an image of more
    than ``max_pixels`` pixels (refused before decoding; 0 = no limit). ``sizes``, when
    given, receives the decoded image's (width, height) before resizing."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        f = open_file(path, "file")
    except NotAFile as e:
        raise ImageDecodeError(e.reason) from None
    try:
        with f, _pixel_limit(Image, max_pixels), Image.open(f) as im:
            _check_pixels(im.size, max_pixels)
            if im.format == "JPEG":
                w, h = im.size
                scale = size / min(w, h)
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            if sizes is not None:
                sizes.append(im.size)
            box = center_box(im.width, im.height, size)
            im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image ({e})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if max_pixels and w * h > max_pixels:
        raise ImageDecodeError(
            f"image too large ({w}x{h} = {w * h / 1e6:.1f} megapixels; the limit, a guard "
            f"against decompression bombs, is {max_pixels / 1e6:g} (preprocess --max-image-pixels))"
        )


@contextlib.contextmanager
def _pixel_limit(Image, max_pixels: int):
    """Pillow's own decompression-bomb check, quiet: mmcli checks ``max_pixels`` itself.

    Pillow warns (on stderr) above ``Image.MAX_IMAGE_PIXELS`` and refuses above twice
    that; its warning is silenced here, and its limit is raised (process-wide) when
    mmcli's is higher, so that ``max_pixels`` is the one limit that applies.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (not max_pixels or max_pixels > 2 * current):
        Image.MAX_IMAGE_PIXELS = max_pixels or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@dataclass(frozen=True)
class ImageTransform:
    size: int = 224
    #: refuse images of more pixels before decoding (0 = no limit); not part of the spec
    max_pixels: int = MAX_IMAGE_PIXELS

    def __call__(self, path: str | os.PathLike):
        return load_image(path, self.size, self.max_pixels)

    def spec(self) -> dict[str, Any]:
        return {
            "image_size": self.size,
            "resize": "shorter-side bicubic antialiased",
            "crop": "center",
            "layout": "NCHW uint8 RGB",
        }


def image_transform_from_spec(spec: dict[str, Any]) -> ImageTransform:
    """The transform a table spec (or a model's image input spec) describes; BadInput for
    an image size outside the bounds of :mod:`mmcli.data.limits`."""
    check_input_spec("image", spec)
    return ImageTransform(size=int(spec.get("image_size", 224)))
