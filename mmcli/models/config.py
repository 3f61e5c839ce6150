"""The model config: everything needed to rebuild a model, and its validation.

A checkpoint's ``mmcli.model`` metadata is a :class:`ModelConfig` as JSON. Read from a
file, every field is type-checked by :meth:`ModelConfig.from_dict` before anything is
built from it (a head given as a string, ``logit_scale = "big"``, a fusion depth that is
not an integer are one line each, exit 2); sizes are then checked against the stored
weights by :mod:`mmcli.models.checkpoint_io`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmcli.errors import BadInput

CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`~mmcli.models.multimodal.MultimodalModel`
    (JSON-serialisable).

    ``encoders``: ``{modality: {"name": "resnet18", "config": {...all fields...}}}``;
    ``heads``: ``{modality: {"kind": "identity"|"linear"|"mlp", "in_dim", "out_dim", "hidden"}}``
    (empty: backbone features); ``embed_dim``: the joint dimension when there are heads;
    ``fusion``: ``{"kind": ..., ...}`` or None; ``inputs``: per modality, the tensor table
    spec the model expects (image_size / tokenizer + context_length / sample_rate +
    seconds), so raw queries can be preprocessed exactly as the training data was;
    ``extra``: free-form.
    """

    encoders: dict[str, dict[str, Any]]
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    embed_dim: int | None = None
    fusion: dict[str, Any] | None = None
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION
    #: trained parts beyond encoders and heads (fuse-train / distill):
    logit_scale: float | None = None  # initial log of the contrastive temperature's inverse
    logit_bias: float | None = None  # initial bias of the sigmoid loss
    classifier: dict[str, Any] | None = (
        None  # {"labels": [...]}: a label head on the fused embedding
    )
    matcher: bool = False  # a match/no-match head on the fused state (image-text matching)
    captioner: dict[str, Any] | None = None  # a caption decoder (mmcli.models.decoder)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None) -> ModelConfig:
        """A config from its JSON form, every field type-checked (BadInput otherwise)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("encoders"), Mapping):
            raise BadInput("model config has no encoders", where=where)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise BadInput(
                f"model config has unknown entries ({', '.join(unknown)[:120]})",
                where=where,
                hint="it was written by a newer mmcli; upgrade mmcli",
            )
        version = d.get("version", CONFIG_VERSION)
        if not _is_int(version) or version < 1:
            raise _bad("version", "a positive integer", version, where)
        if version > CONFIG_VERSION:
            raise BadInput(
                f"model config version {version} is newer than this mmcli reads ({CONFIG_VERSION})",
                where=where,
                hint="upgrade mmcli",
            )
        check_config(d, where)
        return cls(**{k: d[k] for k in known if k in d})


# ------------------------------------------------------------------- validation


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _show(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 50 else s[:47] + "..."


def _bad(key: str, expected: str, value: Any, where: str | None) -> BadInput:
    return BadInput(
        f"model config: {key} must be {expected}, got {_show(value)}",
        where=where,
        hint="the checkpoint is corrupt or was edited; recreate it with mmcli fuse-train or distill",
    )


def _positive_int(key: str, value: Any, where: str | None, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < 1:
        raise _bad(key, "a positive integer", value, where)


def _object(key: str, value: Any, where: str | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(key, "an object", value, where)


def check_config(d: Mapping[str, Any], where: str | None = None) -> None:
    """Type-check every field of a config's JSON form (see the module docstring)."""
    for m, spec in d["encoders"].items():
        _object(f"encoders.{m}", spec, where)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise BadInput(f"model config: encoder {m!r} has no name", where=where)
        _object(f"encoders.{m}.config", spec.get("config", {}), where)
    heads = d.get("heads", {})
    _object("heads", heads, where)
    for m, h in heads.items():
        _check_head(f"heads.{m}", h, where)
    _positive_int("embed_dim", d.get("embed_dim"), where)
    _check_fusion(d.get("fusion"), where)
    inputs = d.get("inputs", {})
    _object("inputs", inputs, where)
    from mmcli.data.limits import check_input_spec

    for m, spec in inputs.items():
        _object(f"inputs.{m}", spec, where)
        check_input_spec(m, spec, where=where)
    _object("extra", d.get("extra", {}), where)
    for key in ("logit_scale", "logit_bias"):
        v = d.get(key)
        if v is not None and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ):
            raise _bad(key, "a finite number or null", v, where)
    classifier = d.get("classifier")
    if classifier is not None:
        _object("classifier", classifier, where)
        labels = classifier.get("labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            raise _bad("classifier.labels", "a non-empty list of label names", labels, where)
    if not isinstance(d.get("matcher", False), bool):
        raise _bad("matcher", "true or false", d.get("matcher"), where)
    if d.get("captioner") is not None:
        _object("captioner", d["captioner"], where)  # its fields: mmcli.models.decoder


def _check_head(key: str, h: Any, where: str | None) -> None:
    from mmcli.models.heads import HEAD_KINDS

    _object(key, h, where)
    kind = h.get("kind", "identity")
    if kind not in HEAD_KINDS:
        raise _bad(f"{key}.kind", f"one of {', '.join(HEAD_KINDS)}", kind, where)
    for dim in ("in_dim", "out_dim", "hidden"):
        _positive_int(f"{key}.{dim}", h.get(dim), where)


def _check_fusion(fusion: Any, where: str | None) -> None:
    if fusion is None:
        return
    _object("fusion", fusion, where)
    if not isinstance(fusion.get("kind"), str):
        raise _bad("fusion.kind", "a string", fusion.get("kind"), where)
    for key in ("width", "depth", "heads", "hidden"):
        _positive_int(f"fusion.{key}", fusion.get(key), where)
    mods = fusion.get("modalities")
    if mods is not None and not (isinstance(mods, list) and all(isinstance(m, str) for m in mods)):
        raise _bad("fusion.modalities", "a list of modalities", mods, where)
    tokens = fusion.get("max_tokens")
    if tokens is not None:
        _object("fusion.max_tokens", tokens, where)
        for m, n in tokens.items():
            _positive_int(f"fusion.max_tokens.{m}", n, where, optional=False)
