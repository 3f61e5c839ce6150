"""Audio encoders over mono waveforms: ``tiny``, ``melcnn``.

Input: float16/float32 ``[B, S]`` at the config's ``sample_rate``. The log-mel front end
(torchaudio) is a submodule, so it runs on the model's device, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcli.models.base import AudioEncoder, LogMel
from mmcli.models.checkpointing import run_blocks
from mmcli.models.registry import register

# --------------------------------------------------------------------------- tiny


@register("audio", "tiny")
@dataclass
class TinyAudioConfig:
    """16 log-mel bands, one linear layer per frame, mean over time: for tests."""

    sample_rate: int = 16000
    n_mels: int = 16
    dim: int = 16

    def build(self) -> TinyAudio:
        return TinyAudio(self)


class TinyAudio(AudioEncoder):
    name = "tiny"

    def __init__(self, config: TinyAudioConfig):
        super().__init__(config)
        self.logmel = LogMel(config.sample_rate, config.n_mels, n_fft=512, hop_length=256)
        self.norm = nn.BatchNorm1d(config.n_mels)
        self.proj = nn.Linear(config.n_mels, config.dim)
        self.out_dim = self.token_dim = config.dim

    def forward_tokens(self, x):
        mel = self.logmel(self.prepare(x))[:, 0].to(self.compute_dtype)  # (B, n_mels, T)
        tokens = torch.tanh(self.proj(self.norm(mel).transpose(1, 2)))  # (B, T, dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens.mean(1), tokens, mask


# ------------------------------------------------------------------------- melcnn


@register("audio", "melcnn")
@dataclass
class MelCNNConfig:
    """Log-mel spectrogram (torchaudio) then a 2-D CNN over mel x time.

    ``depth`` stages of two 3x3 conv-BN-ReLU layers doubling the width from ``width``,
    each followed by a 2x2 average pool; then the mel axis is averaged away, leaving one
    token per time step (hop 10 ms x 2**depth), and pooled = mean + max over time -> fc
    to ``dim``. Defaults: 25 ms windows, 10 ms hop, 64 mel bands (PANNs-style).
    """

    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 400
    hop_length: int = 160
    width: int = 32
    depth: int = 4
    dim: int = 256
    dropout: float = 0.0

    def build(self) -> MelCNN:
        if self.depth < 1 or self.width < 1:
            raise ValueError("width and depth must be >= 1")
        return MelCNN(self)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, ceil_mode=True),
    )


class MelCNN(AudioEncoder):
    name = "melcnn"

    def __init__(self, config: MelCNNConfig):
        super().__init__(config)
        c = config
        self.logmel = LogMel(c.sample_rate, c.n_mels, c.n_fft, c.hop_length)
        self.bn0 = nn.BatchNorm2d(1)
        blocks, cin = [], 1
        for i in range(c.depth):
            cout = c.width * 2**i
            blocks.append(_block(cin, cout))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(cin, c.dim)
        self.token_dim = cin
        self.out_dim = c.dim

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.grad_checkpointing = enable  # each conv stage
        return True

    def forward_tokens(self, x):
        mel = self.bn0(self.logmel(self.prepare(x)).to(self.compute_dtype))  # (B, 1, n_mels, T)
        fmap = run_blocks(
            self.blocks, mel, self.grad_checkpointing
        )  # (B, C, n_mels / 2**depth, T / 2**depth)
        tokens = fmap.mean(2).transpose(1, 2)  # (B, T', C): one token per time step
        pooled = tokens.mean(1) + tokens.amax(1)  # (B, C)
        pooled = self.fc(self.dropout(pooled))  # (B, dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return pooled, tokens, mask
