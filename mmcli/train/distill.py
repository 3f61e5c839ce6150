"""``distill``: knowledge distillation from a teacher checkpoint into a smaller student, or
from one modality into another.

    from mmcli.train.distill import DistillConfig, distill
    report = distill(["out/tensors"], "runs/student",
                     DistillConfig(teacher="runs/teacher/model.safetensors",
                                   student=["derive:0.25"]),
                     LoopConfig(epochs=10))

The same recipe shape as ``fuse-train``: :func:`setup_data` (the splits and the pairs),
:func:`setup_student` (the student model: named encoders, derived from the teacher, or
another checkpoint; or, cross-modal, the teacher with a new encoder for one modality),
:class:`DistillTask` (the loss of a batch against the frozen teacher, the validation
metrics) and the shared loop :func:`mmcli.train.loop.fit`. At the end
:func:`final_report` compares teacher and student (parameters, encode throughput, the same
metrics on the held-out split, retention) and writes ``RUN/report.json``.

The student is an ordinary mmcli checkpoint: its heads map into the teacher's embedding
width, so it is a drop-in in the teacher's joint space (the cross-modal student contains
the teacher's other encoders too). The teacher is frozen (eval mode, no gradient) and is
no part of the training state: ``state.safetensors`` holds the student only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.multimodal import ModelConfig, MultimodalModel
from mmcli.train import objectives as obj
from mmcli.train.data import Batch, BatchSampler, Dataset
from mmcli.train.fuse import DEFAULT_ENCODERS, MAX_LOGIT_SCALE, PAIR_ORDER, Data, FuseConfig
from mmcli.train.parallel import gather, gather_with_grad

log = logging.getLogger("mmcli")

LOSSES = ("kd", "ce", "feature", "similarity", "contrastive", "relational")
#: what each loss needs: a pair of modalities, or the classifier head
PAIR_LOSSES = ("similarity", "contrastive")
CLASS_LOSSES = ("kd", "ce")
DEFAULT_LOSSES = {"similarity": 1.0, "contrastive": 1.0, "feature": 1.0}
CROSS_DEFAULT_LOSSES = {"feature": 1.0, "contrastive": 1.0}
HEADS = ("linear", "mlp", "identity")
DEFAULT_DERIVE = (0.5, 1.0)  # the student without --student: every encoder half as wide
CACHE_DIR = "teacher-cache"
REPORT_FILE = "report.json"


# -------------------------------------------------------------------- configs


@dataclass
class StudentSpec:
    """What ``--student`` asked for (see :func:`parse_student`)."""

    encoders: dict[str, str] = field(default_factory=dict)  # modality -> encoder spec
    derive: tuple[float, float] | None = None  # (width factor, depth factor)
    checkpoint: str | None = None


@dataclass
class DistillConfig:
    teacher: str
    student: list[str] = field(default_factory=list)  # --student values, parsed by parse_student
    losses: dict[str, float] | None = (
        None  # None: DEFAULT_LOSSES (CROSS_DEFAULT_LOSSES with --from)
    )
    temperature: float = 1.0
    feature_loss: str = "cosine"  # cosine | mse
    projector: bool = True  # allow a learned projector when student and teacher widths differ
    head: str = "linear"  # the student's new heads: linear | mlp | identity
    pairs: list[tuple[str, str]] | None = None  # None: every pair teacher and data share
    from_modality: str | None = None  # cross-modal: the teacher's modality A ...
    to_modality: str | None = None  # ... that the student's new encoder for B learns to match
    cache_teacher: bool = False
    captions_per_item: int = 1
    train_split: str = "train"
    val_split: str | None = None  # None: "val" when the data has it
    test_split: str | None = None  # the final report's split; None: "test", else the val data
    eval_batch_size: int = 256
    throughput_batch_size: int = 256
    throughput_rows: int = 4096  # at most this many rows per modality are timed
    throughput_repeats: int = 3

    def __post_init__(self) -> None:
        cross = self.from_modality is not None or self.to_modality is not None
        if self.losses is None:
            self.losses = dict(CROSS_DEFAULT_LOSSES if cross else DEFAULT_LOSSES)
        unknown = sorted(set(self.losses) - set(LOSSES))
        if unknown:
            raise BadInput(
                f"unknown loss {unknown[0]!r}", hint=f"known losses: {', '.join(LOSSES)}"
            )
        if any(w < 0 for w in self.losses.values()):
            raise BadInput("loss weights must be >= 0")
        if not any(w > 0 for w in self.losses.values()):
            raise BadInput("every loss has weight 0", hint="give one a positive weight")
        self.losses = {k: w for k, w in self.losses.items() if w > 0}
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise BadInput(
                f"--temperature must be positive, got {self.temperature}",
                hint="1 uses the teacher's own logits; 2-4 softens them",
            )
        if self.feature_loss not in ("cosine", "mse"):
            raise BadInput(f"unknown feature loss {self.feature_loss!r}", hint="use cosine or mse")
        if self.head not in HEADS:
            raise BadInput(f"unknown head {self.head!r}", hint=f"use one of {', '.join(HEADS)}")
        if cross:
            if self.from_modality is None or self.to_modality is None:
                raise BadInput("cross-modal distillation needs both --from and --to")
            if self.from_modality == self.to_modality:
                raise BadInput(
                    f"--from and --to are both {self.from_modality}",
                    hint="drop them for same-modality distillation",
                )
            bad = sorted(set(self.losses) & set(CLASS_LOSSES))
            if bad:
                raise BadInput(
                    f"the {bad[0]} loss distils a classification head, not one modality into another",
                    hint="with --from/--to use feature, similarity, contrastive or relational",
                )
            if self.pairs:
                raise BadInput("--pairs does not apply with --from/--to (the pair is FROM-TO)")

    @property
    def cross(self) -> bool:
        return self.from_modality is not None


def parse_losses(text: str | None) -> dict[str, float] | None:
    """``similarity=1,feature=0.5,kd`` -> {name: weight} (a bare name weighs 1)."""
    if text is None or not text.strip():
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in LOSSES:
            raise BadInput(f"unknown loss {name!r}", hint=f"known losses: {', '.join(LOSSES)}")
        try:
            out[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise BadInput(
                f"bad loss weight in {part!r}", hint="for example similarity=1,feature=0.5"
            ) from None
    return out


def parse_student(values: list[str] | None) -> StudentSpec:
    """``--student`` values: ``MODALITY=ENCODER[:k=v,...]`` (repeatable), ``derive[:F]`` /
    ``derive:width=F,depth=G`` (every teacher encoder, narrower / shallower), or the path of
    a student checkpoint. Named encoders override derived ones."""
    spec = StudentSpec()
    for value in values or []:
        value = value.strip()
        if not value:
            continue
        head, _, rest = value.partition(":")
        if head == "derive":
            spec.derive = _parse_derive(rest)
        elif value.endswith(".safetensors") or ("=" not in head and Path(value).is_file()):
            if spec.checkpoint:
                raise BadInput("--student names two checkpoints", hint="pass one")
            spec.checkpoint = value
        elif "=" in head:
            modality, _, enc = value.partition("=")
            modality, enc = modality.strip(), enc.strip()
            if not modality or not enc:
                raise BadInput(
                    f"bad --student {value!r}", hint="for example image=convnet:width=16"
                )
            spec.encoders[modality] = enc
        else:
            raise BadInput(
                f"bad --student {value!r}",
                hint="use MODALITY=ENCODER (image=convnet:width=16), derive:0.25, or a checkpoint path",
            )
    if spec.checkpoint and (spec.derive or spec.encoders):
        raise BadInput("--student is a checkpoint, so it cannot also be derived or named")
    return spec


def _parse_derive(rest: str) -> tuple[float, float]:
    width, depth = DEFAULT_DERIVE
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, val = part.partition("=")
        if not eq:
            key, val = "width", key
        try:
            number = float(val)
        except ValueError:
            raise BadInput(
                f"bad --student derive option {part!r}",
                hint="for example derive:width=0.25,depth=0.5",
            ) from None
        if key.strip() == "width":
            width = number
        elif key.strip() == "depth":
            depth = number
        else:
            raise BadInput(f"unknown derive option {key!r}", hint="use width=F and depth=G")
    if not (0 < width <= 1 and 0 < depth <= 1):
        raise BadInput("derive factors must be in (0, 1]", hint="for example derive:0.25")
    return width, depth


# -------------------------------------------------------------------- teacher


def load_teacher(path: str, device: torch.device) -> MultimodalModel:
    teacher = MultimodalModel.from_checkpoint(path, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_scale(teacher: MultimodalModel) -> float:
    """The teacher's logit scale (1 / its learned temperature; 1/0.07 without one)."""
    if teacher.logit_scale is None:
        return 1 / 0.07
    return float(teacher.logit_scale.detach().exp())


