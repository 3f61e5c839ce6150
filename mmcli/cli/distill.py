from __future__ import annotations

from typing import Annotated

import typer

from mmcli.cli.common import (
    AccumSteps,
    BatchSize,
    BestMetric,
    Debug,
    DecodeWorkers,
    Device,
    EarlyStop,
    Epochs,
    GradCheckpointing,
    GradClip,
    LearningRate,
    LogEvery,
    MaxSteps,
    OverwriteRun,
    Precision,
    Quiet,
    ResumeRun,
    SaveEvery,
    Seed,
    TrainSplit,
    Val,
    ValSplit,
    Warmup,
    WeightDecay,
    command,
    loop_config,
)

_DISTILL = "Distillation"
_RUN = "Run"


def distill(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Training data: tensor shards (or the feature files the teacher was trained on)."
        ),
    ],
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            help="The teacher: an mmcli model checkpoint, or a whole pretrained CLIP / SigLIP: "
            "open_clip:ARCH (with --weights FILE) or hf:DIR (a save_pretrained folder).",
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Run folder: the student checkpoint, report.json, metrics, state."
        ),
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help="The weights file of --teacher open_clip:ARCH (safetensors, or .bin/.pt/.pth).",
        ),
    ] = None,
    student: Annotated[
        list[str] | None,
        typer.Option(
            help="The student: MODALITY=ENCODER[:k=v,...] (repeatable; other modalities are the "
            "teacher's, frozen), derive[:F] or derive:width=F,depth=G (every teacher encoder "
            "narrower / shallower), or a student checkpoint. Default: derive:0.5.",
            rich_help_panel=_DISTILL,
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="Losses with weights: kd, ce, feature, similarity, contrastive, relational, e.g. "
            "similarity=1,feature=0.5,contrastive=1,kd=1. "
            "Default: similarity=1,contrastive=1,feature=1 (with --from: feature=1,contrastive=1).",
            rich_help_panel=_DISTILL,
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            help="Distillation temperature T: kd uses logits / T, similarity the teacher's "
            "similarity logits / T (1 = the teacher's own distribution).",
            rich_help_panel=_DISTILL,
        ),
    ] = 1.0,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Cross-modal: the teacher's modality A whose embeddings ...",
            rich_help_panel=_DISTILL,
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="... a new student encoder for modality B learns on paired items.",
            rich_help_panel=_DISTILL,
        ),
    ] = None,
    cache_teacher: Annotated[
        bool,
        typer.Option(
            "--cache-teacher",
            help="Compute the teacher's outputs once (OUT/teacher-cache) and reuse them every epoch.",
            rich_help_panel=_DISTILL,
        ),
    ] = False,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment",
            help="Random resized crops and flips of the training images, the same for teacher "
            "and student (as fuse-train --augment; encoded image shards, no --cache-teacher).",
            rich_help_panel=_DISTILL,
        ),
    ] = False,
    pairs: Annotated[
        str | None,
        typer.Option(
            help="Modality pairs to distil, e.g. image-text (default: every pair teacher and data share).",
            rich_help_panel=_DISTILL,
        ),
    ] = None,
    feature_loss: Annotated[
        str,
        typer.Option(help="The feature loss: cosine | mse.", rich_help_panel=_DISTILL),
    ] = "cosine",
    head: Annotated[
        str,
        typer.Option(
            help="The student's new heads into the teacher's space: linear | mlp | identity.",
            rich_help_panel=_DISTILL,
        ),
    ] = "linear",
    projector: Annotated[
        bool,
        typer.Option(
            "--projector/--no-projector",
            help="Allow a learned projector (not saved) when student and teacher widths differ.",
            rich_help_panel=_DISTILL,
        ),
    ] = True,
    val: Val = None,
    captions_per_item: Annotated[
        int,
        typer.Option(min=1, help="Captions of an item per batch.", rich_help_panel=_DISTILL),
    ] = 1,
    epochs: Epochs = 10,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 128,
    lr: LearningRate = 1e-3,
    weight_decay: WeightDecay = 0.05,
    warmup: Warmup = 0.05,
    grad_clip: GradClip = 1.0,
    accum_steps: AccumSteps = 1,
    grad_checkpointing: GradCheckpointing = False,
    train_split: TrainSplit = "train",
    val_split: ValSplit = None,
    test_split: Annotated[
        str | None,
        typer.Option(
            help="Manifest split of the final teacher/student report \\[default: test, else "
            "the validation data; a split named here must exist].",
            rich_help_panel=_RUN,
            show_default=False,
        ),
    ] = None,
    best_metric: BestMetric = None,
    early_stop: EarlyStop = None,
    save_every: SaveEvery = None,
    log_every: LogEvery = 10,
    resume: ResumeRun = False,
    overwrite: OverwriteRun = False,
    device: Device = "auto",
    workers: DecodeWorkers = 2,
    precision: Precision = "fp32",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Distil a teacher (a checkpoint, or a pretrained CLIP) into a smaller student, or one
    modality into another.

    Writes OUT/model.safetensors (the student, best on validation: an ordinary checkpoint
    for extract --model, eval and retrieve), OUT/report.json (teacher vs student:
    parameters, encode rows/s, the same held-out metrics, retention) and prints the report
    as one JSON object on stdout. Scale out with torchrun --nproc_per_node N.

    Examples:

        mmcli distill out/tensors --teacher runs/teacher/model.safetensors -o runs/student --student derive:0.25

        mmcli distill out/tensors --teacher runs/teacher/model.safetensors -o runs/small --student image=convnet:width=8 --loss similarity=1,feature=0.5 --cache-teacher

        mmcli distill out/tensors --teacher runs/teacher/model.safetensors -o runs/audio --from image --to audio --student audio=melcnn:width=16

        mmcli distill out/tensors --teacher open_clip:ViT-B-32 --weights clip.safetensors -o runs/tiny --student image=convnet --student text=transformer --cache-teacher
    """
    with command(quiet=quiet, debug=debug) as ctx:
        import json

        from mmcli.runtime import dist_info
        from mmcli.train.distill import DistillConfig, parse_losses
        from mmcli.train.distill import distill as run
        from mmcli.train.splits import parse_pairs

        cfg = DistillConfig(
            teacher=teacher,
            teacher_weights=weights,
            student=list(student or []),
            losses=parse_losses(loss),
            temperature=temperature,
            feature_loss=feature_loss,
            projector=projector,
            head=head,
            pairs=parse_pairs(pairs),
            from_modality=from_,
            to_modality=to,
            cache_teacher=cache_teacher,
            augment=augment,
            captions_per_item=captions_per_item,
            train_split=train_split,
            val_split=val_split,
            test_split=test_split,
            eval_batch_size=max(batch_size, 256),
            throughput_batch_size=batch_size,
        )
        loop = loop_config(
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            grad_clip=grad_clip,
            accum_steps=accum_steps,
            grad_checkpointing=grad_checkpointing,
            precision=precision,
            log_every=log_every,
            save_every=save_every,
            best_metric=best_metric,
            early_stop=early_stop,
            seed=seed,
        )
        from mmcli.train.state import refuse_inputs

        refuse_inputs(
            out, [*data, *(val or []), teacher, *([weights] if weights else []), *cfg.student]
        )  # OUT is never an input
        report = run(
            list(data),
            out,
            cfg,
            loop,
            val_sources=list(val or []) or None,
            batch_size=batch_size,
            device=device,
            resume=resume,
            overwrite=overwrite,
            progress=ctx.progress,
            workers=workers,
        )
        if dist_info().is_main:
            line = _summary_line(report)
            ctx.info(f"{line}; model: {out}/model.safetensors, report: {out}/report.json")
            typer.echo(json.dumps(report, default=float))


def _summary_line(report: dict) -> str:
    """The one line on stderr: the student's size and speed, and the headline metric."""
    if "cross_modal" in report:
        cm = report["cross_modal"]
        line = (
            f"new {cm['to']} encoder + head: {report['student']['trained_parameters']:,} "
            f"params, in the teacher's {cm['from']} space"
        )
    else:
        speed = report["speedup"].get("all") or next(iter(report["speedup"].values()), 0)
        line = (
            f"student {report['student']['parameters']:,} params "
            f"({report['parameter_ratio']:.0%} of the teacher's), encodes {speed:.1f}x "
            "as fast"
        )
    head_line = report.get("headline")
    if head_line:
        line += f"; {head_line['meaning']}: student {head_line['student']:.3f}"
        if head_line.get("teacher") is not None:
            line += f", teacher {head_line['teacher']:.3f}"
    return line
