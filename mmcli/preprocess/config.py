"""preprocess's options, and the names of what it writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from mmcli.data.audio import AudioTransform
from mmcli.data.encoded import store_spec
from mmcli.data.image import ImageTransform, image_options_of, image_transform_of
from mmcli.data.limits import MAX_IMAGE_PIXELS, check_max_pixels, check_value
from mmcli.data.text import ByteTokenizer
from mmcli.data.video import VideoTransform
from mmcli.errors import BadInput
from mmcli.formats.manifest import MANIFEST_NAME, MODALITY_FIELDS
from mmcli.formats.outputs import PREPROCESS_RECORD
from mmcli.formats.tensorfile import SHARD_RE

SHARD_PREFIX = "data"
STATE_FILE = PREPROCESS_RECORD  # the options, then (last of all) "complete": true and the summary
ERRORS_FILE = "errors.jsonl"
CHUNK = 16  # items per worker task
STORES = ("pixels", "encoded")


def owns(name: str) -> bool:
    """Whether preprocess writes files of this name into its output folder."""
    if name in (STATE_FILE, MANIFEST_NAME, ERRORS_FILE):
        return True
    m = SHARD_RE.match(name)
    return bool(m) and m["name"] == SHARD_PREFIX


@dataclass
class PreprocessConfig:
    image_size: int = 224
    context_length: int = 77
    lowercase: bool = False
    sample_rate: int = 16000
    audio_seconds: float = 5.0
    frames: int = 8  # video: frames per clip
    fps: float | None = None  # video: frames this many per second apart (None: over the clip)
    audio_from_video: bool = False  # video: its audio track into the audio table
    shard_size: int = 1000
    workers: int = 0
    on_error: str = "skip"
    split: str | None = None
    max_skip: str = "50%"  # more items skipped than this (N or P%) stops with exit 2
    modalities: list[str] | None = None  # None = every modality the items have
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped (0 = no limit)
    #: a pretrained model's image transform (``--like``), see mmcli.data.image.ImageTransform
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    resize_size: int | None = None
    image_backend: str = "mmcli"
    fill: int = 0
    #: the image table: "pixels" (uint8 [N, 3, S, S]) or "encoded" (the compressed files,
    #: decoded by the commands that read them: mmcli.data.encoded)
    store: str = "pixels"

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise BadInput("shard-size must be positive")
        for key, name in (("image_size", "image_size"), ("context_length", "context_length"),
                          ("sample_rate", "sample_rate"), ("seconds", "audio_seconds")):  # fmt: skip
            check_value(key, getattr(self, name), name=f"--{name.replace('_', '-')}")
        check_max_pixels(self.max_image_pixels)
        check_value("frames", self.frames, name="--frames")
        if self.fps is not None and not 0 < self.fps <= 1000:
            raise BadInput(f"--fps must be in (0, 1000], got {self.fps}")
        if self.store not in STORES:
            raise BadInput(f"--store must be {' or '.join(STORES)}, got {self.store!r}")
        if self.on_error not in ("skip", "fail"):
            raise BadInput("on-error must be skip or fail")
        self.skip_limit(1)  # a bad --max-skip is refused before any work
        if self.modalities is not None:
            unknown = set(self.modalities) - set(MODALITY_FIELDS)
            if unknown:
                raise BadInput(
                    f"unknown modality {sorted(unknown)[0]!r}",
                    hint=f"use {', '.join(MODALITY_FIELDS)}",
                )

    def skip_limit(self, items: int) -> int:
        """The most items that may be skipped out of ``items`` (``--max-skip N`` or ``P%``)."""
        text = str(self.max_skip).strip()
        try:
            if text.endswith("%"):
                share = float(text[:-1])
                if not 0 <= share <= 100:
                    raise ValueError
                return int(items * share / 100)
            n = int(text)
            if n < 0:
                raise ValueError
            return n
        except ValueError:
            raise BadInput(
                f"--max-skip {self.max_skip!r} is not a count or a percentage",
                hint="e.g. --max-skip 10 or --max-skip 5%",
            ) from None

    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer(self.context_length, self.lowercase)

    def image_transform(self) -> ImageTransform:
        """The image transform (with the pixel limit, which is not part of its spec)."""
        return replace(image_transform_of(self), max_pixels=self.max_image_pixels)

    def video_transform(self) -> VideoTransform:
        return VideoTransform(self.frames, self.fps, self.image_transform())

    def specs(self) -> dict[str, dict[str, Any]]:
        image = self.image_transform().spec()
        if self.store == "encoded":
            image.update(store_spec(self.image_transform()))
        return {
            "image": image,
            "text": self.tokenizer().spec(),
            "audio": AudioTransform(self.sample_rate, self.audio_seconds).spec(),
            "video": self.video_transform().spec(),
        }

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (workers/on_error do not)."""
        d = asdict(self)
        for k in ("workers", "on_error", "max_skip"):
            d.pop(k)
        defaults = (("frames", 8), ("fps", None), ("audio_from_video", False), ("store", "pixels"))
        for k, default in defaults:
            if d[k] == default:  # runs of earlier versions (which had none) resume
                d.pop(k)
        return image_options_of(self, d)