# ----------------------------------------------------------------------- data


@dataclass
class DistillData(Data):
    """fuse-train's :class:`Data` plus what distill needs: the pairs evaluated (the trained
    ones, and for cross-modal every pair of the new modality with the teacher's others)
    and the final report's items."""

    eval_pairs: list[tuple[str, str]] = field(default_factory=list)
    test_dataset: Dataset | None = None
    test: np.ndarray | None = None
    test_split: str | None = None


def _ordered(a: str, b: str) -> tuple[str, str]:
    return (b, a) if (b, a) in PAIR_ORDER else (a, b)


def setup_data(
    sources: list[str], val_sources: list[str] | None, cfg: DistillConfig, teacher: MultimodalModel
) -> DistillData:
    from mmcli.train.data import load_dataset
    from mmcli.train.fuse import setup_data as fuse_setup_data

    has = teacher.modalities
    spec = parse_student(cfg.student)
    loaded = load_dataset(sources)
    present = loaded.modalities
    for ts in loaded.sources:  # raw rows for an end-to-end teacher, features for the other
        for m in ts.tables:
            if m in has:
                teacher.check_input(ts, m)
    if cfg.cross:
        a, b = cfg.from_modality, cfg.to_modality
        if a not in has:
            raise BadInput(
                f"--from {a}: the teacher has no {a} encoder", hint=f"it has: {', '.join(has)}"
            )
        for flag, m in (("--from", a), ("--to", b)):
            if m not in present:
                raise BadInput(
                    f"{flag} {m}: the data has no {m}", hint=f"the data has: {', '.join(present)}"
                )
        pairs = [(a, b)]
        others = [m for m in has if m not in (a, b) and m in present]
        eval_pairs = [_ordered(a, b)] + [_ordered(b, m) for m in others]
        eval_pairs += [p for p in PAIR_ORDER if p[0] in others and p[1] in others]
    else:
        for m in spec.encoders:
            if m not in has:
                raise BadInput(
                    f"--student {m}=...: the teacher has no {m} encoder to distil from",
                    hint=f"it has: {', '.join(has)}; to teach a new modality use --from M --to {m}",
                )
        if cfg.pairs is not None:
            for p in cfg.pairs:
                for m in p:
                    if m not in has:
                        raise BadInput(f"--pairs {p[0]}-{p[1]}: the teacher has no {m} encoder")
            pairs = cfg.pairs
        else:
            pairs = [p for p in PAIR_ORDER if p[0] in has and p[1] in has]
            pairs = [p for p in pairs if p[0] in present and p[1] in present]
        eval_pairs = list(pairs)
        need_pair = sorted(set(cfg.losses) & set(PAIR_LOSSES))
        if need_pair and not pairs:
            raise BadInput(
                f"the {need_pair[0]} loss needs two modalities that teacher and data share",
                hint=f"teacher: {', '.join(has)}; data: {', '.join(present)}",
            )
    objectives = {"classify": 1.0} if set(cfg.losses) & set(CLASS_LOSSES) else {"contrastive": 1.0}
    fcfg = FuseConfig(
        pairs=pairs or None,
        objectives=objectives,
        captions_per_item=cfg.captions_per_item,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
    )
    base = fuse_setup_data(sources, val_sources, fcfg)
    if not pairs:  # one modality (kd / feature / relational only): those the teacher has
        base.modalities = [m for m in base.modalities if m in has]
        if not base.modalities:
            raise BadInput(
                f"the teacher encodes {', '.join(has)} and the data has {', '.join(present)}: "
                "nothing in common"
            )
    ds = base.dataset
    train = base.train
    if cfg.cross:  # only items with both modalities teach anything
        both = ds.has(cfg.from_modality, train) & ds.has(cfg.to_modality, train)
        train = train[both]
        if len(train) == 0:
            raise BadInput(f"no training item has both {cfg.from_modality} and {cfg.to_modality}")
    # the final report's items: the test split, else the validation data
    test_ds, test = base.val_dataset, base.val
    test_split = "--val" if val_sources else (cfg.val_split or "val")
    if any(s is not None for s in ds.splits):
        items = ds.subset(cfg.test_split or "test")
        if len(items):
            test_ds, test, test_split = ds, items, cfg.test_split or "test"
        elif cfg.test_split is not None:
            raise BadInput(f"the {cfg.test_split!r} split is empty", hint="check --test-split")
    elif cfg.test_split is not None:
        raise BadInput(f"--test-split {cfg.test_split}: the items have no splits")
    modalities = base.modalities
    if cfg.cross:
        modalities = [cfg.from_modality, cfg.to_modality]
    return DistillData(
        dataset=ds,
        train=train,
        val_dataset=base.val_dataset,
        val=base.val,
        pairs=pairs,
        modalities=modalities,
        eval_pairs=eval_pairs,
        test_dataset=test_ds,
        test=test,
        test_split=test_split if test is not None else None,
    )


