"""open_clip models as mmcli encoders: ``image=open_clip:ARCH``, ``text=open_clip:ARCH``.

``ARCH`` is any open_clip model config (``ViT-B-32``, ``RN50``, ``ViT-B-16-SigLIP``, ...,
see ``open_clip.list_models()``) or the path of a custom config JSON (``embed_dim``,
``vision_cfg``, ``text_cfg``: the layout of open_clip's ``model_configs/``); its content is
kept in the encoder config, so a model rebuilds without the file. Weights: ``--weights
FILE`` (an open_clip state dict: safetensors, or ``.bin``/``.pt``/``.pth`` read with
``torch.load(weights_only=True)``) or ``pretrained=TAG`` (``open_clip:ViT-B-32,pretrained=
laion2b_s34b_b79k``: downloaded by open_clip, only when online). Without either: random init.

* image: the model's ``visual`` tower (``encode_image``), normalised with the model's own
  mean/std on the device; uint8 input of the model's image size (``preprocess --like
  open_clip:ARCH`` writes it).
* text: ``encode_text`` over open_clip's own tokenizer (``open_clip.get_tokenizer``) applied
  to the full caption strings; captions longer than the context length are cut by the
  tokenizer and counted.
* the whole model (``--model open_clip:ARCH``): both towers, the learned logit scale (and
  bias), in the joint space.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcli.data.model_transforms import open_clip_like
from mmcli.errors import BadInput
from mmcli.models.adapters.common import (
    TextBatch,
    as_text_batch,
    check_hf_tokenizer,
    check_image_size,
    count_over,
    load_strict,
    offline,
    ones_mask,
    quiet_library,
    read_library_weights,
    require,
    view_without,
    weights_info,
)
from mmcli.models.adapters.shared import shared_build
from mmcli.models.base import ImageEncoder, TextEncoder
from mmcli.models.registry import register

LIB = "open_clip"
TOWER_PARAMS = ("logit_scale", "logit_bias")


@dataclass
class _OpenClipConfig:
    arch: str = ""
    pretrained: str | None = None
    #: a custom config JSON's content (filled from the file; rebuilds need no file)
    model_cfg: dict | None = None

    spec_field = "arch"  # "open_clip:ViT-B-32" sets arch

    def __post_init__(self) -> None:
        if not self.arch:
            raise BadInput(
                "open_clip needs an architecture",
                hint="e.g. open_clip:ViT-B-32 or open_clip:my-config.json",
            )
        if self.model_cfg is None and self.arch.endswith(".json"):
            self.model_cfg = read_model_cfg(self.arch)

    def library_key(self) -> tuple:
        return (LIB, self.arch, self.pretrained, json.dumps(self.model_cfg, sort_keys=True))


@register("image", LIB)
@dataclass
class OpenClipImageConfig(_OpenClipConfig):
    """An open_clip model's image tower (``encode_image``)."""

    def build(self) -> OpenClipImage:
        return OpenClipImage(self)


@register("text", LIB)
@dataclass
class OpenClipTextConfig(_OpenClipConfig):
    """An open_clip model's text tower (``encode_text``) with open_clip's tokenizer."""

    def build(self) -> OpenClipText:
        return OpenClipText(self)


# ------------------------------------------------------------------- the library


