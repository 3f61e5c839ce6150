"""Video files with known frame content for the tests, written with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

#: frame k of a numbered clip is flat: red = level(k % 16), green = level(k // 16)
STEP = 15


def level(k: int) -> int:
    return 10 + STEP * k


def numbered_frames(n: int, size: tuple[int, int] = (48, 32)) -> list[np.ndarray]:
    """``n`` (at most 256) RGB frames [H, W, 3]: frame k's red and green encode k."""
    w, h = size
    out = []
    for k in range(n):
        f = np.empty((h, w, 3), dtype=np.uint8)
        f[..., 0], f[..., 1], f[..., 2] = level(k % 16), level(k // 16), 128
        out.append(f)
    return out


def write_video(
    path: Path,
    frames: list[np.ndarray],
    fps: int = 8,
    codec: str = "libx264",
    gop: int | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> Path:
    """Encode RGB uint8 frames (and a mono float32 track) into ``path`` (container from its
    suffix). ``gop``: frames between keyframes (default: one keyframe per second)."""
    import av

    with av.open(str(path), mode="w") as out:
        v = out.add_stream(codec, rate=Fraction(fps))
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = "yuv420p"
        if codec == "libx264":
            v.options = {"crf": "10", "g": str(gop or fps), "preset": "veryfast"}
        else:  # near-lossless, so a frame's number survives the codec
            v.bit_rate = 4_000_000
            v.options = {"qmin": "1", "qmax": "4"}
            if gop:
                v.gop_size = gop
        audio_codec = "libopus" if path.suffix == ".webm" else "aac"
        a = None
        if audio is not None:
            a = out.add_stream(audio_codec, rate=sample_rate, layout="mono")
        for f in frames:
            for packet in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        if a is not None:
            frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = sample_rate
            for packet in [*a.encode(frame), *a.encode()]:
                out.mux(packet)
    return path


def frame_numbers(video: np.ndarray) -> list[int]:
    """The frame numbers of decoded numbered frames ``[T, 3, H, W]``."""

    def one(channel) -> int:
        return int(round((float(channel.mean()) - 10) / STEP))

    return [one(f[0]) + 16 * one(f[1]) for f in video]


def all_frame_times(path: Path) -> list[float]:
    """Every frame's presentation time, decoding the whole clip (the reference)."""
    import av

    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(c.streams.video[0])]
