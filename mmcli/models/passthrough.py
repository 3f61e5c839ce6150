"""``features`` encoders: pass precomputed backbone features through unchanged.

``fuse-train`` on feature files (``mmcli extract`` output) trains heads and fusion over
frozen backbone features; its checkpoint uses these encoders, so the same model projects
feature files into the joint space (``extract --model`` on a feature file, ``retrieve
--queries``). The backbone that produced the features is recorded in the model config
(``extra.features``), so a user can see what to run first on raw data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmcli.models.base import AudioEncoder, Encoder, ImageEncoder, TextEncoder
from mmcli.models.registry import register


def _forward_tokens(self, x: torch.Tensor):
    if x.dim() != 2 or x.shape[1] != self.out_dim:
        raise ValueError(
            f"{self.modality}/features expects precomputed [B, {self.out_dim}] features, got {list(x.shape)} "
            "(run mmcli extract with the backbone first)"
        )
    x = x.float()
    return x, x.unsqueeze(1), torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)


def _make(base: type, modality: str):
    class Passthrough(base):
        name = "features"

        def __init__(self, config):
            torch.nn.Module.__init__(self)
            self.config = config
            self.out_dim = self.token_dim = config.dim

        forward_tokens = _forward_tokens

        def forward(self, x):
            return _forward_tokens(self, x)[0]

    @register(modality, "features")
    @dataclass
    class FeaturesConfig:
        """Precomputed features of width ``dim`` (no parameters)."""

        dim: int = 512

        def build(self):
            return Passthrough(self)

    Passthrough.__name__ = FeaturesConfig.__name__ = f"{modality.capitalize()}Features"
    return FeaturesConfig


ImageFeaturesConfig = _make(ImageEncoder, "image")
TextFeaturesConfig = _make(TextEncoder, "text")
AudioFeaturesConfig = _make(AudioEncoder, "audio")


class _VideoBase(Encoder):
    modality = "video"


VideoFeaturesConfig = _make(_VideoBase, "video")
