"""The multimodal model: one encoder (+ optional projection head) per modality.

    model = build_model({"image": "resnet18", "text": "transformer:depth=2"},
                        weights={"image": "resnet18.pth"}, inputs=tensor_set.specs)
    z = model.encode("image", images)                 # [B, D], L2-normalised
    pooled, tokens, mask = model.encode_tokens("text", ids)
    model.to_checkpoint("model.safetensors", train={...}, state={"step": 100})
    model = MultimodalModel.from_checkpoint("model.safetensors", device="cuda")

The checkpoint holds the state dict and :class:`ModelConfig` as JSON in its metadata,
which is all it takes to rebuild the model: no code, no pickle. Modules live in
``nn.ModuleDict`` s keyed by modality, so state-dict keys are stable:
``encoders.image.*``, ``heads.text.*`` and ``fusion.*``.

Fusion modules are built by kind from ``config.fusion`` (``{"kind": ..., ...}``) by the
builders of :mod:`mmcli.models.registry` (:mod:`mmcli.models.fusion` registers the
built-in kinds).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.base import Encoder
from mmcli.models.config import CONFIG_VERSION, ModelConfig  # noqa: F401  (re-exported)
from mmcli.models.fusion import mean_fusion
from mmcli.models.heads import build_head, head_out_dim
from mmcli.models.registry import (
    config_to_dict,
    create,
    fusion_builder,
    make_config,
    parse_encoder_spec,
    resolve,
)
from mmcli.models.weights import load_weights

log = logging.getLogger("mmcli")


# ------------------------------------------------------------------------ model


class MultimodalModel(nn.Module):
    """Encoders and heads per modality; ``encode(modality, x)`` gives [B, D] features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict()
        for modality, spec in config.encoders.items():
            self.encoders[modality] = create(
                spec["name"], modality=modality, **spec.get("config", {})
            )
        self.heads = nn.ModuleDict({m: build_head(h) for m, h in config.heads.items()})
        for m in self.heads:
            if m not in self.encoders:
                raise BadInput(f"model config: head for {m!r} but no {m} encoder")
        self.fusion: nn.Module | None = None
        if config.fusion is not None:
            self.fusion = fusion_builder(config.fusion.get("kind"))(config.fusion, self)
        self.logit_scale = (
            nn.Parameter(torch.tensor(float(config.logit_scale)))
            if config.logit_scale is not None
            else None
        )
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias)))
            if config.logit_bias is not None
            else None
        )
        self.classifier: nn.Module | None = None
        if config.classifier is not None:
            if not config.embed_dim:
                raise BadInput("model config: a classifier needs embed_dim")
            self.classifier = nn.Linear(config.embed_dim, len(config.classifier["labels"]))
        self.matcher: nn.Module | None = None
        if config.matcher:
            if self.fusion is None:
                raise BadInput("model config: a matcher needs a fusion module")
            # the fusion learns a correction to the dual-encoder score (see match_score):
            # zero-initialised, so matching starts exactly where the joint space is
            self.matcher = nn.Linear(self.fusion.width, 1)
            nn.init.zeros_(self.matcher.weight)
            nn.init.zeros_(self.matcher.bias)
        self.captioner: nn.Module | None = None
        if config.captioner is not None:
            from mmcli.models.decoder import build_captioner

            self.captioner = build_captioner(config.captioner, self.encoders)
        #: where each encoder's weights came from ({"path", "sha256"} or None = random init)
        self.weights: dict[str, dict[str, Any] | None] = {
            m: getattr(e, "weights_source", None) for m, e in self.encoders.items()
        }  # library adapters may bring their own (a transformers folder, a named tag)
        #: {"path", "sha256"} of the checkpoint this model was loaded from
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_meta: dict[str, Any] = {}

    # -- description -------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def space(self) -> str:
        """``joint`` when the model projects to a shared space, else ``backbone``."""
        joint = len(self.heads) or self.config.extra.get("space") == "joint"  # pretrained CLIPs
        return "joint" if joint else "backbone"

    def encoder(self, modality: str) -> Encoder:
        if modality not in self.encoders:
            raise BadInput(
                f"the model has no {modality} encoder (it has: {', '.join(self.encoders) or 'none'})"
            )
        return self.encoders[modality]

    def out_dim(self, modality: str) -> int:
        return head_out_dim(self.config.heads.get(modality), self.encoder(modality).out_dim)

    # -- compute -------------------------------------------------------------------
    def encode(self, modality: str, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Raw rows on the model's device -> [B, D]: encoder, head, L2 normalise."""
        z = self.encoder(modality)(x)  # (B, out_dim)
        if modality in self.heads:
            head = self.heads[modality]
            w = next(head.parameters(), None)  # bf16 inference: features of a passthrough are fp32
            z = head(z if w is None else z.to(w.dtype))  # (B, D)
        return F.normalize(z.float(), dim=-1) if normalize else z

    def encode_tokens(self, modality: str, x: torch.Tensor):
        """The encoder's ``(pooled [B, out_dim], tokens [B, T, token_dim], mask [B, T])``.

        Before any head: what cross-modal fusion attends over.
        """
        return self.encoder(modality).forward_tokens(x)

    def forward(self, modality: str, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode(modality, x, normalize=normalize)

    # -- fusion --------------------------------------------------------------------
    @property
    def fusion_kind(self) -> str:
        return (self.config.fusion or {}).get("kind", "none")

    def fuse_parts(
        self,
        tokens: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        embeddings: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused embedding [B, D] L2-normalised, fusion state [B, W]) from encoder outputs.

        ``tokens[m]``: the encoder's (tokens, mask) (attention fusion); ``embeddings[m]``:
        normalized joint embeddings (concat / none); ``present[m]``: [B] bool, False where
        an item lacks modality m (its tokens are masked out).
        """
        kind = self.fusion_kind
        if kind == "none":
            fused = mean_fusion(dict(embeddings), dict(present) if present is not None else None)
            return fused, fused
        if kind == "attention":
            toks = {}
            for m, (tok, mask) in tokens.items():
                if present is not None and m in present:
                    mask = mask & present[m][:, None]
                toks[m] = (tok, mask)
            out, state = self.fusion(toks)
        else:
            out, state = self.fusion(
                dict(embeddings), dict(present) if present is not None else None
            )
        return F.normalize(out.float(), dim=-1), state

    def fuse(
        self, inputs: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Raw rows of several modalities of the same items -> fused embedding [B, D]."""
        tokens, embeddings = {}, {}
        for m, x in inputs.items():
            if self.fusion_kind == "attention":
                pooled, tok, mask = self.encoder(m).forward_tokens(x)
                tokens[m] = (tok, mask)
            else:
                pooled = self.encoder(m)(x)
            z = self.heads[m](pooled) if m in self.heads else pooled
            embeddings[m] = F.normalize(z.float(), dim=-1)
        return self.fuse_parts(tokens, embeddings, present)[0]

    @torch.no_grad()
    def fuse_shard(self, shard: Any, batch_size: int = 256) -> tuple[torch.Tensor, Any]:
        """The fused embedding of every item of a tensor shard: ``(float32 [items, D], item index)``.

        Each item contributes the first row of each modality it has (its first caption);
        a modality an item lacks is masked out.
        """
        import numpy as np

        device = next(self.parameters()).device
        n = shard.num_items
        modalities = [m for m in self.encoders if m in shard.tables]
        first: dict[str, np.ndarray] = {}
        for m in modalities:
            owner = np.asarray(shard.item_index(m))
            rows = np.full(n, -1, dtype=np.int64)
            # the first row of each item: scan backwards so earlier rows win
            rows[owner[::-1]] = np.arange(len(owner))[::-1]
            first[m] = rows
        out = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            inputs, present = {}, {}
            for m in modalities:
                rows = first[m][start:stop]
                has = rows >= 0
                if not has.any():
                    continue
                data = shard.tensor(m)
                x = data[torch.from_numpy(np.where(has, rows, rows[has][0]))]
                inputs[m] = x.to(device)
                present[m] = torch.from_numpy(has).to(device)
            out.append(self.fuse(inputs, present).float().cpu())
        fused = torch.cat(out) if out else torch.zeros(0, self.config.embed_dim or 0)
        return fused, np.arange(n, dtype=np.int64)

    def check_input(self, tensors, m: str) -> None:
        """Table ``m`` of a tensor or feature set (:class:`~mmcli.formats.tensorfile.TensorSet`)
        must be what this model's encoder takes: raw rows, or features for a ``features``
        encoder. BadInput (one line) otherwise."""
        shard = tensors.shards[0]
        if shard.is_encoded(m):  # compressed images: the shape they decode to
            size = tensors.spec(m).get("image_size")
            kind, shape = "uint8", [shard.rows(m), 3, size, size]
        else:
            info = shard.tensors[m]
            kind, shape = info.torch_dtype_name, list(info.shape)
        where = tensors.shards[0].path
        enc = self.encoders[m]
        if self.config.encoders[m]["name"] == "features":  # fuse-train's passthrough over features
            if tensors.kind != "features" or len(shape) != 2 or shape[1] != enc.out_dim:
                raise BadInput(
                    f"the model's {m} encoder takes {enc.out_dim}-d features, the input {m} table "
                    f"is {kind} {shape} ({tensors.kind})",
                    where=where,
                    hint="extract with the backbone the model was trained on first, then pass those features",
                )
            return
        ok = tensors.kind == "tensors" and {
            "image": len(shape) == 4 and shape[1] == 3,
            "text": len(shape) == 2 and "int" in kind,
            "audio": len(shape) in (2, 3) and "float" in kind,
            "video": len(shape) == 5 and shape[2] == 3,
        }.get(m, True)
        if ok and hasattr(enc, "check_spec"):  # e.g. a fixed image size
            enc.check_spec(tensors.spec(m), where)
        if not ok:
            expect = {
                "image": "uint8 [rows, 3, H, W]",
                "text": "integer token ids [rows, length]",
                "audio": "float waveforms [rows, samples]",
                "video": "uint8 frames [rows, frames, 3, H, W]",
            }.get(m, "raw rows")
            raise BadInput(
                f"the {m} table is {kind} {shape} ({tensors.kind}), the {m} encoder takes {expect}",
                where=where,
                hint="pass tensor shards written by mmcli preprocess",
            )

    def match_score(self, parts: tuple[Mapping, Mapping]) -> torch.Tensor:
        """Match logit [B] of (tokens, embeddings) pairs of two modalities.

        ``t * cos(a, b) + matcher(fusion state)``: the dual-encoder's scaled similarity
        (held fixed here: t is the learned logit scale, and the match loss does not move
        the joint space through it) plus the fusion's correction, which sees both token
        sequences at once and so can tell bound attributes apart where the two pooled
        embeddings cannot. Without a matcher: the cosine alone.
        """
        tokens, embeddings = parts
        a, b = list(embeddings.values())[:2]
        cos = (a * b).sum(-1)
        if self.matcher is None:
            return cos
        _, state = self.fuse_parts(tokens, embeddings)
        scale = self.logit_scale.detach().exp() if self.logit_scale is not None else 1.0
        return scale * cos.detach().float() + self.matcher(state).squeeze(-1).float()

    # -- checkpoints ---------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        if any(self.weights.values()):
            d["extra"] = {**d["extra"], "encoder_weights": self.weights}
        return d

    def to_checkpoint(
        self,
        path: str | os.PathLike,
        *,
        train: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Write weights + config (+ training args, step, metrics) atomically."""
        from mmcli.models.checkpoint_io import save_model

        save_model(self, path, train=train, state=state, metrics=metrics)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> MultimodalModel:
        """Rebuild a model from an mmcli checkpoint (BadInput on anything that does not fit):
        see :func:`mmcli.models.checkpoint_io.load_model`."""
        from mmcli.models.checkpoint_io import load_model

        return load_model(path, cls, device=device)


# --------------------------------------------------------------------- building


def encoder_overrides_from_input(
    modality: str, name: str, overrides: dict[str, Any], spec: Mapping[str, Any]
):
    """Fill encoder options the input table determines (unless given explicitly).

    audio: ``sample_rate`` of the waveforms; text: ``context_length`` when the tokens are
    longer than the encoder's default.
    """
    _, _, cls = resolve(name, modality)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(overrides)
    if "sample_rate" in fields and "sample_rate" not in out and spec.get("sample_rate"):
        out["sample_rate"] = int(spec["sample_rate"])
    length = int(spec.get("context_length") or 0)
    field_ = fields.get("context_length")
    if field_ is not None and "context_length" not in out and length > field_.default:
        out["context_length"] = length
    return out


def build_model(
    encoders: Mapping[str, str],
    *,
    weights: Mapping[str, str | os.PathLike] | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
    heads: Mapping[str, dict[str, Any]] | None = None,
    embed_dim: int | None = None,
) -> MultimodalModel:
    """A model from encoder specs by modality (``"convnet:width=16"``), optionally with weights.

    ``inputs`` (the tensor table specs, e.g. ``TensorSet.specs``) fills options the data
    decides (audio sample rate, text length) and is stored in the config.
    """
    inputs = {m: dict(s) for m, s in (inputs or {}).items()}
    weights = dict(weights or {})
    extra_weights = sorted(set(weights) - set(encoders))
    if extra_weights:
        raise BadInput(
            f"--weights for {', '.join(extra_weights)} but no such encoder",
            hint=f"encoders: {', '.join(encoders)}",
        )
    enc_specs: dict[str, dict[str, Any]] = {}
    for modality, spec in encoders.items():
        name, overrides = parse_encoder_spec(str(spec), modality=modality)
        overrides = encoder_overrides_from_input(
            modality, name, overrides, inputs.get(modality, {})
        )
        cfg = make_config(name, modality, **overrides)
        enc_specs[modality] = {"name": type(cfg).encoder_name, "config": config_to_dict(cfg)}
    config = ModelConfig(
        encoders=enc_specs,
        heads={m: dict(h) for m, h in (heads or {}).items()},
        embed_dim=embed_dim,
        inputs={m: inputs[m] for m in encoders if m in inputs},
    )
    model = MultimodalModel(config)
    for modality, source in weights.items():
        model.weights[modality] = load_weights(model.encoders[modality], source)
    return model.eval()
