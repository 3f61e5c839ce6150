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
    parse_key_values,
)

_MODEL = "Model"
_RUN = "Run"
_CAPTION = "Captioning"


def fuse_train(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Tensor shards (end to end) or feature files (frozen backbones): files, folders, globs."
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics.jsonl, state.")
    ],
    val: Val = None,
    pairs: Annotated[
        str | None,
        typer.Option(
            help="Modality pairs to align, e.g. image-text,audio-text (default: every pair present).",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="contrastive | sigmoid, plus classify / match / caption, with weights: "
            "contrastive=1,match=0.5 (contrastive=1,caption=2: CoCa).",
            rich_help_panel=_MODEL,
        ),
    ] = "contrastive",
    fusion: Annotated[
        str,
        typer.Option(help="Cross-modal fusion: none | concat | attention.", rich_help_panel=_MODEL),
    ] = "none",
    encoder: Annotated[
        list[str] | None,
        typer.Option(
            help="End to end: encoder per modality, e.g. image=convnet:width=32 (repeatable) "
            "\\[default: small ones that learn in minutes on a CPU, docs/fuse-train.md].",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            help="Initial encoder weights per modality: image=resnet18.pth or image=imagenet; "
            "with --init open_clip:ARCH, its weights FILE.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        typer.Option(
            help="Keep this modality's encoder fixed (repeatable or image,audio; its outputs "
            "are computed once). --init M --freeze image is LiT.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from a model: an mmcli checkpoint, open_clip:ARCH (with --weights FILE) "
            "or hf:DIR (towers, heads, logit scale).",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    embed_dim: Annotated[
        int, typer.Option(min=2, help="Joint space width.", rich_help_panel=_MODEL)
    ] = 256,
    head: Annotated[
        str, typer.Option(help="Projection heads: linear | mlp.", rich_help_panel=_MODEL)
    ] = "linear",
    fusion_width: Annotated[
        int, typer.Option(min=8, help="Attention fusion width.", rich_help_panel=_MODEL)
    ] = 128,
    fusion_depth: Annotated[
        int, typer.Option(min=1, help="Attention fusion layers.", rich_help_panel=_MODEL)
    ] = 2,
    temperature: Annotated[
        float,
        typer.Option(
            help="Initial contrastive temperature (learned, >= 0.01).", rich_help_panel=_MODEL
        ),
    ] = 0.07,
    captions_per_item: Annotated[
        int,
        typer.Option(
            min=1,
            help="Captions of an item per batch (all positives of its image).",
            rich_help_panel=_MODEL,
        ),
    ] = 1,
    hard_negatives: Annotated[
        str | None,
        typer.Option(
            help="Manifest field with hard-negative captions per item (NegCLIP), e.g. swap_text.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    batch_with: Annotated[
        str | None,
        typer.Option(
            help="Manifest field naming another item to put in the same batch (a hard negative both ways), e.g. swap_id.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    caption_decoder: Annotated[
        str,
        typer.Option(
            help="--objective caption: attention (over the source tokens) | pooled (the pooled "
            "vector only) | prefix, with options: attention:width=256,depth=2,heads=4.",
            rich_help_panel=_CAPTION,
        ),
    ] = "attention",
    caption_from: Annotated[
        str | None,
        typer.Option(
            help="--objective caption: the modality to caption \\[default: image, else audio].",
            rich_help_panel=_CAPTION,
            show_default=False,
        ),
    ] = None,
    label_smoothing: Annotated[
        float,
        typer.Option(help="--objective caption: label smoothing.", rich_help_panel=_CAPTION),
    ] = 0.1,
    caption_tokenizer: Annotated[
        str | None,
        typer.Option(
            help="--objective caption: the decoder's vocabulary: bytes | open_clip:ARCH | hf:DIR "
            "(a tokenizer folder) \\[default: the pretrained text tower's tokenizer, else bytes].",
            rich_help_panel=_CAPTION,
            show_default=False,
        ),
    ] = None,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment",
            help="Random resized crops (open_clip's scale 0.9-1) and horizontal flips of the "
            "training images, seeded per step (--resume is exact); needs encoded image "
            "shards (preprocess --store encoded), which keep the full images.",
        ),
    ] = False,
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
    """Learn a joint embedding space (contrastive) and cross-modal attention fusion.

    Writes OUT/model.safetensors (best on validation), OUT/last.safetensors,
    OUT/metrics.jsonl and OUT/state.safetensors (for --resume); prints the final
    summary as one JSON object on stdout. Scale out with torchrun --nproc_per_node N.

    Examples:

        mmcli fuse-train out/tensors -o runs/toy --epochs 10

        mmcli fuse-train feats/ -o runs/heads --fusion attention --objective contrastive,match

        mmcli fuse-train out/tensors -o runs/coca --objective contrastive=1,caption=2

        mmcli fuse-train out/tensors -o runs/lit --init open_clip:ViT-B-32 \\
            --weights clip.safetensors --freeze image

        torchrun --nproc_per_node 2 -m mmcli fuse-train out/tensors -o runs/ddp --batch-size 64
    """
    with command(quiet=quiet, debug=debug) as ctx:
        import json

        from mmcli.train.fuse import FuseConfig, parse_objectives, parse_pairs
        from mmcli.train.fuse import fuse_train as run

        cfg = FuseConfig(
            pairs=parse_pairs(pairs),
            objectives=parse_objectives(objective),
            fusion=fusion,
            fusion_width=fusion_width,
            fusion_depth=fusion_depth,
            embed_dim=embed_dim,
            head=head,
            encoders=parse_key_values(encoder, "--encoder", split_commas=False),
            weights={} if init else parse_key_values(weights, "--weights", split_commas=False),
            freeze=[m.strip() for value in freeze or [] for m in value.split(",") if m.strip()],
            init=init,
            init_weights=_init_weights(weights) if init else None,
            temperature=temperature,
            captions_per_item=captions_per_item,
            hard_negatives=hard_negatives,
            batch_with=batch_with,
            train_split=train_split,
            val_split=val_split,
            caption_decoder=caption_decoder,
            caption_from=caption_from,
            label_smoothing=label_smoothing,
            caption_tokenizer=caption_tokenizer,
            augment=augment,
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

        inputs = [*data, *(val or []), *cfg.weights.values(), cfg.init, cfg.init_weights]
        refuse_inputs(out, [p for p in inputs if p])  # OUT is never an input
        summary = run(
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
        from mmcli.runtime import dist_info

        if dist_info().is_main:
            best = summary.get("best_metrics") or {}
            headline = "  ".join(f"{k} {v:.3f}" for k, v in list(best.items())[:4])
            ctx.info(
                f"trained {summary['steps']} steps in {summary['seconds']:.0f} s "
                f"({summary['samples_per_s'] or 0:,.0f} samples/s); best: {headline or 'no validation'}; "
                f"model: {out}/model.safetensors"
            )
            typer.echo(json.dumps(summary))


def _init_weights(values: list[str] | None) -> str | None:
    """``--weights FILE`` of ``--init open_clip:ARCH``: one file, no modality."""
    from mmcli.errors import BadInput

    if not values:
        return None
    if len(values) > 1 or "=" in values[0]:
        raise BadInput(
            "with --init, --weights is the weights FILE of the --init model (one, no modality)",
            hint="--init open_clip:ARCH --weights clip.safetensors",
        )
    return values[0]
