"""extract's model: built from encoder names or a checkpoint, and what identifies a run."""

from __future__ import annotations

import hashlib
import json
import logging

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import TensorSet, where_paths
from mmcli.modalities import EXTRACT_ENCODERS

log = logging.getLogger("mmcli")

#: table-spec keys that must agree between a model's training data and the input
INPUT_KEYS = ("image_size", "tokenizer", "context_length", "lowercase", "sample_rate")


def setup_model(model, encoders, weights, tensors: TensorSet):
    """(MultimodalModel, modalities to extract) from the arguments."""
    from mmcli.models import MultimodalModel, build_model, load_model
    from mmcli.models.backbones import with_backbones
    from mmcli.models.pretrained import is_library_spec, one_weights
    from mmcli.models.weights import weights_per_modality

    if model is not None and encoders:
        raise BadInput("pass either --model or --encoder, not both")
    if model is not None and weights and not is_library_spec(model):
        raise BadInput(
            "--weights applies to --encoder backbones; a --model checkpoint has its weights",
            hint="drop --weights",
        )
    if model is not None:
        if not isinstance(model, MultimodalModel):  # a checkpoint, open_clip:ARCH or hf:DIR
            model = load_model(model, weights=one_weights(weights))
        modalities = [m for m in model.modalities if m in tensors.tables]
        if tensors.kind == "tensors":  # trained on frozen features: the backbones rebuilt
            model = with_backbones(model, modalities)
        if not modalities:
            raise BadInput(
                f"the model encodes {', '.join(model.modalities)} but the input has "
                f"{', '.join(tensors.tables) or 'no tables'}",
                where=where_paths(tensors.paths),
            )
        for m in model.modalities:
            if m not in modalities:
                log.info("note: the input has no %s table; extracting %s", m, ", ".join(modalities))
        check_inputs(model, modalities, tensors)
        return model, modalities
    if encoders:
        for m in encoders:
            tensors.require(m, hint=f"drop --encoder {m}=..., or pass shards that hold {m}")
    else:
        encoders = {m: EXTRACT_ENCODERS[m] for m in tensors.tables if m in EXTRACT_ENCODERS}
        if not encoders:
            raise BadInput(
                f"no image, text or audio table in the input (it has: {', '.join(tensors.tables) or 'none'})",
                where=where_paths(tensors.paths),
            )
    weights = weights_per_modality(weights, list(encoders))
    model = build_model(encoders, weights=weights, inputs=tensors.specs)
    return model, list(model.modalities)


def text_tokenizers(model, modalities) -> dict:
    """``tokenize(captions)`` of each encoder with its own tokenizer (pretrained text towers)."""
    return {m: model.encoders[m].tokenize for m in modalities if model.encoders[m].takes_text}


def note_random_weights(model, modalities) -> None:
    if model.checkpoint is not None:
        return
    for m in modalities:
        if model.weights.get(m) is None:
            log.info(
                "note: the %s encoder %s has random weights (pass --weights %s=FILE%s)",
                m,
                model.config.encoders[m]["name"],
                m,
                " or imagenet" if m == "image" else "",
            )


def check_inputs(model, modalities: list[str], tensors: TensorSet) -> None:
    """Warn when the input was preprocessed differently from the model's training data."""
    for m in modalities:
        want, have = model.config.inputs.get(m) or {}, tensors.spec(m)
        diff = [
            f"{k} {have[k]} (model: {want[k]})"
            for k in INPUT_KEYS
            if k in want and k in have and want[k] != have[k]
        ]
        if diff:
            log.warning(
                "the %s input differs from the model's training data: %s", m, "; ".join(diff)
            )


def run_id(model, modalities, tensors: TensorSet, dtype: str, normalize: bool, seed: int) -> str:
    """What makes two runs' shards interchangeable (for --resume)."""
    key = {
        "seed": seed
        if model.checkpoint is None and any(model.weights.get(m) is None for m in modalities)
        else None,
        "model": model.config_dict(),
        "weights": model.weights,
        "checkpoint": (model.checkpoint or {}).get("sha256"),
        "modalities": modalities,
        "dtype": dtype,
        "normalize": normalize,
        "input": {"specs": tensors.specs, "source": tensors.source, "shards": len(tensors.shards)},
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def specs(
    model, modalities, tensors: TensorSet, dtype: str, normalize: bool, seed: int
) -> dict[str, dict]:
    from mmcli.models.backbones import init_record

    specs = {}
    for m in modalities:
        enc = model.config.encoders[m]
        random = model.weights.get(m) is None and model.checkpoint is None
        specs[m] = {
            "encoder": enc["name"],
            "encoder_config": enc["config"],
            "head": model.config.heads.get(m),
            "dim": model.out_dim(m),
            "normalized": bool(normalize),
            "dtype": dtype,
            "weights": model.weights.get(m),
            # random init is reproducible from the seed (backbones without weights)
            "seed": seed if random else None,
            "space": model.space,
            "model": model.checkpoint,
            "input": tensors.spec(m),
        }
        if random:  # how to rebuild it (a model trained on these features encodes raw input)
            specs[m]["init"] = init_record(model, m, seed)
        if hasattr(model.encoders[m], "tokenizer_spec"):  # a pretrained model's own tokenizer
            specs[m]["tokenizer"] = model.encoders[m].tokenizer_spec()
    return specs
