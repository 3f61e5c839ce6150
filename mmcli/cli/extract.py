from __future__ import annotations

from typing import Annotated, Literal

import typer

from mmcli.cli.common import (
    BatchSize,
    Debug,
    DecodeWorkers,
    Device,
    InferencePrecision,
    Overwrite,
    Quiet,
    Resume,
    Seed,
    command,
    parse_key_values,
)
from mmcli.errors import BadInput
from mmcli.modalities import BUILTIN_ENCODERS, EXTRACT_ENCODERS, MODALITIES

ENCODER_HELP = (
    "Names: "
    + "; ".join(f"{m}: {', '.join(names)}" for m, names in BUILTIN_ENCODERS.items())
    + "; pretrained (docs/models.md): image=open_clip:ARCH, text=open_clip:ARCH, "
    "text|image|audio=hf:DIR_OR_ID, image=timm:NAME."
    + " Default: "
    + ", ".join(f"{m}={name}" for m, name in EXTRACT_ENCODERS.items())
    + " for each table present."
)


def extract(
    sources: Annotated[
        list[str],
        typer.Argument(help="Tensor shards: files, a folder, a glob, or - for one shard on stdin."),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (one features shard per input shard), or - / FILE.safetensors for one shard.",
        ),
    ],
    encoder: Annotated[
        list[str] | None,
        typer.Option(
            "--encoder",
            "-e",
            help="MODALITY=NAME[:key=value,...], repeatable. " + ENCODER_HELP,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Joint-space embeddings of an mmcli checkpoint, open_clip:ARCH (with --weights "
            "FILE) or hf:DIR (a CLIP / SigLIP folder).",
        ),
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights",
            "-w",
            help="Encoder weights: [MODALITY=]PATH (.safetensors, torchvision / open_clip / timm "
            ".pth/.pt/.bin) or [MODALITY=]imagenet; with --model open_clip:ARCH, its weights file.",
        ),
    ] = None,
    device: Device = "auto",
    workers: DecodeWorkers = 2,
    precision: InferencePrecision = "fp32",
    batch_size: BatchSize = 128,
    dtype: Annotated[
        Literal["float16", "float32"], typer.Option(help="Stored feature dtype.")
    ] = "float16",
    normalize: Annotated[
        bool, typer.Option("--normalize/--no-normalize", help="L2-normalise the features.")
    ] = True,
    resume: Resume = False,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Encode tensor shards into features, one table per modality.

    Backbone features by encoder name (random init unless --weights), or
    joint-space embeddings from a trained checkpoint (--model). Item ids,
    labels and the row -> item mapping are copied unchanged. Streams the
    shards and writes one features shard per input shard; --resume skips
    finished ones, --overwrite replaces an earlier run's shards. Under torchrun --nproc_per_node N, each rank takes every
    N-th shard.

    Examples:

        mmcli extract out/tensors/ -o out/feats/ -e image=convnet -e text=bow

        mmcli extract out/tensors/ -o out/feats/ -e image=resnet50 \\
            -w image=imagenet --device cuda --precision bf16

        mmcli extract out/tensors/ -o out/joint/ --model run/model.safetensors

        mmcli extract out/tensors/ -o out/clip/ --model open_clip:ViT-B-32 -w clip.safetensors

        torchrun --nproc_per_node 4 -m mmcli extract out/tensors/ -o out/feats/
    """
    with command(quiet=quiet, debug=debug) as ctx:
        encoders = parse_key_values(encoder, "--encoder", split_commas=False)
        for m in encoders:
            if m not in MODALITIES:
                raise BadInput(
                    f"--encoder {m}=...: unknown modality {m!r}",
                    hint=f"use {', '.join(MODALITIES)}, e.g. --encoder image=resnet18",
                )
        from mmcli.extract import extract as run

        summary = run(
            sources,
            out,
            model,
            encoders=encoders or None,
            weights=_parse_weights(weights),
            device=device,
            precision=precision,
            batch_size=batch_size,
            dtype=dtype,
            normalize=normalize,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            seed=seed,
            progress=ctx.progress,
        )
        if summary["rank"] == 0:
            ctx.info(_summary_line(summary))


def _parse_weights(values: list[str] | None) -> dict[str, str]:
    """``--weights image=PATH``, or ``--weights PATH`` (key ``""``: the library gives it to
    the only encoder, see :func:`mmcli.models.weights.weights_per_modality`)."""
    out: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if sep and key in MODALITIES:
            out[key] = rest
            continue
        if "" in out:
            raise BadInput(
                f"--weights {value}: say which encoder each file is for",
                hint="--weights image=PATH",
            )
        out[""] = value
    return out


def _summary_line(s: dict) -> str:
    rows = ", ".join(
        f"{n:,} {m} rows ({s['encoders'][m]}, {s['dims'][m]}-d)" for m, n in s["rows"].items()
    )
    done = f"{s['written']} shard(s) written"
    if s["skipped"]:
        done += f", {s['skipped']} already done"
    ranks = f" x {s['world_size']} processes" if s["world_size"] > 1 else ""
    cut = "".join(
        f"; {n:,} {m} row(s) cut at the tokenizer's {s['context_length'][m]} tokens"
        for m, n in (s.get("truncated") or {}).items()
        if n
    )
    return (
        f"extracted {rows}: {done} in {s['seconds']:.1f} s ({s['rows_per_s']:,.0f} rows/s, "
        f"{s['device']}{ranks}, {s['precision']}) -> {s['out']}{cut}"
    )
