"""distill's configuration: losses, the student asked for, cross-modal direction, splits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mmcli.errors import BadInput
from mmcli.train.task import parse_weights

LOSSES = ("kd", "ce", "feature", "similarity", "contrastive", "relational")
#: what each loss needs: a pair of modalities, or the classifier head
PAIR_LOSSES = ("similarity", "contrastive")
CLASS_LOSSES = ("kd", "ce")
DEFAULT_LOSSES = {"similarity": 1.0, "contrastive": 1.0, "feature": 1.0}
CROSS_DEFAULT_LOSSES = {"feature": 1.0, "contrastive": 1.0}
HEADS = ("linear", "mlp", "identity")
DEFAULT_DERIVE = (0.5, 1.0)  # the student without --student: every encoder half as wide
CACHE_DIR = "teacher-cache"


@dataclass
class StudentSpec:
    """What ``--student`` asked for (see :func:`parse_student`)."""

    encoders: dict[str, str] = field(default_factory=dict)  # modality -> encoder spec
    derive: tuple[float, float] | None = None  # (width factor, depth factor)
    checkpoint: str | None = None


@dataclass
class DistillConfig:
    teacher: str  # an mmcli checkpoint, open_clip:ARCH or hf:DIR (a whole pretrained model)
    teacher_weights: str | None = None  # --weights: the weights file of open_clip:ARCH
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
    augment: bool = False  # random crops and flips of encoded images, teacher and student alike
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
        if self.augment and self.cache_teacher:
            raise BadInput(
                "--augment with --cache-teacher: the teacher's outputs are computed once, "
                "on the images as they are",
                hint="drop one of them",
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

    @property
    def classifies(self) -> bool:
        """kd / ce: the student's classification head is distilled or trained."""
        return bool(set(self.losses) & set(CLASS_LOSSES))


def parse_losses(text: str | None) -> dict[str, float] | None:
    """``similarity=1,feature=0.5,kd`` -> {name: weight} (a bare name weighs 1)."""
    return parse_weights(text, known=LOSSES, what="loss", example="similarity=1,feature=0.5")


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
