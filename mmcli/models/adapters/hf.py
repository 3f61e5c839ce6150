"""Hugging Face transformers models as mmcli encoders: ``text=hf:DIR``, ``image=hf:DIR``,
``audio=hf:DIR`` (a ``save_pretrained`` folder, or a hub id fetched only when online).

* CLIP / SigLIP folders (``model_type`` ``clip`` / ``siglip``): the text tower
  (``get_text_features``, the folder's own tokenizer: CLIP pads to the longest caption,
  SigLIP to its fixed length, as it was trained) or the image tower
  (``get_image_features``, normalised with the folder's ``preprocessor_config.json``
  mean/std); ``--model hf:DIR`` is both towers with the logit scale (and SigLIP's bias).
* any other text model (BERT, MiniLM, MPNet, ...): a sentence encoder pooled as
  sentence-transformers does: ``1_Pooling/config.json`` when present (cls / mean / max /
  mean_sqrt_len / lasttoken), else the masked mean; ``sentence_bert_config.json``'s
  ``max_seq_length`` and ``do_lower_case``.
* audio models (wav2vec2, HuBERT, WavLM, ...): the feature extractor's zero-mean unit-variance
  normalisation (when it does it), the masked-free mean of the last hidden states; the
  shards must be at the feature extractor's sample rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmcli.data.model_transforms import hf_like
from mmcli.errors import BadInput
from mmcli.models.adapters.common import (
    TextBatch,
    as_text_batch,
    check_image_size,
    count_over,
    ones_mask,
    view_without,
)
from mmcli.models.adapters.hf_library import (  # noqa: F401  (re-exported)
    _features,
    auto_model,
    folder_weights,
    hf_grad_checkpointing,
    hf_model_object,
    load_auto,
    load_tokenizer,
    local_folder,
    model_files,
    model_type,
    read_json,
    weights_file,
)
from mmcli.models.adapters.pooling import pool, poolings
from mmcli.models.base import AudioEncoder, ImageEncoder, TextEncoder
from mmcli.models.registry import register

LIB = "hf"
DUAL = ("clip", "siglip")
IMAGE_PARTS = ("vision_model", "visual_projection")
TEXT_PARTS = ("text_model", "text_projection")
SCALE = ("logit_scale", "logit_bias")


@dataclass
class _HfConfig:
    path: str = ""

    spec_field = "path"  # "hf:DIR_OR_ID" sets path

    def __post_init__(self) -> None:
        if not self.path:
            raise BadInput("hf needs a model folder or hub id", hint="e.g. hf:path/to/saved_model")


@register("text", LIB)
@dataclass
class HfTextConfig(_HfConfig):
    """A transformers text model: a CLIP/SigLIP text tower, or a sentence encoder."""

    pooling: Literal["auto", "cls", "mean", "max", "mean_sqrt_len", "lasttoken"] = "auto"
    max_length: int | None = None  # default: the model's (sentence-transformers' max_seq_length)

    def build(self) -> HfText:
        return HfText(self)


@register("image", LIB)
@dataclass
class HfImageConfig(_HfConfig):
    """A transformers CLIP / SigLIP image tower."""

    def build(self) -> HfImage:
        return HfImage(self)


@register("audio", LIB)
@dataclass
class HfAudioConfig(_HfConfig):
    """A transformers audio model (wav2vec2, HuBERT, WavLM, ...): mean of its last states."""

    def build(self) -> HfAudio:
        return HfAudio(self)


# ------------------------------------------------------------------------- text


class HfText(TextEncoder):
    name = LIB
    set_grad_checkpointing = hf_grad_checkpointing
    takes_text = True

    def __init__(self, config: HfTextConfig, model=None):
        super().__init__(config)
        model = hf_model_object(config.path) if model is None else model
        self.weights_source = folder_weights(config.path)
        self.hf_files = model_files(config.path)
        self.kind = str(getattr(model.config, "model_type", ""))
        self.tokenizer = load_tokenizer(config.path)
        folder = local_folder(config.path)
        st = read_json(folder, "sentence_bert_config.json")
        self.lowercase = bool(st.get("do_lower_case", False))
        if self.kind in DUAL:
            self.hf = view_without(model, *IMAGE_PARTS, *SCALE)
            text_cfg = getattr(model.config, "text_config", model.config)
            limit = int(getattr(text_cfg, "max_position_embeddings", 77))
            self.padding = "max_length" if self.kind == "siglip" else "longest"
            self.pooling: list[str] = []
        else:
            self.hf = model
            limit = int(st.get("max_seq_length") or _model_limit(model, self.tokenizer))
            self.padding = "longest"
            self.pooling = poolings(config.pooling, read_json(folder, "1_Pooling/config.json"))
        self.context_length = int(config.max_length or limit)
        dim = getattr(model.config, "projection_dim", None) if self.kind == "clip" else None
        hidden = int(getattr(model.config, "text_config", model.config).hidden_size)
        self.out_dim = self.token_dim = int(dim or hidden) * max(1, len(self.pooling))
        if self.pooling:
            self.token_dim = hidden

    def tokenize(self, texts: list[str]) -> TextBatch:
        """The model's tokenizer on the full captions; those longer than its limit are cut and counted."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.context_length,
            return_tensors="pt",
        )  # fmt: skip
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        tensors = {"input_ids": enc["input_ids"]}
        if "attention_mask" in enc:
            tensors["attention_mask"] = enc["attention_mask"]
        return TextBatch(tensors, truncated=count_over(lengths, self.context_length))

    def tokenizer_spec(self) -> dict[str, Any]:
        return {"tokenizer": f"hf:{self.config.path}", "context_length": self.context_length}

    def forward_tokens(self, x):
        batch = as_text_batch(self, x)
        kwargs = dict(batch.tensors)
        if self.kind in DUAL:
            pooled = _features(self.hf.get_text_features(**kwargs))  # (B, D)
            return pooled, pooled[:, None], ones_mask(pooled[:, None])
        states = self.hf(**kwargs).last_hidden_state  # (B, L, H)
        mask = kwargs.get("attention_mask", torch.ones(states.shape[:2], device=states.device))
        return pool(states, mask, self.pooling), states, mask.bool()

    def load_pretrained(self, source) -> dict[str, Any]:
        return weights_file(self, source)


