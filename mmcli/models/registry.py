"""The registries of mmcli's models: encoders and fusion modules, looked up by name.

**Encoders.** Each encoder is a small dataclass config registered under ``(modality, name)``; its
``build()`` returns the :class:`~mmcli.models.base.Encoder`:

    @register("image", "convnet")
    @dataclass
    class ConvNetConfig:
        width: int = 32
        def build(self) -> Encoder: ...

    create("convnet", width=16)              # unique names need no modality
    create("image/tiny")                     # "tiny" exists for every modality: qualify it
    create("tiny", modality="text")
    list_encoders()                          # ["image/convnet", ..., "audio/tiny"]
    parse_encoder_spec("convnet:width=32,depth=3")  # ("convnet", {"width": 32, "depth": 3})

**Fusion modules** are built by kind from a model config's ``fusion`` entry
(``{"kind": "attention", ...}``) by a builder registered for that kind
(:mod:`mmcli.models.fusion` registers the built-in ones):

    @register_fusion("concat")
    def build(fusion_config, model) -> nn.Module: ...

    fusion_kinds()                           # ("none", "concat", "attention")

This module imports no torch and no other model module: every model module imports
it, never the reverse.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from mmcli.errors import BadInput
from mmcli.modalities import order_key

# ---------------------------------------------------------------------- encoders

_REGISTRY: dict[tuple[str, str], type] = {}


def register(modality: str, name: str):
    """Class decorator registering a config dataclass (with ``build()``) as an encoder."""

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if not callable(getattr(cls, "build", None)):
            raise TypeError(f"{cls.__name__} needs a build() method")
        key = (modality, name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"encoder {modality}/{name} is already registered")
        cls.modality = modality
        cls.encoder_name = name
        _REGISTRY[key] = cls
        return cls

    return wrap


def list_encoders(modality: str | None = None) -> list[str]:
    """Qualified names (``image/resnet18``) in modality order, then registration order."""
    keys = [k for k in _REGISTRY if modality is None or k[0] == modality]
    keys.sort(key=lambda k: order_key(k[0]))
    return [f"{m}/{n}" for m, n in keys]


def _known(modality: str | None) -> str:
    return ", ".join(list_encoders(modality)) or "none"


def resolve(name: str, modality: str | None = None) -> tuple[str, str, type]:
    """``(modality, name, config class)`` of ``name`` (``tiny`` or ``image/tiny``)."""
    if "/" in name:
        qual, bare = name.split("/", 1)
        if modality is not None and qual != modality:
            raise BadInput(
                f"encoder {name!r} is a {qual} encoder, not {modality}",
                hint=f"{modality} encoders: {_known(modality)}",
            )
        modality, name = qual, bare
    if modality is not None:
        if modality not in {m for m, _ in _REGISTRY}:
            raise BadInput(
                f"unknown modality {modality!r}",
                hint=f"known: {', '.join(sorted({m for m, _ in _REGISTRY}, key=order_key))}",
            )
        cls = _REGISTRY.get((modality, name))
        if cls is None:
            raise BadInput(
                f"unknown {modality} encoder {name!r}", hint=f"known: {_known(modality)}"
            )
        return modality, name, cls
    matches = [m for (m, n) in _REGISTRY if n == name]
    if not matches:
        raise BadInput(f"unknown encoder {name!r}", hint=f"known: {_known(None)}")
    if len(matches) > 1:
        options = ", ".join(f"{m}/{name}" for m in sorted(matches, key=order_key))
        raise BadInput(f"encoder name {name!r} is ambiguous", hint=f"say which: {options}")
    return matches[0], name, _REGISTRY[(matches[0], name)]


def config_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init}


def make_config(name: str, modality: str | None = None, **overrides: Any):
    """The config dataclass of ``name`` with ``overrides`` (unknown keys rejected)."""
    modality, name, cls = resolve(name, modality)
    fields = config_fields(cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise BadInput(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"for encoder {modality}/{name}",
            hint=f"valid: {', '.join(fields) or 'none'}",
        )
    values = {k: _coerce(v, fields[k], k, f"{modality}/{name}") for k, v in overrides.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise BadInput(f"bad options for encoder {modality}/{name}: {e}") from None


def create(name: str, modality: str | None = None, **overrides: Any):
    """Build the encoder ``name`` (random init) with config ``overrides``."""
    config = make_config(name, modality, **overrides)
    try:
        return config.build()
    except ValueError as e:  # configs validate themselves in build()
        raise BadInput(
            f"bad options for encoder {config.modality}/{config.encoder_name}: {e}"
        ) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_encoder_spec(spec: str, modality: str | None = None) -> tuple[str, dict[str, Any]]:
    """``"convnet:width=32,depth=3"`` -> ``("convnet", {"width": 32, "depth": 3})``.

    Values are coerced to the config field types; unknown keys are rejected with the
    list of valid ones. The name may be qualified (``image/tiny``).
    """
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise BadInput(f"empty encoder name in {spec!r}", hint=f"known: {_known(modality)}")
    modality, bare, cls = resolve(name, modality)
    fields = config_fields(cls)
    overrides: dict[str, Any] = {}
    positional = getattr(cls, "spec_field", None)  # library adapters: "open_clip:ViT-B-32"
    parser = getattr(cls, "spec_parser", None)  # video frames: "frames:convnet:width=16:pool=mean"
    if positional and parser is not None:
        value, given = parser(rest)
        if value.strip():
            overrides[positional] = value.strip()
        rest = ",".join(f"{k}={v}" for k, v in given.items())
    elif positional:
        value, rest = _split_positional(rest)
        if value:
            overrides[positional] = value
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise BadInput(
                f"encoder option {part!r} in {spec!r} is not key=value",
                hint=f"for example {bare}:{next(iter(fields), 'width')}=...",
            )
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in fields:
            raise BadInput(
                f"unknown option {key!r} for encoder {modality}/{bare}",
                hint=f"valid: {', '.join(fields) or 'none'}",
            )
        overrides[key] = _coerce(value, fields[key], key, f"{modality}/{bare}")
    return name, overrides


def _split_positional(rest: str) -> tuple[str, str]:
    """``"ViT-B-32,pretrained=openai"`` -> ``("ViT-B-32", "pretrained=openai")``: the value
    runs up to the first comma that starts a ``key=`` option (so paths may hold commas)."""
    m = re.search(r",\s*[A-Za-z_]\w*\s*=", rest)
    if m is None:
        return rest.strip(), ""
    return rest[: m.start()].strip(), rest[m.start() + 1 :]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null"}


def _coerce(value: Any, typ: Any, key: str, encoder: str) -> Any:
    """Coerce a string (or JSON value) to the annotated field type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (Union, types.UnionType):
        if isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, encoder)
        return value
    if origin is Literal:
        choices = list(args)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise BadInput(
            f"bad value {value!r} for {key} of encoder {encoder}",
            hint=f"choose one of {', '.join(map(str, choices))}",
        )
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise BadInput(
            f"bad value {value!r} for {key} of encoder {encoder}",
            hint=f"expected {getattr(typ, '__name__', typ)}",
        ) from None
    return value


