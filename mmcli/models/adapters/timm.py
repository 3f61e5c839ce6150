"""timm models as mmcli image encoders: ``image=timm:NAME`` (any ``timm.list_models()``).

Built with ``timm.create_model(NAME, num_classes=0)``: the pooled pre-logits features,
normalised with the model's own ``pretrained_cfg`` mean/std on the device. Weights:
``--weights FILE`` (a timm state dict: safetensors, or ``.bin``/``.pth`` read with
``torch.load(weights_only=True)``; the classifier is dropped), or ``pretrained=true``
(``timm:resnet50.a1_in1k,pretrained=true``: timm fetches them from the Hugging Face hub,
only when online). ``preprocess --like timm:NAME`` writes the pixels of timm's eval
transform (resize to ``size / crop_pct``, center crop, the model's interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmcli.data.model_transforms import timm_like
from mmcli.errors import BadInput
from mmcli.models.adapters.common import (
    check_image_size,
    load_strict,
    offline,
    ones_mask,
    quiet_library,
    read_library_weights,
    require,
    weights_info,
)
from mmcli.models.base import ImageEncoder, grid_tokens
from mmcli.models.registry import register

LIB = "timm"


@register("image", LIB)
@dataclass
class TimmImageConfig:
    """A timm architecture's pooled features (``num_classes=0``)."""

    arch: str = ""
    pretrained: bool = False  # fetch timm's default weights from the hub (online only)

    spec_field = "arch"  # "timm:resnet50" sets arch

    def __post_init__(self) -> None:
        if not self.arch:
            raise BadInput(
                "timm needs an architecture", hint="e.g. timm:resnet50 (see timm.list_models())"
            )

    def build(self) -> TimmImage:
        return TimmImage(self)


def create(config: TimmImageConfig):
    timm = require("timm", "timm encoders")
    base = config.arch.split(".", 1)[0]
    if base not in timm.list_models():
        raise BadInput(f"unknown timm architecture {config.arch!r}", hint="see timm.list_models()")
    if config.pretrained and offline():
        raise BadInput(
            f"timm weights for {config.arch} are not downloaded and mmcli is offline",
            hint=_download_hint(timm, config.arch),
        )
    try:
        with quiet_library():
            return timm.create_model(
                config.arch, pretrained=config.pretrained, num_classes=0
            ).eval()
    except (RuntimeError, OSError) as e:
        if not config.pretrained:
            raise
        raise BadInput(
            f"cannot fetch timm weights for {config.arch} ({str(e)[:160]})",
            hint=_download_hint(timm, config.arch),
        ) from None


def _download_hint(timm, arch: str) -> str:
    cfg = timm.models.get_pretrained_cfg(arch)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    where = f"https://huggingface.co/{hub}" if hub else "the timm weights"
    return f"download {where} where there is internet and pass --weights PATH/model.safetensors"


class TimmImage(ImageEncoder):
    name = LIB

    def __init__(self, config: TimmImageConfig):
        model = create(config)
        timm = require("timm", "timm encoders")
        data = timm.data.resolve_data_config({}, model=model)
        super().__init__(config, mean=tuple(data["mean"]), std=tuple(data["std"]))
        self.model = model
        self.weights_source = {"path": f"timm:{config.arch}"} if config.pretrained else None
        self.data_config = data
        self.like = timm_like(data)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.image_size = tuple(int(s) for s in data["input_size"][1:])
        self.out_dim = int(model.num_features)
        self.token_dim = int(getattr(model, "num_features", self.out_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """timm's own switch (``set_grad_checkpointing``), where the architecture has one."""
        try:
            self.model.set_grad_checkpointing(enable)
        except (AttributeError, AssertionError, NotImplementedError):
            return False
        self.grad_checkpointing = enable
        return True

    def forward(self, x):
        return self.model(self.prepare(x))  # (B, num_features)

    def forward_tokens(self, x):
        feats = self.model.forward_features(self.prepare(x))
        pooled = self.model.forward_head(feats, pre_logits=True)  # (B, num_features)
        if feats.dim() == 4:  # CNN map (B, C, h, w)
            tokens, mask = grid_tokens(feats)
        else:  # ViT tokens (B, T, C)
            tokens = feats
            mask = ones_mask(feats)
        return pooled, tokens, mask

    def check_spec(self, spec: dict[str, Any], where: str) -> None:
        fixed = bool(self.pretrained_cfg.get("fixed_input_size"))  # CNNs take any size
        check_image_size(self, spec, where, f"timm:{self.config.arch}", fixed_size=fixed)

    def load_pretrained(self, source) -> dict[str, Any]:
        state = read_library_weights(str(source))
        head = self.pretrained_cfg.get("classifier") or ()
        heads = (head,) if isinstance(head, str) else tuple(head)
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
        load_strict(self.model, state, str(source), f"timm:{self.config.arch}")
        return weights_info(str(source))


def timm_transform(arch: str) -> dict[str, Any]:
    """``preprocess --like timm:NAME``: timm's eval transform settings for the model."""
    timm = require("timm", "preprocess --like timm:...")
    with quiet_library():
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return timm_like(timm.data.resolve_data_config({}, model=model))
