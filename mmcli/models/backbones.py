"""The backbones behind a model trained on frozen features, rebuilt to take raw input.

``fuse-train`` on feature files (``extract`` output) trains ``features:dim=N`` encoders:
they pass the backbone's features through. Each feature table's spec names what wrote
it, and the model keeps those specs (``config.extra["features"]``):

* backbone features (``extract --encoder``): the encoder's name and config, and its
  weights (``{"path", "sha256"}``), or for random init the seed and the encoders built
  under it (``init``: rebuilt in the same order, checked by a fingerprint of the weights);
* joint features (``extract --model``): the model's path (or ``LIBRARY:SPEC`` and its
  weights) and sha256.

:func:`with_backbones` rebuilds them (a weights file that is missing or whose sha256
changed: one line, exit 2) and chains each before its ``features`` encoder, giving a
model that takes raw rows, caption strings or files, as ``retrieve --text/--image`` and
``extract --model`` on tensor shards need. The rebuilt backbone applies what extract did
to its features: L2 normalisation and the rounding to the stored dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.base import Encoder

log = logging.getLogger("mmcli")

#: what a chain hands on from its backbone encoder (a pretrained tokenizer, image size, ...)
DELEGATED = ("tokenize", "tokenizer_spec", "context_length", "check_spec", "like", "image_size",
             "count_truncated")  # fmt: skip
FINGERPRINT_VALUES = 1024  # values per tensor that the fingerprint of random weights reads


# ----------------------------------------------------------------- what extract records


def fingerprint(module: nn.Module) -> str:
    """A cheap fingerprint of ``module``'s weights (the first values of every tensor, rounded
    to bfloat16 so that a bf16-cast copy gives the same): tells a rebuilt random init from
    another."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not t.is_floating_point():
            continue
        part = t.detach().reshape(-1)[:FINGERPRINT_VALUES].to("cpu", torch.bfloat16).float()
        h.update(name.encode())
        h.update(part.numpy().tobytes())
    return h.hexdigest()[:32]


def init_record(model: Any, modality: str, seed: int) -> dict[str, Any]:
    """How ``extract`` built a random-init backbone: the seed, every encoder built under it
    in order, and the fingerprint of this one's weights."""
    return {
        "seed": int(seed),
        "encoders": [[m, dict(spec)] for m, spec in model.config.encoders.items()],
        "fingerprint": fingerprint(model.encoders[modality]),
    }


# -------------------------------------------------------------------------- rebuilding


def rebuildable(spec: Any) -> bool:
    """True when a feature table's spec says how to rebuild what wrote it."""
    if not isinstance(spec, dict):
        return False
    rec = spec.get("model")
    if isinstance(rec, dict) and rec.get("path"):
        return True
    weights = spec.get("weights")
    has_weights = isinstance(weights, dict) and weights.get("path")
    return bool(spec.get("encoder")) and bool(has_weights or isinstance(spec.get("init"), dict))


def _changed(what: str, path: str, where: str) -> BadInput:
    return BadInput(
        f"the {what} {path} is not the file the features were extracted with (its sha256 changed)",
        where=where,
        hint="put the original file back, or extract the features again and retrain",
    )


def _missing(what: str, path: str, where: str) -> BadInput:
    return BadInput(
        f"the {what} {path} that the features were extracted with is not there",
        where=where,
        hint="put it back at that path (the model needs it to encode raw input), or query by features",
    )


def _from_model(spec: dict[str, Any], where: str):
    """The whole model that wrote joint features (``extract --model``)."""
    from mmcli.models.pretrained import is_library_spec, load_model, split_spec

    rec = spec["model"]
    path = str(rec["path"])
    weights = None
    if is_library_spec(path):
        weights = (spec.get("weights") or {}).get("path")
        lib, rest = split_spec(path)
        if weights and not Path(weights).is_file():
            raise _missing("weights file", weights, where)
        if lib == "hf" and not Path(rest).is_dir():
            raise _missing("model folder", rest, where)
    else:
        found = [p for p in (path, rec.get("abspath")) if p and Path(p).is_file()]
        if not found:
            raise _missing("model", path, where)
        path = found[0]
    model = load_model(path, weights=weights)
    if rec.get("sha256") and (model.checkpoint or {}).get("sha256") != rec["sha256"]:
        raise _changed("model", path, where)
    return model