def _model_limit(model, tokenizer) -> int:
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    tok = int(getattr(tokenizer, "model_max_length", limit) or limit)
    return min(limit, tok) if tok < 10**6 else limit


# ------------------------------------------------------------------------ image


class HfImage(ImageEncoder):
    name = LIB
    set_grad_checkpointing = hf_grad_checkpointing

    def __init__(self, config: HfImageConfig, model=None):
        folder = local_folder(config.path)
        pp = (
            read_json(folder, "preprocessor_config.json") if folder else _hub_processor(config.path)
        )
        mean, std = pp.get("image_mean", (0.5, 0.5, 0.5)), pp.get("image_std", (0.5, 0.5, 0.5))
        if pp.get("do_normalize") is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        super().__init__(config, mean=tuple(mean), std=tuple(std))
        model = hf_model_object(config.path) if model is None else model
        self.weights_source = folder_weights(config.path)
        self.hf_files = model_files(config.path)
        self.kind = str(getattr(model.config, "model_type", ""))
        if self.kind not in DUAL:
            raise BadInput(
                f"hf image encoders are CLIP / SigLIP towers; this folder holds a {self.kind!r} model",
                where=config.path,
            )
        self.hf = view_without(model, *TEXT_PARTS, *SCALE)
        vision = model.config.vision_config
        self.image_size = (int(vision.image_size), int(vision.image_size))
        dim = getattr(model.config, "projection_dim", None) if self.kind == "clip" else None
        self.out_dim = self.token_dim = int(dim or vision.hidden_size)
        self.like = hf_like(pp, self.image_size[0])

    def forward_tokens(self, x):
        pooled = _features(self.hf.get_image_features(pixel_values=self.prepare(x)))  # (B, D)
        return pooled, pooled[:, None], ones_mask(pooled[:, None])

    def check_spec(self, spec: dict[str, Any], where: str) -> None:
        check_image_size(self, spec, where, f"hf:{self.config.path}")

    def load_pretrained(self, source) -> dict[str, Any]:
        return weights_file(self, source)


def _hub_processor(path: str) -> dict[str, Any]:
    return load_auto(path, "AutoImageProcessor").to_dict()


# ------------------------------------------------------------------------ audio


class HfAudio(AudioEncoder):
    name = LIB
    set_grad_checkpointing = hf_grad_checkpointing

    def __init__(self, config: HfAudioConfig, model=None):
        super().__init__(config)
        self.hf = hf_model_object(config.path) if model is None else model
        self.weights_source = folder_weights(config.path)
        self.hf_files = model_files(config.path)
        fe = load_auto(config.path, "AutoFeatureExtractor")
        self.sample_rate = int(getattr(fe, "sampling_rate", 16000))
        self.normalize = bool(getattr(fe, "do_normalize", False))
        self.out_dim = self.token_dim = int(self.hf.config.hidden_size)

    def forward_tokens(self, x):
        wave = self.prepare(x)  # (B, S) float32
        if self.normalize:  # the feature extractor's zero-mean unit-variance, per recording
            mean = wave.mean(1, keepdim=True)
            var = wave.var(1, keepdim=True, unbiased=False)
            wave = (wave - mean) / torch.sqrt(var + 1e-7)
        dtype = next(self.hf.parameters()).dtype
        states = self.hf(input_values=wave.to(dtype)).last_hidden_state  # (B, T, H)
        return states.mean(1), states, ones_mask(states)

    def check_spec(self, spec: dict[str, Any], where: str) -> None:
        have = spec.get("sample_rate")
        if have is not None and int(have) != self.sample_rate:
            raise BadInput(
                f"the audio is at {have} Hz, hf:{self.config.path} takes {self.sample_rate} Hz",
                where=where,
                hint=f"preprocess it with --sample-rate {self.sample_rate}",
            )

    def load_pretrained(self, source) -> dict[str, Any]:
        return weights_file(self, source)


def hf_transform(path: str) -> dict[str, Any]:
    folder = local_folder(path)
    pp = read_json(folder, "preprocessor_config.json") if folder else _hub_processor(path)
    if not pp:
        raise BadInput("no preprocessor_config.json: not an image model folder", where=path)
    return hf_like(pp)
