"""The student: named encoders, derived from the teacher, another checkpoint, or (cross-modal)
the teacher with a new encoder for one modality."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.modalities import encoder_name, train_encoder
from mmcli.models.multimodal import ModelConfig, MultimodalModel, encoder_overrides_from_input
from mmcli.models.registry import config_to_dict, make_config, parse_encoder_spec
from mmcli.train.data import Dataset
from mmcli.train.distill.config import (
    DEFAULT_DERIVE,
    DistillConfig,
    StudentSpec,
    parse_student,
)
from mmcli.train.distill.data import DistillData
from mmcli.train.distill.teacher import teacher_scale
from mmcli.train.task import head_spec, token_counts

log = logging.getLogger("mmcli")


def derive_encoder(modality: str, enc: dict[str, Any], width: float, depth: float) -> dict:
    """A narrower / shallower copy of an encoder spec ``{"name", "config"}``: integer
    ``width`` and ``dim`` options times ``width`` (a transformer's width stays a multiple of
    its heads), ``depth`` times ``depth`` (at least 1). Parameter-free encoders (features)
    are kept."""
    name, config = enc["name"], dict(enc.get("config", {}))
    if name == "features":
        return {"name": name, "config": config}
    scalable = [k for k in ("width", "dim", "depth") if isinstance(config.get(k), int)]
    if not scalable:
        raise BadInput(
            f"cannot derive a smaller {modality}/{name}: it has no width or depth option",
            hint=f"name the student's encoder, e.g. --student {modality}="
            + {"image": "convnet:width=16", "text": "transformer:width=64,depth=1"}.get(
                modality, f"{encoder_name(train_encoder(modality))}:width=16"
            ),
        )
    for key in ("width", "dim"):
        if isinstance(config.get(key), int):
            value = max(4, int(round(config[key] * width)))
            heads = config.get("heads")
            if key == "width" and isinstance(heads, int) and heads > 0:
                value = max(heads, int(round(value / heads)) * heads)
            config[key] = value
    if isinstance(config.get("depth"), int):
        config["depth"] = max(1, int(round(config["depth"] * depth)))
    return {"name": name, "config": config_to_dict(make_config(name, modality, **config))}


def _named_encoder(modality: str, spec: str, ds: Dataset | None) -> dict:
    name, overrides = parse_encoder_spec(spec, modality=modality)
    if ds is not None and modality in ds.tables:
        overrides = encoder_overrides_from_input(modality, name, overrides, ds.spec(modality))
    cfg = make_config(name, modality, **overrides)
    return {"name": type(cfg).encoder_name, "config": config_to_dict(cfg)}


@dataclass
class Student:
    model: MultimodalModel
    trained: list[str]  # modalities with the student's own (trained) encoder
    frozen: list[str]  # modalities copied from the teacher, kept fixed
    targets: dict[str, str]  # student modality -> the teacher modality it learns from
    description: dict[str, Any]


def setup_student(data: DistillData, cfg: DistillConfig, teacher: MultimodalModel) -> Student:
    """The student model (see the module doc and docs/distill.md for the choices)."""
    spec = parse_student(cfg.student)
    if cfg.cross:
        return _cross_student(data, cfg, teacher, spec)
    if not (spec.checkpoint or spec.derive or spec.encoders):
        spec.derive = DEFAULT_DERIVE
    if spec.checkpoint:
        return _checkpoint_student(data, cfg, teacher, spec.checkpoint)
    ds = data.dataset
    unused = sorted(set(spec.encoders) - set(data.modalities))
    if unused:
        raise BadInput(
            f"--student {unused[0]}=...: the distilled modalities are {', '.join(data.modalities)}",
            hint="add a pair with it (--pairs), or drop that --student",
        )
    encoders, heads, trained, frozen = {}, {}, [], []
    for m in data.modalities:
        if m in spec.encoders:
            encoders[m] = _named_encoder(m, spec.encoders[m], ds)
        elif spec.derive is not None:
            encoders[m] = derive_encoder(m, teacher.config.encoders[m], *spec.derive)
        else:
            encoders[m] = copy.deepcopy(teacher.config.encoders[m])
            heads[m] = copy.deepcopy(teacher.config.heads.get(m) or {"kind": "identity"})
            frozen.append(m)
            continue
        trained.append(m)
    if not trained:
        raise BadInput(
            "the student is the teacher: name smaller encoders or derive them",
            hint="for example --student derive:0.25 or --student image=convnet:width=16",
        )
    probe = MultimodalModel(ModelConfig(encoders=encoders))
    for m in trained:
        out = teacher.out_dim(m)
        heads[m] = head_spec(cfg.head, probe.encoders[m].out_dim, out)
        if cfg.head == "identity" and probe.encoders[m].out_dim != out and not cfg.projector:
            _no_projector(m, out, probe.encoders[m].out_dim)
    classifier, fusion = _student_classifier(cfg, teacher, ds, spec)
    config = ModelConfig(
        encoders=encoders,
        heads=heads,
        embed_dim=teacher.config.embed_dim,
        fusion=fusion,
        inputs={m: teacher.config.inputs.get(m) or ds.spec(m) for m in data.modalities},
        logit_scale=math.log(teacher_scale(teacher)),
        classifier=classifier,
        extra=_extra(teacher, cfg),
    )
    if fusion:
        fusion["modalities"] = [m for m in fusion.get("modalities", encoders) if m in encoders]
    if fusion and fusion["kind"] == "attention":
        fusion["max_tokens"] = token_counts(probe, ds, fusion["modalities"])
    model = MultimodalModel(config)
    for m in frozen:
        model.encoders[m].load_state_dict(teacher.encoders[m].state_dict())
        if m in teacher.heads:
            model.heads[m].load_state_dict(teacher.heads[m].state_dict())
        model.encoders[m].requires_grad_(False)
        model.heads[m].requires_grad_(False)
        model.weights[m] = teacher.weights.get(m)
    return Student(
        model,
        trained,
        frozen,
        {m: m for m in data.modalities},
        {
            "kind": "derived" if spec.derive else "named",
            "derive": spec.derive,
            "encoders": {m: encoders[m]["name"] for m in data.modalities},
        },
    )


def _no_projector(m: str, teacher_dim: int, student_dim: int):
    raise BadInput(
        f"the teacher embeds {m} in {teacher_dim} dims and the student in {student_dim}, "
        "and --no-projector leaves no way to compare them",
        hint=f"drop --no-projector (a learned linear projector maps the student to {teacher_dim} "
        f"dims for the losses) or use a student with {teacher_dim}-dim embeddings",
    )


def _student_classifier(cfg: DistillConfig, teacher: MultimodalModel, ds: Dataset, spec):
    """(classifier config, fusion config) of a student trained with kd / ce."""
    if not cfg.classifies:
        return None, None
    if teacher.classifier is None:
        if "kd" in cfg.losses:
            raise BadInput(
                "the kd loss distils a classification head, and the teacher has none",
                hint="train the teacher with --objective contrastive,classify, or drop kd",
            )
        if not ds.label_names:
            raise BadInput("the ce loss needs labels, and the data has none")
        return {"labels": list(ds.label_names)}, None
    fusion = copy.deepcopy(teacher.config.fusion) if teacher.config.fusion else None
    if fusion and fusion.get("kind") == "attention" and spec.derive:
        w, d = spec.derive
        heads = int(fusion.get("heads", 4))
        fusion["width"] = max(heads, int(round(fusion.get("width", 128) * w / heads)) * heads)
        fusion["depth"] = max(1, int(round(fusion.get("depth", 2) * d)))
    return copy.deepcopy(teacher.config.classifier), fusion


def _extra(teacher: MultimodalModel, cfg: DistillConfig) -> dict[str, Any]:
    extra = {
        k: v for k, v in teacher.config.extra.items() if k not in ("encoder_weights", "distill")
    }
    extra["distill"] = {
        "teacher": teacher.checkpoint,
        "losses": cfg.losses,
        "temperature": cfg.temperature,
        **({"from": cfg.from_modality, "to": cfg.to_modality} if cfg.cross else {}),
    }
    return extra


def _checkpoint_student(data, cfg, teacher, path) -> Student:
    model = MultimodalModel.from_checkpoint(path)
    missing = [m for m in data.modalities if m not in model.modalities]
    if missing:
        raise BadInput(
            f"the student checkpoint has no {missing[0]} encoder",
            where=path,
            hint=f"it has: {', '.join(model.modalities)}",
        )
    if not cfg.projector:
        for m in data.modalities:
            if model.out_dim(m) != teacher.out_dim(m):
                _no_projector(m, teacher.out_dim(m), model.out_dim(m))
    if cfg.classifies and model.classifier is None:
        raise BadInput(
            "kd / ce need a classifier head, and the student checkpoint has none", where=path
        )
    if (
        "kd" in cfg.losses
        and teacher.classifier is not None
        and model.config.classifier["labels"] != teacher.config.classifier["labels"]
    ):
        raise BadInput("student and teacher classify different labels", where=path)
    if model.logit_scale is None and "contrastive" in cfg.losses:
        model.logit_scale = nn.Parameter(torch.tensor(math.log(teacher_scale(teacher))))
        model.config.logit_scale = float(model.logit_scale)
    model.config.extra = {**model.config.extra, **_extra(teacher, cfg)}
    model.checkpoint = None
    model.train()
    return Student(
        model,
        list(data.modalities),
        [],
        {m: m for m in data.modalities},
        {"kind": "checkpoint", "path": path},
    )


def _cross_student(data, cfg, teacher, spec: StudentSpec) -> Student:
    """The teacher with a new encoder + head for ``to`` that maps into ``from``'s space."""
    a, b = cfg.from_modality, cfg.to_modality
    if spec.checkpoint or spec.derive:
        raise BadInput(
            "with --from/--to, --student names the new encoder only",
            hint=f"for example --student {b}={encoder_name(train_encoder(b))}:width=16",
        )
    extra = sorted(set(spec.encoders) - {b})
    if extra:
        raise BadInput(
            f"--student {extra[0]}=...: with --to {b} only the {b} encoder is new",
            hint=f"drop it, or name --student {b}=...",
        )
    default = train_encoder(
        b, data.dataset.tables[b].row_shape if b in data.dataset.tables else None
    )
    enc = _named_encoder(b, spec.encoders.get(b) or default, data.dataset)
    config = ModelConfig.from_dict(copy.deepcopy(teacher.config.to_dict()))
    config.encoders[b] = enc
    probe = MultimodalModel(ModelConfig(encoders={b: enc}))
    out = teacher.out_dim(a)
    in_dim = probe.encoders[b].out_dim
    if cfg.head == "identity" and in_dim != out:
        raise BadInput(
            f"the teacher embeds {a} in {out} dims and the {b} encoder gives {in_dim}, and an "
            "identity head cannot map one to the other",
            hint="use --head linear (the default) or mlp",
        )
    config.heads[b] = head_spec(cfg.head, in_dim, out)
    fusion_mods = (config.fusion or {}).get("modalities") or list(teacher.modalities)
    if config.fusion and b in fusion_mods:
        log.info("note: the teacher's fusion module takes %s: the cross-modal student drops it", b)
        config.fusion, config.classifier, config.matcher = None, None, False
    config.inputs = {**config.inputs, b: data.dataset.spec(b)}
    config.extra = _extra(teacher, cfg)
    model = MultimodalModel(config)
    state = {
        k: v
        for k, v in teacher.state_dict().items()
        if not k.startswith((f"encoders.{b}.", f"heads.{b}."))
        and not (config.fusion is None and k.startswith(("fusion.", "classifier.", "matcher.")))
    }
    result = model.load_state_dict(state, strict=False)
    new = (f"encoders.{b}.", f"heads.{b}.")
    if result.unexpected_keys or any(not k.startswith(new) for k in result.missing_keys):
        raise BadInput("cannot copy the teacher into the cross-modal student", where=cfg.teacher)
    model.requires_grad_(False)
    model.encoders[b].requires_grad_(True)
    model.heads[b].requires_grad_(True)
    for m in teacher.modalities:
        if m != b:
            model.weights[m] = teacher.weights.get(m)
    frozen = [m for m in model.modalities if m != b]
    return Student(
        model,
        [b],
        frozen,
        {b: a},
        {"kind": "cross-modal", "from": a, "to": b, "encoders": {b: enc["name"]}},
    )
