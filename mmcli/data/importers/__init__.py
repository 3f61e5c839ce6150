"""Importers: every supported dataset layout -> a stream of manifest :class:`Item` s.

=============  ===========================================================================
format         layout
=============  ===========================================================================
jsonl          an mmcli manifest (file or ``-`` for stdin)
imagefolder    ``ROOT/<label>/*.jpg`` (or ``ROOT/<split>/<label>/*.jpg``)
audiofolder    ``ROOT/<label>/*.wav|flac|ogg`` (or ``ROOT/<split>/<label>/...``)
videofolder    ``ROOT/<label>/*.mp4|webm|mkv|avi`` (or ``ROOT/<split>/<label>/...``)
karpathy       Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
               ``dataset_coco.json``): ``images[]`` with ``filename``, ``split``,
               ``sentences[].raw``; files under ``--images-dir``
coco           COCO captions JSON: ``images[]`` (``id``, ``file_name``) and ``annotations[]``
               (``image_id``, ``caption``); files under ``--images-dir``
csv            CSV/TSV with a header; columns chosen with ``--image-col`` etc. Rows with the
               same id (or the same image when there is no id column) are one item with
               several captions.
webdataset     tar shards (``00000.tar``, a folder of them, ``data/{00000..00099}.tar``) of
               ``KEY.jpg`` + ``KEY.txt`` (+ ``.json``, ``.cls``): img2dataset's and
               CLIP_benchmark's layouts
parquet        a table of paths + captions (+ labels, splits), or img2dataset's parquet with
               the encoded images in a bytes column (``jpg``)
=============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmcli.data.importers.captions import coco_items, karpathy_items
from mmcli.data.importers.folders import folder_items
from mmcli.data.importers.layout import (
    AUDIO_EXTS,
    FORMATS,
    IMAGE_EXTS,
    SPLIT_NAMES,
    VIDEO_EXTS,
    ImportOptions,
    detect_format,
    log,
    manifest_in_folder,
)
from mmcli.data.importers.parquet import parquet_items
from mmcli.data.importers.table import csv_items
from mmcli.data.importers.webdataset import webdataset_items
from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.manifest import Item, read_manifest

__all__ = [
    "AUDIO_EXTS",
    "FORMATS",
    "IMAGE_EXTS",
    "SPLIT_NAMES",
    "VIDEO_EXTS",
    "ImportOptions",
    "detect_format",
    "import_items",
    "manifest_in_folder",
]


def import_items(
    path: str, fmt: str = "auto", opts: ImportOptions | None = None
) -> tuple[str, Iterator[Item]]:
    """(the format used, a stream of items) for ``path`` in layout ``fmt``."""
    opts = opts or ImportOptions()
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
        log.info("detected format: %s", fmt)
    if is_stdio(path) and fmt not in ("jsonl", "csv"):
        raise BadInput(f"{fmt} cannot be read from stdin", hint="pass a path")
    if fmt == "jsonl":
        items = read_manifest(path, on_error=opts.on_error, errors=opts.errors)
    elif fmt == "imagefolder":
        items = folder_items(Path(path), IMAGE_EXTS, "image", fmt)
    elif fmt == "audiofolder":
        items = folder_items(Path(path), AUDIO_EXTS, "audio", fmt)
    elif fmt == "videofolder":
        items = folder_items(Path(path), VIDEO_EXTS, "video", fmt)
    elif fmt == "karpathy":
        items = karpathy_items(path, opts)
    elif fmt == "coco":
        items = coco_items(path, opts)
    elif fmt == "webdataset":
        items = webdataset_items(path, opts)
    elif fmt == "parquet":
        items = parquet_items(path, opts)
    else:
        items = csv_items(path, opts)
    return fmt, items