# ---------------------------------------------------------------------- fusion

#: a model config's ``fusion`` entry without a module: the mean of the embeddings
NO_FUSION = "none"

FusionBuilder = Callable[[dict[str, Any], Any], Any]  # (fusion config, model) -> nn.Module
_FUSION: dict[str, FusionBuilder] = {}


def register_fusion(kind: str):
    """Register ``builder(fusion_config, model) -> nn.Module`` for ``config.fusion["kind"]``."""
    if kind == NO_FUSION:
        raise ValueError(f"fusion kind {NO_FUSION!r} means no module; it cannot be registered")

    def wrap(builder: FusionBuilder) -> FusionBuilder:
        _FUSION[kind] = builder
        return builder

    return wrap


def fusion_kinds() -> tuple[str, ...]:
    """Every fusion kind: ``"none"`` (no module) first, then the registered ones in
    registration order (built in: ``concat``, ``attention``)."""
    return (NO_FUSION, *_FUSION)


def fusion_builder(kind: str) -> FusionBuilder:
    """The builder of a registered fusion kind (``"none"`` has no module, so none)."""
    builder = _FUSION.get(kind)
    if builder is None:
        raise BadInput(
            f"the model has a fusion module of kind {kind!r}, which this mmcli cannot build",
            hint=f"known kinds: {', '.join(_FUSION) or 'none'}; upgrade mmcli",
        )
    return builder