# -------------------------------------------------------------------- student


def derive_encoder(modality: str, enc: dict[str, Any], width: float, depth: float) -> dict:
    """A narrower / shallower copy of an encoder spec ``{"name", "config"}``: integer
    ``width`` and ``dim`` options times ``width`` (a transformer's width stays a multiple of
    its heads), ``depth`` times ``depth`` (at least 1). Parameter-free encoders (features)
    are kept."""
    from mmcli.models.registry import make_config

    name, config = enc["name"], dict(enc.get("config", {}))
    if name == "features":
        return {"name": name, "config": config}
    scalable = [k for k in ("width", "dim", "depth") if isinstance(config.get(k), int)]
    if not scalable:
        raise BadInput(
            f"cannot derive a smaller {modality}/{name}: it has no width or depth option",
            hint=f"name the student's encoder, e.g. --student {modality}="
            + {"image": "convnet:width=16", "text": "transformer:width=64,depth=1"}.get(
                modality, f"{DEFAULT_ENCODERS.get(modality, 'tiny')}:width=16"
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
    from mmcli.models.registry import config_to_dict

    return {"name": name, "config": config_to_dict(make_config(name, modality, **config))}


def _named_encoder(modality: str, spec: str, ds: Dataset | None) -> dict:
    from mmcli.models.multimodal import encoder_overrides_from_input
    from mmcli.models.registry import config_to_dict, make_config, parse_encoder_spec

    name, overrides = parse_encoder_spec(spec, modality=modality)
    if ds is not None and modality in ds.tables:
        overrides = encoder_overrides_from_input(modality, name, overrides, ds.spec(modality))
    cfg = make_config(name, modality, **overrides)
    return {"name": type(cfg).encoder_name, "config": config_to_dict(cfg)}


def _head(kind: str, in_dim: int, out_dim: int) -> dict:
    if kind == "identity":
        return {"kind": "identity", "in_dim": in_dim, "out_dim": in_dim}
    spec: dict[str, Any] = {"kind": kind, "in_dim": in_dim, "out_dim": out_dim}
    if kind == "mlp":
        spec["hidden"] = max(in_dim, out_dim)
    return spec


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
        heads[m] = _head(cfg.head, probe.encoders[m].out_dim, out)
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
        from mmcli.train.fuse import _token_counts

        fusion["max_tokens"] = _token_counts(probe, ds, fusion["modalities"])
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
    if not set(cfg.losses) & set(CLASS_LOSSES):
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
    if set(cfg.losses) & set(CLASS_LOSSES) and model.classifier is None:
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
            hint=f"for example --student {b}={DEFAULT_ENCODERS.get(b, 'tiny')}:width=16",
        )
    extra = sorted(set(spec.encoders) - {b})
    if extra:
        raise BadInput(
            f"--student {extra[0]}=...: with --to {b} only the {b} encoder is new",
            hint=f"drop it, or name --student {b}=...",
        )
    enc = _named_encoder(b, spec.encoders.get(b, DEFAULT_ENCODERS.get(b, "tiny")), data.dataset)
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
    config.heads[b] = _head(cfg.head, in_dim, out)
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


def submodel(model: MultimodalModel, modalities: list[str]) -> MultimodalModel:
    """The encoders + heads of ``modalities`` of ``model`` as a model of their own (sharing
    no storage), e.g. to extract or time one modality."""
    c = model.config
    config = ModelConfig(
        encoders={m: copy.deepcopy(c.encoders[m]) for m in modalities},
        heads={m: copy.deepcopy(c.heads[m]) for m in modalities if m in c.heads},
        embed_dim=c.embed_dim,
        inputs={m: c.inputs[m] for m in modalities if m in c.inputs},
        extra={k: v for k, v in c.extra.items() if k == "features"},
    )
    sub = MultimodalModel(config)
    prefixes = tuple(f"{part}.{m}." for m in modalities for part in ("encoders", "heads"))
    sub.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)})
    sub.weights.update({m: model.weights.get(m) for m in modalities})
    sub.checkpoint = model.checkpoint
    param = next(model.parameters(), None)
    return sub.to(param.device if param is not None else "cpu").eval()


