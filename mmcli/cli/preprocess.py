from __future__ import annotations

from typing import Annotated, Literal

import typer

from mmcli.cli.common import Debug, OnError, Overwrite, Quiet, Resume, Workers, command
from mmcli.data.limits import MAX_IMAGE_PIXELS

Format = Literal[
    "auto",
    "jsonl",
    "imagefolder",
    "karpathy",
    "coco",
    "csv",
    "audiofolder",
    "webdataset",
    "parquet",
    "videofolder",
]
_LAYOUT = "Dataset layout"
_PROC = "Processing"


def preprocess(
    input: Annotated[
        str,
        typer.Argument(
            help="Manifest JSONL (or - for stdin), dataset folder, Karpathy/COCO JSON or CSV/TSV."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output folder for the shards (or - for one tensor file on stdout)."
        ),
    ],
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            help="Input layout; auto detects it and says what it found.",
            rich_help_panel=_LAYOUT,
        ),
    ] = "auto",
    split: Annotated[
        str | None, typer.Option(help="Keep only the items of this split (train, val, test, ...).")
    ] = None,
    images_dir: Annotated[
        str | None,
        typer.Option(
            help="Folder the image file names of a Karpathy/COCO JSON are relative to.",
            rich_help_panel=_LAYOUT,
        ),
    ] = None,
    image_col: Annotated[
        str | None, typer.Option(help="CSV column with image paths.", rich_help_panel=_LAYOUT)
    ] = None,
    text_col: Annotated[
        str | None, typer.Option(help="CSV column with captions.", rich_help_panel=_LAYOUT)
    ] = None,
    audio_col: Annotated[
        str | None, typer.Option(help="CSV column with audio paths.", rich_help_panel=_LAYOUT)
    ] = None,
    video_col: Annotated[
        str | None, typer.Option(help="CSV column with video paths.", rich_help_panel=_LAYOUT)
    ] = None,
    label_col: Annotated[
        str | None, typer.Option(help="CSV column with class labels.", rich_help_panel=_LAYOUT)
    ] = None,
    id_col: Annotated[
        str | None,
        typer.Option(
            help="CSV column with item ids (default: the image/audio path).",
            rich_help_panel=_LAYOUT,
        ),
    ] = None,
    split_col: Annotated[
        str | None, typer.Option(help="CSV column with the split.", rich_help_panel=_LAYOUT)
    ] = None,
    modality: Annotated[
        list[str] | None,
        typer.Option(
            "--modality",
            "-m",
            help="Keep only these modalities (repeatable; default: all present).",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=8,
            help="Images: shorter side resized to this, then center-cropped square "
            "\\[default: 224, or the --like model's].",
            rich_help_panel=_PROC,
            show_default=False,
        ),
    ] = None,
    like: Annotated[
        str | None,
        typer.Option(
            help="Images: resize as this pretrained model's own transform does (open_clip:ARCH, "
            "hf:DIR, timm:NAME): size, resize mode, interpolation, crop; flags given override.",
            rich_help_panel=_PROC,
        ),
    ] = None,
    resize_mode: Annotated[
        Literal["shortest", "longest", "squash"] | None,
        typer.Option(
            help="Images: fit the shortest side and crop, the longest side and pad, or squash "
            "\\[default: shortest, or the --like model's].",
            rich_help_panel=_PROC,
            show_default=False,
        ),
    ] = None,
    interpolation: Annotated[
        Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] | None,
        typer.Option(
            help="Images: resampling filter \\[default: bicubic, or the --like model's].",
            rich_help_panel=_PROC,
            show_default=False,
        ),
    ] = None,
    resize_size: Annotated[
        int | None,
        typer.Option(
            min=8,
            help="Images: resize to this, then center-crop --image-size (timm's crop_pct).",
            rich_help_panel=_PROC,
        ),
    ] = None,
    context_length: Annotated[
        int,
        typer.Option(
            min=3, help="Text: tokens per caption, BOS and EOS included.", rich_help_panel=_PROC
        ),
    ] = 77,
    lowercase: Annotated[
        bool,
        typer.Option(
            "--lowercase", help="Text: lowercase captions before tokenizing.", rich_help_panel=_PROC
        ),
    ] = False,
    sample_rate: Annotated[
        int, typer.Option(min=1, help="Audio: resample to this rate (Hz).", rich_help_panel=_PROC)
    ] = 16000,
    audio_seconds: Annotated[
        float,
        typer.Option(
            min=0.01, help="Audio: crop or zero-pad to this length.", rich_help_panel=_PROC
        ),
    ] = 5.0,
    frames: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="Video: frames per clip, sampled uniformly over it (the frame nearest each "
            "segment's centre), resized and cropped like images.",
            rich_help_panel=_PROC,
        ),
    ] = 8,
    fps: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Video: take the --frames frames this many per second apart, centred on the "
            "clip's middle, instead of spread over the whole clip.",
            rich_help_panel=_PROC,
        ),
    ] = None,
    audio_from_video: Annotated[
        bool,
        typer.Option(
            "--audio-from-video",
            help="Video: also write each clip's audio track into the audio table (items "
            "without an audio file).",
            rich_help_panel=_PROC,
        ),
    ] = False,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="Images: 'pixels' stores uint8 \\[N,3,S,S] (the default: fastest to read, "
            "best for small images); 'encoded' keeps the compressed files (the original up "
            "to twice the size, else re-encoded once: JPEG quality 95), decoded on the fly "
            "by extract, fuse-train and distill (a quarter of the disk or less for photos; "
            "allows fuse-train --augment).",
            rich_help_panel=_PROC,
        ),
    ] = "pixels",
    max_image_pixels: Annotated[
        int,
        typer.Option(
            min=0,
            help="Images: skip (as unreadable) any image of more pixels, before decoding it "
            "(a decompression-bomb guard; 0 = no limit).",
            rich_help_panel=_PROC,
        ),
    ] = MAX_IMAGE_PIXELS,
    shard_size: Annotated[
        int, typer.Option(min=1, help="Items per shard.", rich_help_panel=_PROC)
    ] = 1000,
    workers: Workers = 0,
    on_error: OnError = "skip",
    max_skip: Annotated[
        str,
        typer.Option(
            "--max-skip",
            help="Stop with exit 2 when more items than this are skipped (unreadable files): "
            "a count (50) or a share of the items (5%); the shards stay, --resume finishes.",
        ),
    ] = "50%",
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Raw images, captions, audio and video -> normalized tensor shards (safetensors).

    Writes OUT/data-00000-of-000NN.safetensors (uint8 images \\[N,3,S,S] or, with
    --store encoded, the image files themselves; int32 byte
    tokens \\[rows,L], float16 audio \\[N,samples], uint8 video frames \\[N,T,3,S,S]),
    OUT/manifest.jsonl (the kept items,
    in row order), OUT/errors.jsonl (what was skipped and why) and OUT/preprocess.json.

    Examples:

        mmcli preprocess data/manifest.jsonl -o out/tensors --image-size 64 --workers 2

        mmcli preprocess dataset_flickr8k.json --images-dir Flicker8k_Dataset --split test -o flickr8k-test

        mmcli preprocess data/manifest.jsonl -o - | mmcli info -

        mmcli preprocess photos/ -o out/clip-tensors --like open_clip:ViT-B-32

        mmcli preprocess clips/ -o out/video-tensors --frames 8 --image-size 112
    """
    with command(quiet=quiet, debug=debug) as ctx:
        from mmcli.data.image import preprocess_image_options
        from mmcli.data.importers import ImportOptions
        from mmcli.preprocess import PreprocessConfig
        from mmcli.preprocess import preprocess as run

        settings = None
        if like:  # plain open_clip:ARCH without torch; other specs import the model's library
            from mmcli.data.like import like as like_settings

            settings = like_settings(like)
        image = preprocess_image_options(settings, image_size=image_size, resize_mode=resize_mode,
                                         interpolation=interpolation, resize_size=resize_size)  # fmt: skip
        if like:
            ctx.info(f"images as {like} resizes them: " + _image_line(image))
        config = PreprocessConfig(
            **image,
            context_length=context_length,
            lowercase=lowercase,
            sample_rate=sample_rate,
            audio_seconds=audio_seconds,
            frames=frames,
            fps=fps,
            audio_from_video=audio_from_video,
            shard_size=shard_size,
            max_image_pixels=max_image_pixels,
            store=store,
            workers=workers,
            on_error=on_error,
            split=split,
            max_skip=max_skip,
            modalities=modality or None,
        )
        opts = ImportOptions(
            images_dir=images_dir,
            image_col=image_col,
            text_col=text_col,
            audio_col=audio_col,
            video_col=video_col,
            label_col=label_col,
            id_col=id_col,
            split_col=split_col,
        )
        s = run(
            input,
            out,
            fmt=format,
            config=config,
            import_options=opts,
            resume=resume,
            overwrite=overwrite,
            progress=ctx.progress,
        )
        rows = ", ".join(f"{v:,} {k}" for k, v in s["rows"].items())
        ctx.info(
            f"preprocessed {s['kept']:,} of {s['items']:,} items ({rows}) into {s['shards']} shard(s) "
            f"in {s['seconds']:.1f} s ({s['items_per_s'] or 0:,.0f} items/s); skipped {s['skipped']}"
            + (f", see {out}/errors.jsonl" if s["skipped"] and out != "-" else "")
        )


def _image_line(o: dict) -> str:
    resize = f"resize {o.get('resize_size') or o['image_size']} ({o.get('resize_mode', 'shortest')} side)"
    return (
        f"{resize}, {o.get('interpolation', 'bicubic')}, {o['image_size']} px "
        f"({o.get('image_backend', 'mmcli')})"
    )
