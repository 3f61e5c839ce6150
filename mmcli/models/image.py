"""Image encoders: ``tiny``, ``convnet``, ``resnet18``, ``resnet50``, ``vit_b_16``.

All take uint8 ``[B, 3, H, W]`` of any reasonable size and normalise on their device.
The torchvision architectures keep torchvision's parameter names (minus the classifier
head), so torchvision state dicts and ``--weights imagenet`` load directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.models.base import ImageEncoder, grid_tokens
from mmcli.models.checkpointing import run_blocks
from mmcli.models.registry import register

# --------------------------------------------------------------------------- tiny


@register("image", "tiny")
@dataclass
class TinyImageConfig:
    """Two strided convs and a mean: for tests, runs in milliseconds."""

    width: int = 8
    dim: int = 16

    def build(self) -> TinyImage:
        return TinyImage(self)


class TinyImage(ImageEncoder):
    name = "tiny"

    def __init__(self, config: TinyImageConfig):
        super().__init__(config)
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(w, config.dim, 3, stride=2, padding=1)
        self.out_dim = self.token_dim = config.dim

    def forward_tokens(self, x):
        x = self.prepare(x)
        fmap = self.conv2(F.relu(self.conv1(x)))  # (B, dim, H/4, W/4)
        tokens, mask = grid_tokens(fmap)
        return tokens.mean(1), tokens, mask


# ------------------------------------------------------------------------- convnet


@register("image", "convnet")
@dataclass
class ConvNetConfig:
    """A classic conv-pool-fc CNN sized for 64-224 px input (any size works).

    An AlexNet-style 7x7 stride-4 stem and a 2x2 max-pool (÷8), then ``depth - 1`` stages
    of 3x3 conv-BN-ReLU doubling the width, each but the last followed by a 2x2 max-pool,
    a global average pool and one fc layer to ``dim``. At 224 px with the defaults: about
    60 M multiply-adds per image, a 7x7 last feature map (49 tokens of 256 channels).
    """

    width: int = 32
    depth: int = 4
    dim: int = 256
    dropout: float = 0.0
    stem_stride: int = 4
    grid: int = 1  # fc input: the last map average-pooled to grid x grid (1 = global average)

    def build(self) -> ConvNet:
        if (
            self.depth < 1
            or self.width < 1
            or self.dim < 1
            or self.grid < 1
            or self.stem_stride < 1
        ):
            raise ValueError("width, depth, dim, grid and stem_stride must be >= 1")
        return ConvNet(self)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvNet(ImageEncoder):
    name = "convnet"

    def __init__(self, config: ConvNetConfig):
        super().__init__(config)
        w = config.width
        layers: list[nn.Module] = [
            _conv_bn(3, w, 7, stride=config.stem_stride),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        cin = w
        for i in range(1, config.depth):
            cout = w * 2**i
            layers.append(_conv_bn(cin, cout, 3))
            if i < config.depth - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(cin * config.grid**2, config.dim)
        self.token_dim = cin
        self.out_dim = config.dim

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """The classic conv-pool-fc head: with grid > 1 the fc layer sees where things are."""
        g = self.config.grid
        if g == 1:
            return fmap.mean((2, 3))  # (B, C)
        return F.adaptive_avg_pool2d(fmap, g).flatten(1)  # (B, C * g * g)

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.grad_checkpointing = enable  # each conv stage (with its pool)
        return True

    def _features(self, x):
        return run_blocks(self.features, self.prepare(x), self.grad_checkpointing)

    def forward_tokens(self, x):
        fmap = self._features(x)  # (B, C, h, w)
        tokens, mask = grid_tokens(fmap)  # (B, hw, C)
        pooled = self.fc(self.dropout(self._pool(fmap)))  # (B, dim)
        return pooled, tokens, mask

    def forward(self, x):
        fmap = self._features(x)  # (B, C, h, w)
        return self.fc(self.dropout(self._pool(fmap)))  # (B, dim)


# -------------------------------------------------------------------------- ResNet


class ResNetEncoder(ImageEncoder):
    """torchvision ResNet without its fc layer; pooled = global average of the last map."""

    arch = ""

    def __init__(self, config):
        super().__init__(config)
        import torchvision

        net = getattr(torchvision.models, self.arch)(weights=None)
        # adopt torchvision's modules under their own names: state dicts stay compatible
        for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(child, getattr(net, child))
        self.out_dim = self.token_dim = net.fc.in_features

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.grad_checkpointing = enable  # layer1 .. layer4
        return True

    def feature_map(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.prepare(x)))))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return run_blocks(stages, x, self.grad_checkpointing)  # (B, C, h, w)

    def forward_tokens(self, x):
        tokens, mask = grid_tokens(self.feature_map(x))
        return tokens.mean(1), tokens, mask

    def forward(self, x):
        return self.feature_map(x).mean((2, 3))


@register("image", "resnet18")
@dataclass
class ResNet18Config:
    """torchvision ResNet-18 (11.2 M parameters without fc), 512-d features."""

    pretrained = "ResNet18_Weights.IMAGENET1K_V1"  # for --weights imagenet (not a field)

    def build(self) -> ResNet18:
        return ResNet18(self)


class ResNet18(ResNetEncoder):
    name = "resnet18"
    arch = "resnet18"


@register("image", "resnet50")
@dataclass
class ResNet50Config:
    """torchvision ResNet-50 (23.5 M parameters without fc), 2048-d features."""

    pretrained = "ResNet50_Weights.IMAGENET1K_V2"

    def build(self) -> ResNet50:
        return ResNet50(self)


class ResNet50(ResNetEncoder):
    name = "resnet50"
    arch = "resnet50"


# ----------------------------------------------------------------------------- ViT


@register("image", "vit_b_16")
@dataclass
class ViTB16Config:
    """torchvision ViT-B/16, 768-d class-token features.

    ``image_size`` is the size its position embeddings are laid out for (224 for the
    ImageNet weights); other input sizes (multiples of 16 work best) get bicubically
    interpolated position embeddings, as timm and open_clip do.
    """

    image_size: int = 224
    dropout: float = 0.0

    pretrained = "ViT_B_16_Weights.IMAGENET1K_V1"

    def build(self) -> ViTB16:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError("image_size must be a positive multiple of 16")
        return ViTB16(self)


class ViTB16(ImageEncoder):
    name = "vit_b_16"
    patch = 16

    def __init__(self, config: ViTB16Config):
        super().__init__(config)
        import torchvision

        net = torchvision.models.vit_b_16(
            weights=None, image_size=config.image_size, dropout=config.dropout
        )
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.encoder = net.encoder  # holds pos_embedding, layers, ln (torchvision names)
        self.grid = config.image_size // self.patch
        self.out_dim = self.token_dim = net.hidden_dim

    def _pos_embedding(self, h: int, w: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding  # (1, 1 + g*g, D)
        if h == w == self.grid:
            return pos
        cls_pos, grid_pos = pos[:, :1], pos[:, 1:]
        d = pos.shape[-1]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, d)
        return torch.cat([cls_pos, grid_pos], 1)

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.grad_checkpointing = enable  # each encoder block
        return True

    def forward_tokens(self, x):
        x = self.prepare(x)
        b, _, hh, ww = x.shape
        if hh < self.patch or ww < self.patch:
            raise ValueError(f"vit_b_16: images must be at least 16x16, got {hh}x{ww}")
        x = self.conv_proj(x)  # (B, D, h, w)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, hw, D)
        x = torch.cat([self.class_token.expand(b, -1, -1), x], 1)  # (B, 1 + hw, D)
        enc = self.encoder
        x = enc.dropout(x + self._pos_embedding(h, w))
        x = enc.ln(run_blocks(enc.layers, x, self.grad_checkpointing))
        tokens = x[:, 1:]
        mask = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=x.device)
        return x[:, 0], tokens, mask