# ----------------------------------------------------------------------- cache


class CachedTeacherSampler(BatchSampler):
    """Batches that carry the teacher's cached outputs for exactly the rows sampled: the
    cache is one row per dataset row, read by ``Batch.rows`` into ``data["teacher.M"]``
    (on the sampler's background thread)."""

    def __init__(self, *args, cache: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def make_batch(self, epoch: int, step: int) -> Batch:
        batch = super().make_batch(epoch, step)
        for m, table in self.cache.items():
            rows = batch.rows[m].numpy()
            ok = rows >= 0
            out = torch.zeros(len(rows), table.row_shape[0], dtype=torch.float32)
            if ok.any():
                out[torch.from_numpy(ok)] = table.fetch(rows[ok]).float()
            batch.data[f"teacher.{m}"] = out
        return batch


def build_teacher_cache(
    teacher: MultimodalModel,
    modalities: list[str],
    sources: list[str],
    ds: Dataset,
    folder: Path,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    progress=None,
) -> dict[str, Any]:
    """The teacher's outputs (projected, not normalized, float32) for every row of ``sources``,
    written once by :func:`mmcli.extract.extract` into ``folder`` (kept between resumes), and
    checked to line up row for row with the training dataset."""
    from mmcli.extract import extract
    from mmcli.progress import null_progress
    from mmcli.train.data import load_dataset

    sub = submodel(teacher, modalities)
    try:
        summary = extract(
            sources,
            folder,
            model=sub,
            device=str(device),
            precision=precision,
            batch_size=batch_size,
            dtype="float32",
            normalize=False,
            resume=True,
            progress=progress or null_progress,
        )
    except BadInput as e:
        raise BadInput(f"--cache-teacher: {e}") from None
    cached = load_dataset([str(folder)], modalities=modalities, in_memory=False)  # memory-mapped
    for m in modalities:
        same = cached.ids == ds.ids and all(
            np.array_equal(x, y) for x, y in zip(cached.rows_of[m], ds.rows_of[m])
        )
        if not same:
            raise BadInput(
                "--cache-teacher: the cached rows do not line up with the training data",
                where=str(folder),
                hint="pass DATA as one set of tensor shards, or drop --cache-teacher",
            )
    log.info(
        "teacher cache: %s rows in %s (%.1f s)",
        "+".join(str(v) for v in summary["rows"].values()) or "all",
        folder,
        summary["seconds"],
    )
    return {m: cached.tables[m] for m in modalities}


# ------------------------------------------------------------------------ task


class DistillTask(nn.Module):
    """The distillation loss of a batch (student vs the frozen teacher), validation, saving.

    The teacher is held outside the module tree (not in ``state_dict``, not wrapped by DDP,
    never trained) but moves with it (``.to(device)``).
    """

    def __init__(
        self,
        student: Student,
        teacher: MultimodalModel,
        cfg: DistillConfig,
        data: DistillData,
        *,
        cached: bool = False,
    ):
        super().__init__()
        self.student = student.model
        self.trained = list(student.trained)
        self.frozen = list(student.frozen)
        self.targets = dict(student.targets)
        self.cfg = cfg
        self.data = data
        self.cached = cached
        self._teacher = [teacher]
        self.scale_t = teacher_scale(teacher)
        # the teacher's outputs a batch needs: what each student modality learns from, and
        # the frozen copies' (whose outputs are the teacher's)
        wanted = set(self.targets.values()) | (set(self.frozen) & set(data.modalities))
        self.teacher_mods = [m for m in data.modalities if m in wanted]
        # a learned linear projector per modality whose student width is not the teacher's
        # (only a checkpoint student or identity heads; named / derived students' heads map
        # into the teacher's width themselves). Trained, resumed, never saved with the student.
        self.projector = nn.ModuleDict()
        for m in self.trained:
            s_dim, t_dim = self.student.out_dim(m), teacher.out_dim(self.targets[m])
            if s_dim != t_dim:
                self.projector[m] = nn.Linear(s_dim, t_dim, bias=False)
        w = cfg.losses
        self.need_tokens = bool(set(w) & set(CLASS_LOSSES)) and (
            self.student.fusion_kind == "attention" or teacher.fusion_kind == "attention"
        )
        if cached and "kd" in w and teacher.fusion_kind == "attention":
            raise BadInput(
                "--cache-teacher stores one embedding per row, and kd through the teacher's "
                "attention fusion needs its tokens",
                hint="drop --cache-teacher (or the kd loss)",
            )

    @property
    def teacher(self) -> MultimodalModel:
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        for m in self.frozen:  # frozen copies keep their batch-norm statistics
            self.student.encoders[m].eval()
        if self.cfg.cross:
            for name, module in self.student.named_children():
                if name not in ("encoders", "heads"):
                    module.eval()
        return self

    # -- outputs ------------------------------------------------------------------
    def _teacher_outputs(self, batch: Batch, modalities: list[str]):
        """{m: raw projected embedding [K*B, D]}, {m: (tokens, mask)} (when fusion needs them)."""
        raw, toks = {}, {}
        t = self.teacher
        with torch.no_grad():
            for m in modalities:
                key = f"teacher.{m}"
                if key in batch.data:
                    raw[m] = batch.data[key].float()
                    continue
                x = batch.data[m]
                if self.need_tokens:
                    pooled, tok, mask = t.encoders[m].forward_tokens(x)
                    toks[m] = (tok[: len(batch)], mask[: len(batch)] & batch.present[m][:, None])
                else:
                    pooled = t.encoders[m](x)
                raw[m] = (t.heads[m](pooled) if m in t.heads else pooled).float()
        return raw, toks

    def _student_outputs(self, batch: Batch, t_raw: dict, t_toks: dict):
        raw, toks = {}, {}
        s = self.student
        for m in self.trained:
            x = batch.data[m]
            if self.need_tokens:
                pooled, tok, mask = s.encoders[m].forward_tokens(x)
                toks[m] = (tok[: len(batch)], mask[: len(batch)] & batch.present[m][:, None])
            else:
                pooled = s.encoders[m](x)
            raw[m] = s.heads[m](pooled).float()
        for m in self.frozen:  # the teacher's own encoder: its outputs are the teacher's
            if m in t_raw:
                raw[m] = t_raw[m]
                if m in t_toks:
                    toks[m] = t_toks[m]
        return raw, toks

    def _rows(self, batch: Batch, x: torch.Tensor, m: str, grad: bool = True):
        """(rows of ``x`` whose item has ``m``, their item ids), gathered over ranks."""
        k = x.shape[0] // len(batch)
        items = batch.items.repeat(k)
        present = batch.present[m].repeat(k)
        x = gather_with_grad(x) if grad else gather(x.contiguous())
        return x[gather(present)], gather(items)[gather(present)]

    @staticmethod
    def _aligned(t: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
        """The teacher's rows lined up with the student's (cross-modal: one image per item
        against K captions, or the first caption against one audio clip)."""
        if t.shape[0] == s.shape[0]:
            return t
        return t[:b].repeat(s.shape[0] // b, 1)

    def _in_teacher_space(self, m: str, raw: torch.Tensor) -> torch.Tensor:
        return self.projector[m](raw) if m in self.projector else raw

    # -- the loss -----------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.cfg.losses
        t_raw, t_toks = self._teacher_outputs(batch, self.teacher_mods)
        s_raw, s_toks = self._student_outputs(batch, t_raw, t_toks)
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}

        # per modality: feature and relational, each student modality vs its teacher target
        feats, rels = [], []
        for m in self.trained:
            t_m = self._aligned(t_raw[self.targets[m]], s_raw[m], len(batch))
            present = batch.present[m].repeat(s_raw[m].shape[0] // len(batch))
            if "feature" in w and present.any():
                s_m = self._in_teacher_space(m, s_raw[m])[present]
                feats.append(obj.feature_loss(s_m, t_m[present], self.cfg.feature_loss))
            if "relational" in w:
                s_all, _ = self._rows(batch, F.normalize(s_raw[m], dim=-1), m)
                t_all, _ = self._rows(batch, F.normalize(t_m, dim=-1), m, grad=False)
                rels.append(obj.relational_loss(s_all, t_all))
        if feats:
            losses["feature"] = torch.stack(feats).mean()
        if rels:
            losses["relational"] = torch.stack(rels).mean()

        # per pair: similarity distributions and contrastive (own + interactive)
        sim_t = self.cfg.temperature / self.scale_t  # on cosines: the teacher's logits / T
        scale = (
            self.student.logit_scale.exp() if self.student.logit_scale is not None else self.scale_t
        )
        sims, own, inter = [], [], []
        if set(w) & set(PAIR_LOSSES):
            if self.cfg.cross:
                a, b = self.cfg.from_modality, self.cfg.to_modality
                t_a = self._aligned(t_raw[a], s_raw[b], len(batch))
                s_b, ib = self._rows(batch, F.normalize(s_raw[b], dim=-1), b)
                t_a, ia = self._rows(batch, F.normalize(t_a, dim=-1), b, grad=False)
                # the student's B rows stand in for the teacher's A rows (its head maps B
                # into A's space): against the teacher's A rows of the other items
                if "similarity" in w:
                    sims.append(obj.similarity_loss(s_b, t_a, t_a, t_a, sim_t))
                if "contrastive" in w:
                    inter.append(obj.contrastive_loss(s_b, t_a, ib, ia, self.scale_t))
            else:
                for a, b in self.data.pairs:
                    s_a, ia = self._rows(batch, F.normalize(s_raw[a], dim=-1), a)
                    s_b, ib = self._rows(batch, F.normalize(s_raw[b], dim=-1), b)
                    t_a, _ = self._rows(batch, F.normalize(t_raw[a], dim=-1), a, grad=False)
                    t_b, _ = self._rows(batch, F.normalize(t_raw[b], dim=-1), b, grad=False)
                    if "similarity" in w:
                        sims.append(obj.similarity_loss(s_a, s_b, t_a, t_b, sim_t))
                    if "contrastive" in w:
                        own.append(obj.contrastive_loss(s_a, s_b, ia, ib, scale))
                        p_a = self._projected_rows(batch, s_raw, a, s_a)
                        p_b = self._projected_rows(batch, s_raw, b, s_b)
                        inter.append(
                            obj.interactive_contrastive_loss(p_a, p_b, t_a, t_b, ia, ib, scale)
                        )
        if sims:
            losses["similarity"] = torch.stack(sims).mean()
        if own or inter:
            parts = [torch.stack(x).mean() for x in (own, inter) if x]
            losses["contrastive"] = torch.stack(parts).mean()
            if own:
                logs["contrastive/own"] = float(parts[0].detach())
            logs["contrastive/interactive"] = float(parts[-1].detach())

        # the classifier: Hinton kd on the fused embedding's logits, and/or cross-entropy
        if set(w) & set(CLASS_LOSSES):
            b = len(batch)
            s_first = {m: F.normalize(e[:b], dim=-1) for m, e in s_raw.items()}
            s_logits = self.student.classifier(
                self.student.fuse_parts(s_toks, s_first, batch.present)[0]
            )
            if "kd" in w:
                with torch.no_grad():
                    t_first = {m: F.normalize(t_raw[m][:b], dim=-1) for m in s_first}
                    fused = self.teacher.fuse_parts(t_toks, t_first, batch.present)[0]
                    t_logits = self.teacher.classifier(fused)
                losses["kd"] = obj.kd_loss(s_logits, t_logits, self.cfg.temperature)
            if "ce" in w:
                losses["ce"] = obj.classify_loss(s_logits, batch.labels)

        total = combine(losses, w)
        logs = {
            "loss": float(total.detach()),
            **{k: float(v.detach()) for k, v in losses.items()},
            **logs,
        }
        if self.student.logit_scale is not None and self.student.logit_scale.requires_grad:
            logs["logit_scale"] = float(self.student.logit_scale.detach().exp())
        return total, logs

    def _projected_rows(self, batch, s_raw, m, rows):
        if m not in self.projector:
            return rows
        return self._rows(batch, F.normalize(self.projector[m](s_raw[m]), dim=-1), m)[0]

    def after_step(self) -> None:
        p = self.student.logit_scale
        if p is not None and p.requires_grad:
            with torch.no_grad():
                p.clamp_(0, MAX_LOGIT_SCALE)

    # -- loop hooks -----------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        from mmcli.train.loop import decay_groups

        named = list(self.student.named_parameters()) + list(self.projector.named_parameters())
        return decay_groups(named, weight_decay)

    def save_model(self, path, **meta) -> None:
        self.student.to_checkpoint(path, **meta)

    def metric_names(self) -> list[str] | None:
        """The validation metrics this task can report (None: it does not validate)."""
        if self.data.val_dataset is None or self.data.val is None:
            return None
        from mmcli.train.evaluation import metric_names

        return metric_names(self.data.eval_pairs, self.student.classifier is not None)

    def evaluate(self) -> dict[str, float]:
        if self.data.val_dataset is None or self.data.val is None:
            return {}
        from mmcli.train.evaluation import evaluate_model

        return evaluate_model(
            self.student,
            self.data.val_dataset,
            self.data.val,
            self.data.eval_pairs,
            batch_size=self.cfg.eval_batch_size,
        )


def combine(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the losses computed (``kd=0.9,ce=0.1`` is Hinton's mix)."""
    if not losses:
        raise BadInput(
            "none of the chosen losses applies to this data",
            hint=f"chosen: {', '.join(weights)}",
        )
    return sum(weights[k] * v for k, v in losses.items())


# ----------------------------------------------------------------------- run


def distill(
    sources: list[str],
    run_dir: str,
    cfg: DistillConfig,
    loop,
    *,
    val_sources: list[str] | None = None,
    batch_size: int = 128,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into a student trained on ``sources``; returns the report
    (also written to ``RUN/report.json``; only by the main process under torchrun, the
    others return the training summary)."""
    from mmcli.formats.atomic import atomic_open
    from mmcli.formats.manifest import file_sha256
    from mmcli.progress import null_progress
    from mmcli.runtime import barrier
    from mmcli.train.loop import fit, training_run
    from mmcli.train.state import BEST_FILE, RUN_FILE

    if not Path(cfg.teacher).is_file():
        raise BadInput("teacher checkpoint not found", where=cfg.teacher, hint="check --teacher")
    sha = file_sha256(cfg.teacher)
    train_args = args or {"distill": asdict(cfg), "loop": asdict(loop), "batch_size": batch_size}
    train_args = {**train_args, "teacher_sha256": sha}
    with training_run(
        run_dir,
        command="distill",
        args=train_args,
        loop=loop,
        device=device,
        resume=resume,
        overwrite=overwrite,
    ) as (dev, dist, run):
        if resume:
            old = json.loads(run.file(RUN_FILE).read_text()) if run.file(RUN_FILE).exists() else {}
            was = old.get("args", {}).get("teacher_sha256")
            if was and was != sha:
                raise BadInput(
                    "the teacher checkpoint changed since this run started",
                    where=cfg.teacher,
                    hint="resume with the same teacher, or start a new run",
                )
        teacher = load_teacher(cfg.teacher, dev)
        data = setup_data(sources, val_sources, cfg, teacher)
        student = setup_student(data, cfg, teacher)
        if loop.best_metric is None and data.val is not None:
            if data.eval_pairs:
                a, b = data.eval_pairs[0]
                loop.best_metric = f"{a}-{b}/mean_recall@1"
            elif student.model.classifier is not None:
                loop.best_metric = "acc1"
        sampler_args = dict(
            seed=loop.seed,
            rank=dist.rank,
            world=dist.world_size,
            captions_per_item=cfg.captions_per_item,
            modalities=data.modalities,
        )
        # validates the batch size before anything is written
        sampler = BatchSampler(data.dataset, data.train, batch_size, **sampler_args)
        task = DistillTask(student, teacher, cfg, data, cached=cfg.cache_teacher)
        if cfg.cache_teacher:
            run.create()
            folder = run.file(CACHE_DIR)
            if overwrite and not resume and dist.is_main and folder.exists():
                shutil.rmtree(folder)
            barrier()
            cache = build_teacher_cache(
                teacher,
                task.teacher_mods,
                sources,
                data.dataset,
                folder,
                device=dev,
                precision=loop.precision,
                batch_size=cfg.eval_batch_size,
                progress=progress,
            )
            sampler = CachedTeacherSampler(
                data.dataset, data.train, batch_size, cache=cache, **sampler_args
            )
        n_teacher = sum(p.numel() for p in teacher.parameters())
        n_student = sum(p.numel() for p in student.model.parameters())
        log.info(
            "distill: %d train items, %s val items, %s, teacher %s params -> student %s "
            "(%s trained; %.1f%%), losses %s, device %s",
            len(data.train),
            len(data.val) if data.val is not None else 0,
            f"{cfg.from_modality} -> {cfg.to_modality}"
            if cfg.cross
            else "pairs " + (",".join(f"{a}-{b}" for a, b in data.pairs) or "none"),
            f"{n_teacher:,}",
            f"{n_student:,}",
            f"{sum(p.numel() for p in student.model.parameters() if p.requires_grad):,}",
            100 * n_student / max(1, n_teacher),
            ",".join(f"{k}={v:g}" for k, v in cfg.losses.items()),
            dev,
        )
        summary = fit(
            task,
            sampler,
            loop,
            run,
            device=dev,
            resume=resume,
            progress=progress or null_progress,
            train_args=train_args,
        )
    if not dist.is_main:
        return summary
    from mmcli.train.distill_report import final_report

    log.info("distill: comparing teacher and student on the %s split", data.test_split or "(none)")
    report = final_report(
        teacher,
        run.file(BEST_FILE),
        student,
        data,
        cfg,
        device=dev,
        precision=loop.precision,
        summary=summary,
    )
    with atomic_open(run.file(REPORT_FILE)) as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")
    return report


__all__ = [
    "LOSSES",
    "DistillConfig",
    "DistillTask",
    "combine",
    "derive_encoder",
    "distill",
    "parse_losses",
    "parse_student",
    "setup_data",
    "setup_student",
]
