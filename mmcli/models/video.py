"""Video encoders: any image encoder over the frames, then pooling over time.

    --encoder video=frames:resnet18                       # mean of frame features (CLIP4Clip's baseline)
    --encoder video=frames:open_clip:ViT-B-32:pool=attention
    --encoder video=frames:convnet:width=16,grid=4:pool=attention

The input is the ``video`` table as preprocess stores it, uint8 ``[B, T, 3, H, W]``. The
image encoder (built-in or pretrained: ``IMAGE_ENCODER`` is any image encoder spec) runs
on the ``B * T`` frames as one batch. ``pool=mean`` averages the frame features: it sees no
order, so a motion and its reverse look the same. ``pool=attention`` layer-normalises the
frame features, adds a learnt position embedding per frame (initialised at half their
scale, so that the order counts from the first step: at BERT's 0.02 it did not, on the toy
videos), and runs ``depth`` transformer layers over the frames with a learnt query token
in front, whose output is the video's feature (CLIP4Clip's "seqTransf",
with the query token in place of a mean over outputs). Tokens for attention fusion are
every frame's tokens (frames x patches), each frame's tokens given its frame's position
embedding under ``pool=attention``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcli.models.base import Encoder
from mmcli.models.registry import create, parse_encoder_spec, register

POOLS = ("mean", "attention")


def split_frames_spec(rest: str) -> tuple[str, dict[str, str]]:
    """``"convnet:width=16,grid=4:pool=attention"`` -> ``("convnet:width=16,grid=4",
    {"pool": "attention"})``: the last ``:``-separated part holds the frames options when
    every one of its ``key=value`` keys is a frames option."""
    head, sep, tail = rest.rpartition(":")
    if sep and tail.strip():
        parts = [p.strip() for p in tail.split(",") if p.strip()]
        pairs = [p.split("=", 1) for p in parts]
        names = {f for f in FramesConfig.__dataclass_fields__ if f != "image"}
        if pairs and all(len(kv) == 2 and kv[0].strip() in names for kv in pairs):
            return head, {k.strip(): v.strip() for k, v in pairs}
    return rest, {}


@register("video", "frames")
@dataclass
class FramesConfig:
    """``frames:IMAGE_ENCODER[:pool=mean|attention,depth=1,heads=4,max_frames=64]``."""

    image: str = "tiny"
    pool: str = "mean"
    depth: int = 1
    heads: int = 4
    max_frames: int = 64  # frames the position embedding covers (attention)

    #: "frames:convnet:width=16" sets image (with its own options); see split_frames_spec
    spec_field = "image"
    spec_parser = staticmethod(split_frames_spec)

    def build(self) -> Frames:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.depth < 1 or self.heads < 1 or self.max_frames < 1:
            raise ValueError("depth, heads and max_frames must be >= 1")
        name = re.split(r"[:,]", self.image.strip(), maxsplit=1)[0]
        if name in ("frames", "video/frames"):
            raise ValueError("the frame encoder must be an image encoder")
        return Frames(self)


class Frames(Encoder):
    """Frame encoder + temporal pooling (see the module docstring)."""

    modality = "video"
    name = "frames"

    def __init__(self, config: FramesConfig):
        super().__init__(config)
        name, overrides = parse_encoder_spec(config.image, modality="image")
        self.image = create(name, modality="image", **overrides)
        self.out_dim, self.token_dim = self.image.out_dim, self.image.token_dim
        if config.pool == "attention":
            d = self.out_dim
            if d % config.heads:
                raise ValueError(
                    f"pool=attention: the frame features' {d} dimensions are not divisible "
                    f"by heads={config.heads}"
                )
            self.query = nn.Parameter(torch.randn(1, 1, d) * d**-0.5)
            self.position = nn.Parameter(torch.randn(1, config.max_frames, d) * 0.5)
            self.in_norm = nn.LayerNorm(d)
            layer = nn.TransformerEncoderLayer(
                d, config.heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                norm_first=True,
            )  # fmt: skip
            self.temporal = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            if self.token_dim:
                self.token_position = nn.Parameter(
                    torch.zeros(1, config.max_frames, 1, self.token_dim)
                )

    # -- the frames as one image batch

    def _frames(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"frames: expected videos [B, T, 3, H, W], got {list(x.shape)}")
        b, t = x.shape[:2]
        if self.config.pool == "attention" and t > self.config.max_frames:
            raise ValueError(
                f"frames: {t} frames per video, the position embedding covers "
                f"max_frames={self.config.max_frames}"
            )
        return x.reshape(b * t, *x.shape[2:]), b, t

    def _pool(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, D] frame features -> [B, D]."""
        if self.config.pool == "mean":
            return frames.mean(1)
        b, t, _ = frames.shape
        h = self.in_norm(frames) + self.position[:, :t].to(frames.dtype)
        h = torch.cat([self.query.to(h.dtype).expand(b, -1, -1), h], dim=1)
        return self.norm(self.temporal(h)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, b, t = self._frames(x)
        return self._pool(self.image(flat).view(b, t, -1))

    def forward_tokens(self, x: torch.Tensor):
        flat, b, t = self._frames(x)
        pooled, tokens, mask = self.image.forward_tokens(flat)
        tokens = tokens.view(b, t, *tokens.shape[1:])
        if self.config.pool == "attention" and hasattr(self, "token_position"):
            tokens = tokens + self.token_position[:, :t].to(tokens.dtype)
        tokens = tokens.reshape(b, -1, tokens.shape[-1])
        return self._pool(pooled.view(b, t, -1)), tokens, mask.reshape(b, -1)

    # -- what the image encoder offers, passed through

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        return self.image.set_grad_checkpointing(enable)

    def prefers_channels_last(self, precision: str = "fp32") -> bool:
        return False  # the 5-d input has no channels_last layout

    def check_spec(self, spec: dict[str, Any], where: str) -> None:
        check = getattr(self.image, "check_spec", None)
        if check is not None:
            check(spec, where)

    def load_pretrained(self, source) -> dict[str, Any]:
        """``--weights video=FILE``: a whole frames encoder's state dict (``image.*`` and
        the temporal layers), else the frame encoder's own weights (any file its own
        ``--weights`` takes: torchvision, open_clip, ...)."""
        from pathlib import Path

        from mmcli.formats.manifest import file_sha256
        from mmcli.models.weights import apply_state_dict, load_weights, read_state_dict

        path = Path(source)
        if path.is_file() and self._is_own(path):
            state = read_state_dict(path, modality="video")
            apply_state_dict(self, state, where=str(source), lenient=False)
            return {"path": str(source), "sha256": file_sha256(path)}
        return load_weights(self.image, source)

    def _is_own(self, path) -> bool:
        """Whether ``path`` holds a whole frames encoder (``image.*`` keys, or an mmcli
        checkpoint's ``encoders.video.image.*``), read from a safetensors header alone (the
        image tower's own file is then read once, by its loader)."""
        from mmcli.models.weights import read_state_dict

        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())  # noqa: SIM118 - safe_open API
        except Exception:  # not safetensors (a torch file): its keys need the whole file
            keys = list(read_state_dict(path, modality="video"))
        prefix = "encoders.video."  # an mmcli checkpoint: its video encoder's keys
        if any(k.startswith(prefix) for k in keys):
            keys = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        own = set(self.state_dict())
        return bool(keys) and set(keys) <= own and any(k.startswith("image.") for k in keys)

    @property
    def weights_source(self):
        return getattr(self.image, "weights_source", None)