def read_model_cfg(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput("open_clip model config not found", where=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"cannot read the open_clip model config ({e})", where=path) from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or not all(
        k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise BadInput(
            "not an open_clip model config (needs embed_dim, vision_cfg and text_cfg)", where=path
        )
    return cfg


def model_name(config: _OpenClipConfig) -> str:
    """The name open_clip knows the architecture by (a custom config is registered first)."""
    oc = require("open_clip", "open_clip encoders")
    if config.model_cfg is None:
        if config.arch not in oc.list_models():
            raise BadInput(
                f"unknown open_clip architecture {config.arch!r}",
                hint="see open_clip.list_models() (e.g. ViT-B-32, RN50), or pass a config JSON file",
            )
        return config.arch
    blob = json.dumps(config.model_cfg, sort_keys=True)
    name = f"mmcli-{Path(config.arch).stem}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    if name not in oc.list_models():  # open_clip reads configs from files: write one
        with tempfile.TemporaryDirectory(prefix="mmcli-open_clip-") as folder:
            (Path(folder) / f"{name}.json").write_text(blob, encoding="utf-8")
            oc.add_model_config(Path(folder) / f"{name}.json")  # read now, kept in memory
    return name


def create_clip(config: _OpenClipConfig):
    """The open_clip model (random init, or a named pretrained tag) and its preprocess cfg."""
    oc = require("open_clip", "open_clip encoders")
    name = model_name(config)
    if config.pretrained and Path(config.pretrained).is_file():
        raise BadInput(
            "pretrained= names an open_clip tag; pass a weights file with --weights",
            where=config.pretrained,
        )
    if config.pretrained:
        _check_tag(oc, name, config.pretrained)
    try:
        with quiet_library():
            # on the current default device: the meta device when a checkpoint is checked
            # before it is loaded (open_clip's own .to("cpu") would fail there)
            device = torch.empty(0).device
            model = oc.create_model(
                name, pretrained=config.pretrained, weights_only=True, device=device
            )
    except RuntimeError as e:
        if not config.pretrained:
            raise
        raise BadInput(
            f"cannot fetch open_clip weights {name}/{config.pretrained} ({str(e)[:160]})",
            hint=_download_hint(oc, name, config.pretrained),
        ) from None
    return model.eval(), dict(oc.get_model_preprocess_cfg(model))


def _check_tag(oc, name: str, tag: str) -> None:
    tags = oc.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise BadInput(
            f"open_clip has no pretrained tag {tag!r} for {name}",
            hint=f"tags: {', '.join(tags) or 'none'}; or pass a weights file with --weights",
        )
    if offline():
        raise BadInput(
            f"open_clip weights {name}/{tag} are not downloaded and mmcli is offline",
            hint=_download_hint(oc, name, tag),
        )


def _download_hint(oc, name: str, tag: str) -> str:
    cfg = oc.get_pretrained_cfg(name, tag) or {}
    source = (
        f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}"
        if cfg.get("hf_hub")
        else cfg.get("url", "")
    )
    return (
        f"download the weights ({source or 'see open_clip.get_pretrained_cfg'}) where there is "
        f"internet and pass --weights PATH/TO/FILE (safetensors or .bin)"
    )


def tag_source(config: _OpenClipConfig) -> dict[str, Any] | None:
    """The named weights an encoder was built with (``pretrained=TAG``), else None."""
    return (
        {"path": f"open_clip:{config.pretrained}", "name": config.pretrained}
        if config.pretrained
        else None
    )


def library_model(config: _OpenClipConfig):
    return shared_build(config.library_key(), lambda: create_clip(config))


# ------------------------------------------------------------------------ image


class OpenClipImage(ImageEncoder):
    name = LIB

    def __init__(self, config: OpenClipImageConfig, clip=None):
        clip, pp = library_model(config) if clip is None else clip
        super().__init__(config, mean=tuple(pp.get("mean")), std=tuple(pp.get("std")))
        self.weights_source = tag_source(config)
        self.visual = clip.visual
        self.preprocess_cfg = pp
        self.like = open_clip_like(pp)
        size = pp.get("size", 224)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.out_dim = int(getattr(clip.visual, "output_dim", 0) or clip.text_projection.shape[-1])
        transformer = getattr(clip.visual, "transformer", None)
        self._tokens = hasattr(clip.visual, "output_tokens") and transformer is not None
        self.token_dim = int(transformer.width) if self._tokens else self.out_dim

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """open_clip's own switch: its ViT towers checkpoint each residual block; a timm trunk
        its own blocks; the ModifiedResNet (RN50 ...) towers have none."""
        if hasattr(self.visual, "transformer") or hasattr(self.visual, "trunk"):
            self.visual.set_grad_checkpointing(enable)
            self.grad_checkpointing = enable
            return True
        return False

    def forward(self, x):
        return self.visual(self.prepare(x))  # (B, embed_dim)

    def forward_tokens(self, x):
        if not self._tokens:  # one token: the pooled feature
            pooled = self(x)
            return pooled, pooled[:, None], ones_mask(pooled)
        self.visual.output_tokens = True
        try:
            pooled, tokens = self.visual(self.prepare(x))  # (B, D), (B, T, width)
        finally:
            self.visual.output_tokens = False
        return pooled, tokens, ones_mask(tokens)

    def check_spec(self, spec: dict[str, Any], where: str) -> None:
        check_image_size(self, spec, where, f"open_clip:{self.config.arch}")

    def load_pretrained(self, source) -> dict[str, Any]:
        state = read_library_weights(str(source))
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        load_strict(
            self.visual, state, str(source), f"the image tower of open_clip:{self.config.arch}"
        )
        return weights_info(str(source))


# ------------------------------------------------------------------------- text


class OpenClipText(TextEncoder):
    name = LIB
    takes_text = True

    def __init__(self, config: OpenClipTextConfig, clip=None):
        super().__init__(config)
        self.weights_source = tag_source(config)
        clip, _ = library_model(config) if clip is None else clip
        oc = require("open_clip", "open_clip encoders")
        # the model without its image tower (the rest is shared, not copied)
        self.clip = view_without(clip, "visual", *TOWER_PARAMS)
        with quiet_library():
            self.tokenizer = oc.get_tokenizer(model_name(config))
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps one
        if inner is not None:
            check_hf_tokenizer(inner, where=f"the tokenizer of open_clip:{config.arch}")
        self.context_length = int(self.tokenizer.context_length)
        proj = getattr(self.clip, "text_projection", None)
        self.out_dim = self.token_dim = _text_dim(self.clip, proj)

    def tokenize(self, texts: list[str]) -> TextBatch:
        """open_clip's tokenizer on the full captions; those cut at the context length counted."""
        ids = self.tokenizer(texts)  # (B, context_length) int64
        return TextBatch({"ids": ids}, truncated=self.count_truncated(texts))

    def count_truncated(self, texts: list[str]) -> int:
        tok, n = self.tokenizer, self.context_length
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # SimpleTokenizer (BPE)
            return count_over([len(tok.encode(t)) + 2 for t in texts], n)
        inner = getattr(tok, "tokenizer", None)
        if inner is not None:
            clean = getattr(tok, "clean_fn", lambda s: s)
            return count_over([len(inner(clean(t))["input_ids"]) for t in texts], n)
        return 0

    def tokenizer_spec(self) -> dict[str, Any]:
        return {"tokenizer": f"open_clip:{self.config.arch}", "context_length": self.context_length}

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """open_clip's text transformer checkpoints each residual block (as
        ``CLIP.set_grad_checkpointing`` sets it); an HF text tower its own layers."""
        text = getattr(self.clip, "text", None)  # CustomTextCLIP
        if text is not None and hasattr(text, "set_grad_checkpointing"):
            text.set_grad_checkpointing(enable)
        elif hasattr(getattr(self.clip, "transformer", None), "grad_checkpointing"):
            self.clip.transformer.grad_checkpointing = enable
        else:
            return False
        self.grad_checkpointing = enable
        return True

    def forward(self, x):
        batch = as_text_batch(self, x)
        return self.clip.encode_text(batch["ids"])  # (B, embed_dim)

    def forward_tokens(self, x):
        pooled = self(x)  # one token: the pooled feature
        return pooled, pooled[:, None], ones_mask(pooled[:, None])

    def load_pretrained(self, source) -> dict[str, Any]:
        state = read_library_weights(str(source))
        state = {
            k: v for k, v in state.items() if not k.startswith("visual.") and k not in TOWER_PARAMS
        }
        load_strict(
            self.clip, state, str(source), f"the text tower of open_clip:{self.config.arch}"
        )
        return weights_info(str(source))


def _text_dim(clip, proj) -> int:
    if proj is None:
        return int(clip.text.output_dim) if hasattr(clip, "text") else int(clip.transformer.width)
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    return int(proj.shape[-1])


def open_clip_transform(arch: str, pretrained: str | None = None) -> dict[str, Any]:
    """``preprocess --like open_clip:ARCH``: the model's transform settings, without building it."""
    from dataclasses import asdict

    oc = require("open_clip", "preprocess --like open_clip:...")
    from open_clip.transform import PreprocessCfg

    name = model_name(OpenClipImageConfig(arch=arch, pretrained=pretrained))
    pp = asdict(PreprocessCfg())  # open_clip's defaults, then the tag's, as create_model does
    if pretrained:
        pp.update(
            {
                k: v
                for k, v in (oc.get_pretrained_cfg(name, pretrained) or {}).items()
                if v is not None
            }
        )
    pp["size"] = ((oc.get_model_config(name) or {}).get("vision_cfg") or {}).get("image_size", 224)
    return open_clip_like(pp)
