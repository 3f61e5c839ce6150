"""Image decoding: any PIL format -> RGB uint8 [3, size, size].

Steps, the same in ``preprocess`` and in ``retrieve --image``: decode (JPEG at a reduced
DCT scale when that still leaves the shorter side >= size), apply the EXIF orientation,
convert to RGB (alpha composited over white; grayscale, palette, CMYK, 16-bit
converted), resize the shorter side to ``size`` (bicubic, antialiased) and take the
center crop. Resize and crop are done in one resampling pass over the crop box.
"""

from __future__ import annotations

import contextlib
import io
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
    from PIL import ImageOps

    with decoded(path, max_pixels) as im:
        if im.format == "JPEG":
            w, h = im.size
            scale = size / min(w, h)
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
        if sizes is not None:
            sizes.append(im.size)
        return resize_crop(im, size)


def resize_crop(im, size: int):
    """An RGB PIL image -> uint8 numpy [3, size, size]: mmcli's one-pass resize of the
    shorter side (bicubic, antialiased) and center crop."""
    from PIL import Image

    box = center_box(im.width, im.height, size)
    im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


@contextlib.contextmanager
def decoded(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """The opened PIL image of ``path`` (a regular file, at most ``max_pixels`` pixels, 0 = no
    limit), with every decoding failure inside the block raised as ImageDecodeError: the
    checks :func:`load_image` and :func:`open_rgb` share. ``path`` may also be the file's
    bytes (an encoded shard's row)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(path, (bytes, bytearray, memoryview)):
            f = io.BytesIO(path)
        else:
            f = open_file(path, "file")
    except NotAFile as e:
        raise ImageDecodeError(e.reason) from None
    try:
        with f, _pixel_limit(Image, max_pixels), Image.open(f) as im:
            _check_pixels(im.size, max_pixels)
            yield im
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image ({e})") from None


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


RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
#: mmcli: one resampling pass over the crop box (JPEG draft); torchvision-pil: resize the
#: whole image, then crop, with torchvision on PIL images (open_clip, timm); hf:
#: transformers' torchvision backend (antialiased resize of uint8 tensors, crop rounded down)
BACKENDS = ("mmcli", "torchvision-pil", "hf")


@dataclass(frozen=True)
class ImageTransform:
    """File -> uint8 [3, size, size]. The defaults are mmcli's own fast path; the other
    settings reproduce a pretrained model's transform (``preprocess --like``)."""

    size: int = 224
    #: refuse images of more pixels before decoding (0 = no limit); not part of the spec
    max_pixels: int = MAX_IMAGE_PIXELS
    resize_mode: str = "shortest"  # shortest side | longest side (padded) | squash
    interpolation: str = "bicubic"
    resize_size: int | None = None  # resize to this, then center-crop size (timm's crop_pct)
    backend: str = "mmcli"
    fill: int = 0  # padding value of resize_mode=longest

    def __post_init__(self) -> None:
        for name, value, known in (("resize mode", self.resize_mode, RESIZE_MODES),
                                   ("interpolation", self.interpolation, INTERPOLATIONS),
                                   ("image backend", self.backend, BACKENDS)):  # fmt: skip
            if value not in known:
                raise ValueError(f"unknown {name} {value!r} (use {', '.join(known)})")
        if self.resize_size is not None and self.resize_size < self.size:
            raise ValueError(
                f"resize size {self.resize_size} is smaller than the image size {self.size}"
            )
        if self.backend == "mmcli" and not self.default:
            raise ValueError(
                "mmcli's one-pass resize is shortest-side bicubic; other settings need "
                "backend torchvision-pil or hf"
            )

    @property
    def default(self) -> bool:
        """mmcli's own transform (what preprocess does without --like)."""
        settings = (self.resize_mode, self.interpolation, self.resize_size, self.fill)
        return settings == ("shortest", "bicubic", None, 0) and self.backend in ("mmcli",)

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules decoding with this transform imports beyond PIL and numpy (what a
        worker pool preloads, :func:`mmcli.runtime.worker_context`)."""
        tv = "torchvision.transforms"  # transformers' path only (PIL's calls otherwise)
        return ("torch", f"{tv}.functional", f"{tv}.v2.functional") if self.backend == "hf" else ()

    def __call__(self, path: str | os.PathLike, sizes: list | None = None):
        """``sizes``, when given, receives the decoded image's (width, height)."""
        if self.default:
            return load_image(path, self.size, self.max_pixels, sizes=sizes)
        return load_image_like(path, self, sizes=sizes)

    def apply(self, im):
        """An already decoded RGB PIL image (a video frame) -> uint8 [3, size, size]."""
        if self.default:
            return resize_crop(im, self.size)
        return transform_rgb(im, self)

    def spec(self) -> dict[str, Any]:
        if self.default:  # unchanged from earlier mmcli versions (resume fingerprints)
            return {
                "image_size": self.size,
                "resize": "shorter-side bicubic antialiased",
                "crop": "center",
                "layout": "NCHW uint8 RGB",
            }
        return {
            "image_size": self.size,
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "resize_size": self.resize_size,
            "backend": self.backend,
            "fill": self.fill,
            "crop": "none"
            if self.resize_mode != "shortest" and self.resize_size is None
            else "center",
            "layout": "NCHW uint8 RGB",
        }


def image_transform_from_spec(spec: dict[str, Any]) -> ImageTransform:
    """The transform a table (or a pretrained model's ``inputs``) was made with; BadInput
    for an image size outside the bounds of :mod:`mmcli.data.limits`."""
    check_input_spec("image", spec)
    return ImageTransform(
        size=int(spec.get("image_size", 224)),
        resize_mode=spec.get("resize_mode", "shortest"),
        interpolation=spec.get("interpolation", "bicubic"),
        resize_size=spec.get("resize_size"),
        backend=spec.get("backend", "mmcli"),
        fill=int(spec.get("fill", 0) or 0),
    )


#: PreprocessConfig fields of the image transform -> ImageTransform fields
_CONFIG_FIELDS = {"resize_mode": "resize_mode", "interpolation": "interpolation",
                  "resize_size": "resize_size", "image_backend": "backend", "fill": "fill"}  # fmt: skip


def image_transform_of(config: Any) -> ImageTransform:
    """The ImageTransform of a PreprocessConfig (``image_size`` and the ``--like`` fields)."""
    kwargs = {field: getattr(config, name) for name, field in _CONFIG_FIELDS.items()}
    try:
        return ImageTransform(config.image_size, **kwargs)
    except ValueError as e:
        from mmcli.errors import BadInput

        raise BadInput(str(e)) from None


def image_options_of(config: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without the image transform fields when they are mmcli's defaults (so
    runs of earlier versions, which had none, resume)."""
    if image_transform_of(config).default:
        return {k: v for k, v in options.items() if k not in _CONFIG_FIELDS}
    return options


def preprocess_image_options(like: dict[str, Any] | None = None, **given: Any) -> dict[str, Any]:
    """``PreprocessConfig`` image fields from a model's settings (``preprocess --like``,
    :func:`mmcli.data.like.like`) and the flags given explicitly
    (``image_size``, ``resize_mode``, ``interpolation``, ``resize_size``; None = not given),
    which override the model's. Without ``like``: mmcli's own resize, unless a flag asks
    for what it does not do (then torchvision's, on PIL images)."""
    given = {k: v for k, v in given.items() if v is not None}
    if like is None:
        out: dict[str, Any] = {"image_size": 224, **given}
        defaults = (
            ("resize_mode", "shortest"),
            ("interpolation", "bicubic"),
            ("resize_size", None),
        )
        if any(given.get(k, d) != d for k, d in defaults):
            out["image_backend"] = "torchvision-pil"
        return out
    out = {
        "image_size": int(like["image_size"]),
        "resize_mode": like.get("resize_mode", "shortest"),
        "interpolation": like.get("interpolation", "bicubic"),
        "resize_size": like.get("resize_size"),
        "image_backend": like.get("backend", "torchvision-pil"),
        "fill": int(like.get("fill", 0) or 0),
    }
    if "image_size" in given and "resize_size" not in given and out["resize_size"] is not None:
        ratio = out["resize_size"] / out["image_size"]  # keep the model's crop fraction
        out["resize_size"] = int(given["image_size"] * ratio)
    out.update(given)
    return out


# ------------------------------------------------ a pretrained model's transform
# A pretrained model's own image transform, reproduced to the pixel (``preprocess --like``).
#
# open_clip and timm resize PIL images with torchvision (``Resize`` on the whole image, then
# ``CenterCrop``, rounding the offset); transformers >= 5 resizes uint8 tensors with
# torchvision's v2 antialiased kernels and crops with the offset rounded down. Both paths call
# the same torchvision functions, so the uint8 pixels equal the library's own before its
# ``ToTensor`` / ``Normalize`` (which the encoder does, on its device). What stays
# different: mmcli applies the EXIF orientation (the libraries do not), and composites
# transparent images over white (open_clip's ``convert("RGB")`` drops the alpha channel).


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def open_rgb(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """The decoded RGB image (EXIF orientation applied), no resampling; the same checks as
    :func:`load_image` (see :func:`decoded`)."""
    from PIL import ImageOps

    with decoded(path, max_pixels) as im:
        return to_rgb(ImageOps.exif_transpose(im)).copy()


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


def load_image_like(path: str | os.PathLike, t: Any, sizes: list | None = None):
    """uint8 numpy [3, size, size] as the transform ``t`` (an ImageTransform) makes it."""
    im = open_rgb(path, getattr(t, "max_pixels", MAX_IMAGE_PIXELS))
    if sizes is not None:
        sizes.append(im.size)
    return transform_rgb(im, t)


#: torchvision's ``pil_modes_mapping``: an interpolation's name -> PIL's resampling filter
_PIL_FILTERS = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4,
                "hamming": 5, "lanczos": 1}  # fmt: skip


def transform_rgb(im, t: Any):
    """An RGB PIL image -> uint8 numpy [3, size, size] as the transform ``t`` makes it.

    open_clip's and timm's transforms run torchvision's functional ops on the PIL image,
    which call PIL itself: the same PIL calls are made here without torch, so that a
    decode worker does not import torch and torchvision (2.4 s of CPU each on a 2-vCPU
    Xeon, taken from the model's own start-up). transformers' run torchvision's v2
    kernels on a uint8 tensor: that path needs torch."""
    h, w = target_size(im.width, im.height, t)
    if t.backend == "hf":  # transformers calls torchvision's v2 kernels on uint8 tensors
        import torch
        import torchvision.transforms.functional as F
        import torchvision.transforms.v2.functional as F2

        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        x = F2.resize(x, [h, w], interpolation=_mode(t.interpolation), antialias=True)
        pad, top, left = _crop_box(x.shape[-1], x.shape[-2], t.size, floor=True)
        if pad:
            x = F.pad(x, pad, fill=t.fill)
        return np.ascontiguousarray(F.crop(x, top, left, t.size, t.size).numpy())
    if (h, w) != (im.height, im.width):  # (torchvision returns the image itself)
        im = im.resize((w, h), _PIL_FILTERS[t.interpolation])
    pad, top, left = _crop_box(im.width, im.height, t.size, floor=False)
    if pad:  # torchvision's pad of a PIL image
        from PIL import ImageOps

        im = ImageOps.expand(im, border=tuple(pad), fill=(int(t.fill),) * 3)
    im = im.crop((left, top, left + t.size, top + t.size))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _crop_box(width: int, height: int, size: int, floor: bool):
    """open_clip's ``center_crop_or_pad`` of a width x height image to size x size: the
    padding first where it is smaller (left, top, right, bottom; None: none), then the
    crop's top and left offsets, rounded (torchvision) or rounded down (transformers)."""
    pad = None
    if size > width or size > height:
        pad = [max(size - width, 0) // 2, max(size - height, 0) // 2,
               (max(size - width, 0) + 1) // 2, (max(size - height, 0) + 1) // 2]  # fmt: skip
        width, height = width + pad[0] + pad[2], height + pad[1] + pad[3]
    if floor:
        return pad, int((height - size) / 2.0), int((width - size) / 2.0)
    return pad, int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
