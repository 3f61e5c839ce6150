"""Video decoding: any container FFmpeg reads (mp4, webm, mkv, avi, ...) -> uint8
``[T, 3, size, size]`` frames, and its audio track -> a mono waveform.

PyAV (``pip install "mmcli[video]"``, FFmpeg bundled) decodes; it is imported only here,
when a video is read. Sampling, the same in ``preprocess`` and ``retrieve --video``:

* ``frames=T`` (the default): the clip ``[start, start + duration)`` is cut into ``T``
  equal segments and the frame nearest each segment's centre is taken (TSN / CLIP4Clip's
  uniform sampling). A clip with fewer than ``T`` frames repeats its frames.
* ``fps=F``: ``T`` frames ``1/F`` seconds apart, centred on the clip's middle; sample times
  before the first frame or after the last one take the first or the last frame.

Decoding runs forward from the start; a sample time more than :data:`SEEK_GAP` seconds
ahead of the decoder is reached by seeking, which lands on the keyframe before it, and
decoding forward from there to the frame nearest the sample time. Each frame is resized and
cropped exactly as an image is (:class:`mmcli.data.image.ImageTransform`).

A file that is not a video, has no video stream, or ends (decodes no further) before its
declared duration is a :class:`VideoDecodeError` (``preprocess`` skips and lists it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcli.data.image import ImageTransform, image_transform_from_spec
from mmcli.data.limits import MAX_IMAGE_PIXELS, MAX_VIDEO_FRAMES, check_input_spec
from mmcli.formats.userfiles import NotAFile, open_file

#: seek rather than decode forward when the next sample time is this far ahead (seconds)
SEEK_GAP = 2.0
#: FFmpeg's decoding threads per clip (0: its own choice); preprocess's worker processes
#: set 1, so that N workers use N cores rather than N x cores threads
DECODE_THREADS = 0
#: a clip whose decoded frames stop before this share of its declared duration is truncated
TRUNCATED_BELOW = 0.9


class VideoDecodeError(Exception):
    """The file could not be read as a video."""


def require_av():
    """The ``av`` module, or BadInput naming the install command."""
    try:
        import av
    except ImportError:
        from mmcli.errors import BadInput

        raise BadInput(
            "reading video needs PyAV (FFmpeg bundled)", hint='pip install "mmcli[video]"'
        ) from None
    return av


def sample_times(start: float, duration: float, frames: int, fps: float | None) -> list[float]:
    """The sample times (seconds) of a clip ``[start, start + duration)``."""
    if fps is None:
        step = duration / frames
        return [start + (i + 0.5) * step for i in range(frames)]
    middle = start + duration / 2.0
    first = middle - (frames - 1) / (2.0 * fps)
    return [first + i / fps for i in range(frames)]


@dataclass(frozen=True)
class VideoTransform:
    """File -> uint8 numpy ``[frames, 3, size, size]`` (see the module docstring)."""

    frames: int = 8
    fps: float | None = None
    image: ImageTransform = field(default_factory=ImageTransform)

    def __post_init__(self) -> None:
        if not (isinstance(self.frames, int) and 1 <= self.frames <= MAX_VIDEO_FRAMES):
            raise ValueError(
                f"frames must be an integer from 1 to {MAX_VIDEO_FRAMES}, got {self.frames}"
            )
        if self.fps is not None and not (0 < self.fps <= 1000):
            raise ValueError(f"fps must be in (0, 1000], got {self.fps}")

    def __call__(self, path: str | os.PathLike):
        return load_video(path, self)

    def spec(self) -> dict[str, Any]:
        spec = dict(self.image.spec())
        spec.update(
            frames=self.frames,
            fps=self.fps,
            sampling="uniform segment centres" if self.fps is None else "fps, centred",
            layout="NTCHW uint8 RGB",
        )
        return spec


def video_transform_from_spec(spec: dict[str, Any]) -> VideoTransform:
    """The transform a ``video`` table spec (or a model's video input spec) describes."""
    check_input_spec("video", spec)
    try:
        return VideoTransform(
            frames=int(spec.get("frames", 8)),
            fps=None if spec.get("fps") is None else float(spec["fps"]),
            image=image_transform_from_spec(spec),
        )
    except ValueError as e:
        from mmcli.errors import BadInput

        raise BadInput(f"the video input spec: {e}") from None


def _open(path: str | os.PathLike):
    av = require_av()
    try:
        f = open_file(path, "file")  # a FIFO or a device is refused, never opened
    except NotAFile as e:
        raise VideoDecodeError(e.reason) from None
    try:
        return f, av.open(f, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        f.close()
        raise VideoDecodeError(f"cannot open video ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def _span(container, stream) -> tuple[float, float]:
    """(start, duration) in seconds from the stream, else the container."""
    tb = float(stream.time_base) if stream.time_base else None
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration is not None and tb:
        return start, float(stream.duration * tb)
    if container.duration is not None:
        return start, container.duration / 1_000_000
    if stream.frames and stream.average_rate:
        return start, stream.frames / float(stream.average_rate)
    raise VideoDecodeError("video has no duration (no stream or container duration)")


class _Frames:
    """The (time, frame) pairs of one stream in decoding order, seeking on request."""

    def __init__(self, container, stream, max_pixels: int):
        self.container, self.stream, self.max_pixels = container, stream, max_pixels
        self._it = container.decode(stream)

    def seek(self, at: float) -> None:
        """Continue from the keyframe at or before ``at`` seconds."""
        self.container.seek(int(at / float(self.stream.time_base)), stream=self.stream,
                            backward=True)  # fmt: skip
        self._it = self.container.decode(self.stream)

    def next(self):
        for frame in self._it:
            if frame.time is None:
                continue
            if self.max_pixels and frame.width * frame.height > self.max_pixels:
                raise VideoDecodeError(
                    f"video frames too large ({frame.width}x{frame.height}; the limit is "
                    f"{self.max_pixels / 1e6:g} megapixels, preprocess --max-image-pixels)"
                )
            return float(frame.time), frame
        return None


def pick_frames(frames: _Frames, times: list[float]) -> list:
    """The decoded (time, frame) nearest each of ``times`` (increasing): decode forward,
    seeking when a sample time is more than :data:`SEEK_GAP` seconds ahead."""
    prev, cur = None, frames.next()
    out = []
    for target in times:
        if cur is not None and target - cur[0] > SEEK_GAP:
            frames.seek(target)
            prev, cur = None, frames.next()
        while cur is not None and cur[0] < target:
            prev, cur = cur, frames.next()
        options = [c for c in (prev, cur) if c is not None]
        if not options:
            raise VideoDecodeError("video has no decodable frames")
        out.append(min(options, key=lambda c: abs(c[0] - target)))
    return out


def load_video(path: str | os.PathLike, t: VideoTransform):
    """Decode ``path`` into uint8 numpy ``[t.frames, 3, size, size]``. Raises VideoDecodeError."""
    frames = sampled_frames(path, t.frames, t.fps, t.image.max_pixels or MAX_IMAGE_PIXELS)
    return np.stack([t.image.apply(frame) for frame in frames])


def sampled_frames(
    path: str | os.PathLike,
    frames: int,
    fps: float | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list:
    """The sampled frames of ``path`` as RGB PIL images, full size. Raises VideoDecodeError."""
    av = require_av()
    f, container = _open(path)
    try:
        with f, container:
            if not container.streams.video:
                raise VideoDecodeError("file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if DECODE_THREADS:
                stream.thread_count = DECODE_THREADS
            start, duration = _span(container, stream)
            if not duration > 0:
                raise VideoDecodeError("video has zero duration")
            times = sample_times(start, duration, frames, fps)
            picked = pick_frames(_Frames(container, stream, max_pixels), times)
            _check_complete(picked, start, duration, times)
            return [upright(frame) for _, frame in picked]
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode video ({_reason(e)})") from None


def upright(frame):
    """A decoded frame as an RGB PIL image, turned as the stream's display matrix says
    (phones record portrait video as landscape frames plus a rotation), like the EXIF
    orientation of an image: ``frame.rotation`` degrees counterclockwise."""
    im = frame.to_image()
    turn = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    if turn in (90, 180, 270):
        from PIL import Image

        im = im.transpose({90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                           270: Image.Transpose.ROTATE_270}[turn])  # fmt: skip
    return im


def _check_complete(picked: list, start: float, duration: float, times: list[float]) -> None:
    """A clip whose frames end well before its last sample time (and declared end) is
    truncated: refused rather than padded with its last frame."""
    last = max(tm for tm, _ in picked)
    wanted = min(times[-1], start + duration)
    if wanted - start > 0 and last - start < TRUNCATED_BELOW * (wanted - start) - 0.5:
        raise VideoDecodeError(
            f"video ends at {last - start:.2f} s, before its declared {duration:.2f} s "
            "(truncated or corrupt)"
        )


def load_video_audio(path: str | os.PathLike, sample_rate: int, seconds: float):
    """The audio track of a video file as float32 mono ``[round(sample_rate * seconds)]``
    (cropped from the start or zero-padded at the end, like audio files). Raises
    VideoDecodeError when the file has no audio track or it cannot be decoded."""
    av = require_av()
    f, container = _open(path)
    n = int(round(sample_rate * seconds))
    try:
        with f, container:
            if not container.streams.audio:
                raise VideoDecodeError("video has no audio track (--audio-from-video)")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            parts, have = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    have += parts[-1].shape[0]
                if have >= n:
                    break
            else:
                for out in resampler.resample(None):
                    parts.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode the video's audio ({_reason(e)})") from None
    if not parts:
        raise VideoDecodeError("the video's audio track has no samples")
    wave = np.concatenate(parts).astype(np.float32)
    if not np.isfinite(wave).all():
        raise VideoDecodeError("the video's audio contains NaN or infinite samples")
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, wave.shape[0])] = wave[:n]
    return out
