"""``distill``: knowledge distillation from a teacher checkpoint into a smaller student, or
from one modality into another.

    from mmcli.train.distill import DistillConfig, distill
    report = distill(["out/tensors"], "runs/student",
                     DistillConfig(teacher="runs/teacher/model.safetensors",
                                   student=["derive:0.25"]),
                     LoopConfig(epochs=10))

The recipe in small steps (the same shape as ``fuse-train``): :func:`setup_data` (the
splits and the pairs teacher and data share), :func:`setup_student` (named encoders,
derived from the teacher, another checkpoint; or, cross-modal, the teacher with a new
encoder for one modality), :class:`DistillTask` (the loss of a batch against the frozen
teacher), the shared loop, and at the end :func:`final_report` (parameters, encode
throughput, the same held-out metrics and retention; ``RUN/report.json``).

The student is an ordinary mmcli checkpoint: its heads map into the teacher's embedding
width, so it is a drop-in in the teacher's joint space (the cross-modal student contains
the teacher's other encoders too). The teacher is frozen (eval mode, no gradient) and is
no part of the training state: ``state.safetensors`` holds the student only.
"""

from mmcli.train.distill.config import (
    CLASS_LOSSES,
    CROSS_DEFAULT_LOSSES,
    DEFAULT_LOSSES,
    LOSSES,
    PAIR_LOSSES,
    DistillConfig,
    StudentSpec,
    parse_losses,
    parse_student,
)
from mmcli.train.distill.data import DistillData, setup_data
from mmcli.train.distill.recipe import DistillRecipe, distill
from mmcli.train.distill.report import count_parameters, encode_throughput, final_report
from mmcli.train.distill.students import Student, derive_encoder, setup_student
from mmcli.train.distill.task import DistillTask, combine
from mmcli.train.distill.teacher import load_teacher, submodel, teacher_scale

__all__ = [
    "CLASS_LOSSES",
    "CROSS_DEFAULT_LOSSES",
    "DEFAULT_LOSSES",
    "LOSSES",
    "PAIR_LOSSES",
    "DistillConfig",
    "DistillData",
    "DistillRecipe",
    "DistillTask",
    "Student",
    "StudentSpec",
    "combine",
    "count_parameters",
    "derive_encoder",
    "distill",
    "encode_throughput",
    "final_report",
    "load_teacher",
    "parse_losses",
    "parse_student",
    "setup_data",
    "setup_student",
    "submodel",
    "teacher_scale",
]
