"""Bounds on the inputs mmcli decodes and the transforms it builds from stored specs.

A table spec or a model config read from a file says how raw inputs are prepared
(image size, context length, sample rate and length). A hostile or corrupt value
(``image_size = 10**6``) would make the transform allocate terabytes, so every spec is
checked against these bounds before a transform is built from it, and the same bounds
apply to ``preprocess``'s options. Images are also refused *before decoding* when they
hold more than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb: a small PNG that
decodes to gigabytes); ``preprocess --max-image-pixels`` changes that limit.
"""

from __future__ import annotations

import math
from typing import Any

from mmcli.errors import BadInput

#: largest side of the square images preprocess writes and queries are resized to
MAX_IMAGE_SIZE = 4096
#: images with more pixels are skipped (preprocess) or refused (retrieve) before decoding
MAX_IMAGE_PIXELS = 100_000_000  # 10,000 x 10,000; Pillow warns above 89.5 M
#: longest token sequence of a text table
MAX_CONTEXT_LENGTH = 65_536
#: highest audio sample rate (Hz) and longest clip (seconds)
MAX_SAMPLE_RATE = 384_000
MAX_AUDIO_SECONDS = 3600.0
#: most frames a video clip is sampled into
MAX_VIDEO_FRAMES = 1024

_INT_BOUNDS = {
    "image_size": (1, MAX_IMAGE_SIZE),
    "context_length": (3, MAX_CONTEXT_LENGTH),
    "sample_rate": (1, MAX_SAMPLE_RATE),
    "frames": (1, MAX_VIDEO_FRAMES),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(key: str, value: Any, where: str | None = None, name: str | None = None) -> None:
    """BadInput unless ``value`` is a valid ``key`` (image_size, context_length,
    sample_rate, seconds); ``name``: what the message calls it (default: ``key``)."""
    name = name or key
    if key == "seconds":
        ok = _number(value) and math.isfinite(value) and 0 < value <= MAX_AUDIO_SECONDS
        if not ok:
            raise BadInput(
                f"{name} must be a number of seconds in (0, {MAX_AUDIO_SECONDS:g}], "
                f"got {_show(value)}",
                where=where,
            )
        return
    lo, hi = _INT_BOUNDS[key]
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise BadInput(
            f"{name} must be an integer from {lo} to {hi:,}, got {_show(value)}", where=where
        )


def check_input_spec(modality: str, spec: Any, where: str | None = None) -> None:
    """A table spec (or a model config's ``inputs[modality]``) that transforms are built
    from: known keys type- and range-checked; BadInput naming the key otherwise."""
    if not isinstance(spec, dict):
        raise BadInput(f"the {modality} input spec is not an object", where=where)
    keys = {
        "image": ("image_size",),
        "text": ("context_length",),
        "audio": ("sample_rate", "seconds"),
        "video": ("image_size", "frames"),
    }.get(modality, ())
    for key in keys:
        if spec.get(key) is not None:
            check_value(key, spec[key], where=where, name=f"the {modality} input's {key}")


def check_max_pixels(value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise BadInput(f"--max-image-pixels must be a whole number >= 0, got {_show(value)}")


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."