def _from_encoder(spec: dict[str, Any], modality: str, where: str):
    """A one-encoder model: the backbone that wrote backbone features (``extract --encoder``)."""
    from mmcli.models.config import ModelConfig
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.models.weights import IMAGENET, load_weights

    enc = {"name": spec["encoder"], "config": dict(spec.get("encoder_config") or {})}
    inputs = {modality: spec["input"]} if isinstance(spec.get("input"), dict) else {}
    weights, init = spec.get("weights"), spec.get("init")
    if isinstance(weights, dict) and weights.get("path"):
        path = str(weights["path"])
        # a transformers folder loads its own weights; an open_clip tag is fetched by name
        own = enc["name"] == "hf" or path.startswith("open_clip:")
        source = IMAGENET if weights.get("name") == IMAGENET else path
        if not own and source != IMAGENET and not Path(source).is_file():
            raise _missing("weights file", source, where)
        model = MultimodalModel(ModelConfig(encoders={modality: enc}, inputs=inputs))
        if not own:
            model.weights[modality] = load_weights(model.encoders[modality], source)
        got = (model.weights.get(modality) or {}).get("sha256")
        if weights.get("sha256") and got != weights["sha256"]:
            raise _changed("weights file", source, where)
        return model
    # random init: every encoder extract built under the seed, in the same order
    encoders = {m: s for m, s in init["encoders"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init["seed"]))
        model = MultimodalModel(ModelConfig(encoders=encoders))
    if fingerprint(model.encoders[modality]) != init.get("fingerprint"):
        raise BadInput(
            f"the random-init {spec['encoder']} backbone of the {modality} features does not "
            "rebuild to the same weights (another torch or mmcli version?)",
            where=where,
            hint="extract the features again with this version and retrain",
        )
    model.config = dataclasses.replace(
        model.config, encoders={modality: encoders[modality]}, inputs=inputs
    )
    return model


def backbone(spec: dict[str, Any], modality: str, where: str = "the model's features"):
    """The model that wrote ``modality``'s features (as recorded in ``spec``)."""
    rec = spec.get("model")
    if isinstance(rec, dict) and rec.get("path"):
        return _from_model(spec, where).eval()
    return _from_encoder(spec, modality, where).eval()


class BackboneChain(Encoder):
    """A rebuilt backbone, then the ``features`` encoder: raw rows in, what the model's
    head expects out (normalised and rounded as extract stored the features)."""

    def __init__(self, backbone_model: nn.Module, modality: str, features: Encoder, spec: dict):
        super().__init__(features.config)
        self.modality = modality
        self.backbone = backbone_model
        self.features = features
        inner = backbone_model.encoders[modality]
        self.name = inner.name
        self.normalized = bool(spec.get("normalized", True))
        self.store_dtype = getattr(torch, str(spec.get("dtype") or "float32"), torch.float32)
        self.out_dim, self.token_dim = features.out_dim, features.token_dim

    @property
    def takes_text(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.backbone.encoders[self.modality], "takes_text", False))

    def __getattr__(self, name: str):
        if name in DELEGATED:
            return getattr(self._modules["backbone"].encoders[self.modality], name)
        return super().__getattr__(name)

    def prefers_channels_last(self, precision: str = "fp32") -> bool:
        return self.backbone.encoders[self.modality].prefers_channels_last(precision)

    def forward_tokens(self, x):
        z = self.backbone.encode(self.modality, x, normalize=self.normalized)
        return self.features.forward_tokens(z.to(self.store_dtype).float())


def chainable(model: Any, modality: str) -> dict[str, Any] | None:
    """The recorded spec of the backbone behind ``modality``'s ``features`` encoder, or None."""
    enc = model.config.encoders.get(modality) or {}
    if enc.get("name") != "features":
        return None
    spec = ((model.config.extra or {}).get("features") or {}).get(modality)
    return spec if rebuildable(spec) else None


def with_backbones(model: Any, modalities: list[str]):
    """A view of ``model`` whose ``features`` encoders of ``modalities`` take raw input
    (see the module doc). Shares every other module with ``model``."""
    chains = {m: chainable(model, m) for m in modalities}
    chains = {m: s for m, s in chains.items() if s is not None}
    if not chains:
        return model
    where = (model.checkpoint or {}).get("path") or "the model"
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.encoders = nn.ModuleDict(dict(model.encoders))
    encoders, inputs = dict(model.config.encoders), dict(model.config.inputs)
    view.weights = dict(model.weights)
    for m, spec in chains.items():
        bb = backbone(spec, m, where)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        view.encoders[m] = BackboneChain(bb, m, model.encoders[m], spec).to(device)
        encoders[m] = dict(bb.config.encoders[m])
        inputs[m] = dict(bb.config.inputs.get(m) or spec.get("input") or {})
        view.weights[m] = bb.weights.get(m)
    for m in chains:
        log.info("the %s backbone rebuilt: %s", m, encoders[m]["name"])
    view.config = dataclasses.replace(model.config, encoders=encoders, inputs=inputs)
    return view
