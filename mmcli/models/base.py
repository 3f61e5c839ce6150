"""The encoder interface every modality shares.

An encoder maps a batch of raw table rows (already on its device) to features:

    pooled = enc(x)                              # [B, out_dim]
    pooled, tokens, mask = enc.forward_tokens(x) # [B, out_dim], [B, T, token_dim], [B, T] bool

``tokens`` are what cross-modal attention attends over: image = positions of the last
feature map (or ViT patches), text = token states, audio = time frames; ``mask`` is True
for valid tokens (text padding is False).

Inputs are the rows exactly as the tensor shards store them:

* image: uint8 ``[B, 3, H, W]`` RGB. The encoder converts to float and normalises with
  its mean/std buffers on its own device (float input is taken as already in [0, 1]).
* text: int32/int64 ``[B, L]`` ids of :class:`mmcli.data.text.ByteTokenizer`
  (PAD=0, BOS=1, EOS=2, vocab 259).
* audio: float16/float32 waveform ``[B, S]``; the encoder computes its log-mel itself.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from mmcli.data.text import BYTE_VOCAB_SIZE, EOS, PAD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Base class of all encoders. Subclasses set ``out_dim``/``token_dim`` and implement
    :meth:`forward_tokens` (and may override :meth:`forward` with a cheaper path)."""

    modality: str = ""
    name: str = ""
    #: True for encoders with their own tokenizer: they take caption strings (or the
    #: batch their ``tokenize(texts)`` makes), not byte-token ids
    takes_text: bool = False

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.out_dim: int = 0
        self.token_dim: int = 0
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Checkpoint the encoder's blocks in training (``--grad-checkpointing``): less
        memory, one more forward pass of each block in backward. Returns False when the
        encoder has no blocks to checkpoint (it then runs as before)."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]

    def prefers_channels_last(self, precision: str = "fp32") -> bool:
        """Whether ``extract`` runs this (image) encoder and its input in channels_last at
        ``precision``: the faster layout measured on the CPU (benchmarks/bench_pretrained.py
        --layouts); encoders where NCHW measured faster override it."""
        return True

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weights (bfloat16 for bf16 inference on the CPU, else float32)."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.modality}/{self.name}, out_dim={self.out_dim}, token_dim={self.token_dim}"


class ImageEncoder(Encoder):
    """Image encoders: uint8 -> float -> (x - mean) / std, done on the model's device."""

    modality = "image"
    fp32_buffers = ("mean", "std")  # kept float32 when the model is cast (runtime)

    def __init__(self, config: Any, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(config)
        # not persistent: they are constants, and keep state dicts equal to torchvision's
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W], got {list(x.shape)}")
        dtype, compute = self.mean.dtype, self.compute_dtype  # fp32; the weights' dtype
        if x.dtype == torch.uint8:
            # one fused pass: (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std
            # in place on the new float tensor: one 4-byte pass fewer than out-of-place
            scale, out = 1.0 / (255.0 * self.std), x.to(dtype)
            out = torch.addcmul(-self.mean / self.std, out, scale, out=out)
        else:
            out = (x.to(dtype) - self.mean) / self.std
        return out if compute == dtype else out.to(compute)  # bf16 weights: cast once


def grid_tokens(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature map [B, C, h, w] -> tokens [B, h*w, C] and an all-True mask [B, h*w]."""
    b, c = fmap.shape[:2]
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, hw, C)
    mask = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=fmap.device)
    return tokens, mask


class TextEncoder(Encoder):
    """Text encoders over byte-token ids."""

    modality = "text"
    vocab_size = BYTE_VOCAB_SIZE

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (int64) and the valid-token mask (True = not padding)."""
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected token ids [B, L], got {list(x.shape)}")
        if x.dtype.is_floating_point:
            raise ValueError(f"{self.name}: expected integer token ids, got {x.dtype}")
        x = x.long()
        return x, x != PAD


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens [B, T, D] over valid positions mask [B, T] -> [B, D]."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def eos_positions(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the EOS token of each row; the last valid token when a row has none."""
    is_eos = ids == EOS
    first_eos = is_eos.int().argmax(1)
    last_valid = (mask.long().sum(1) - 1).clamp_min(0)
    return torch.where(is_eos.any(1), first_eos, last_valid)


class AudioEncoder(Encoder):
    """Audio encoders over mono waveforms; the log-mel front end runs on the model's device."""

    modality = "audio"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected waveforms [B, S], got {list(x.shape)}")
        return x.float()


class LogMel(nn.Module):
    """Waveform [B, S] -> log-mel [B, 1, n_mels, frames], with torchaudio's mel filterbank.

    Power spectrogram (Hann window, centred, reflect padding: torchaudio's
    ``MelSpectrogram`` defaults) times the mel filterbank, then ``log(mel + 1e-6)``. Always
    fp32, outside autocast (the power spectrum overflows fp16); inputs shorter than one
    FFT window are zero-padded, so any length works. The window and filterbank are
    derived from the config, so they are buffers but not part of the state dict.
    """

    fp32_buffers = ("fb", "window")  # the spectrum is computed in fp32, whatever the model's dtype

    def __init__(self, sample_rate: int, n_mels: int, n_fft: int, hop_length: int):
        super().__init__()
        for name, value in (("sample_rate", sample_rate), ("n_mels", n_mels),
                            ("n_fft", n_fft), ("hop_length", hop_length)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("fb", torch.empty(n_fft // 2 + 1, n_mels), persistent=False)
        self.register_buffer("window", torch.empty(n_fft), persistent=False)
        self._fill()

    @torch.no_grad()
    def _fill(self) -> None:
        """Compute the filterbank and window; skipped on the meta device, where checkpoint
        loading builds models only to check their sizes (torchaudio's filterbank needs
        real numbers)."""
        if self.fb.is_meta:
            return
        import torchaudio.functional as AF

        with torch.device("cpu"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fb = AF.melscale_fbanks(
                n_freqs=self.n_fft // 2 + 1,
                f_min=0.0,
                f_max=self.sample_rate / 2.0,
                n_mels=self.n_mels,
                sample_rate=self.sample_rate,
            )  # (n_freqs, n_mels)
            window = torch.hann_window(self.n_fft)
        for w in caught:  # torchaudio's "all zero mel filterbank": one logged line
            logging.getLogger("mmcli").warning("log-mel front end: %s", w.message)
        self.fb.copy_(fb)
        self.window.copy_(window)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < self.n_fft:
            wave = nn.functional.pad(wave, (0, self.n_fft - wave.shape[-1]))
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                self.n_fft,
                self.hop_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # (B, n_freqs, frames)
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), self.fb).transpose(
                1, 2
            )  # (B, n_mels, frames)
            return torch.log(mel + 1e-6).unsqueeze(1)  # (B, 1, n_mels, frames)
