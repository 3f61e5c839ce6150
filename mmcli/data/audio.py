"""Audio decoding: soundfile -> mono float waveform at a fixed rate and length.

Decode with soundfile (WAV, FLAC, OGG/Vorbis, ...), average the channels to mono,
resample with torchaudio (band-limited sinc) to ``sample_rate`` and crop (from the
start) or zero-pad (at the end) to ``seconds``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.data.limits import check_input_spec
from mmcli.formats.userfiles import NotAFile, open_file


class AudioDecodeError(Exception):
    """The file could not be read as audio."""


def resample(wave: np.ndarray, orig: int, target: int) -> np.ndarray:
    if orig == target:
        return wave
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), orig, target)
    return out.numpy()


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, seconds: float = 5.0):
    """Decode ``path`` into float32 numpy [round(sample_rate * seconds)]. Raises AudioDecodeError."""
    import soundfile as sf

    try:
        f = open_file(path, "file")  # a FIFO or a device is refused, never opened
    except NotAFile as e:
        raise AudioDecodeError(e.reason) from None
    try:
        with f:
            data, sr = sf.read(f, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise AudioDecodeError(f"cannot decode audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioDecodeError("audio file has no samples")
    wave = data.mean(axis=1)
    if not np.isfinite(wave).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    wave = resample(wave, int(sr), sample_rate)
    n = int(round(sample_rate * seconds))
    if wave.shape[0] >= n:
        return np.ascontiguousarray(wave[:n], dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    out[: wave.shape[0]] = wave
    return out


@dataclass(frozen=True)
class AudioTransform:
    sample_rate: int = 16000
    seconds: float = 5.0

    def __call__(self, path: str | os.PathLike):
        return load_audio(path, self.sample_rate, self.seconds)

    def spec(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "seconds": self.seconds,
            "samples": int(round(self.sample_rate * self.seconds)),
            "channels": "mono (mean)",
            "pad": "zeros at end",
            "crop": "from start",
        }


def audio_transform_from_spec(spec: dict[str, Any]) -> AudioTransform:
    """The transform a table spec (or a model's audio input spec) describes; BadInput for
    a sample rate or length outside the bounds of :mod:`mmcli.data.limits`."""
    check_input_spec("audio", spec)
    return AudioTransform(int(spec.get("sample_rate", 16000)), float(spec.get("seconds", 5.0)))
