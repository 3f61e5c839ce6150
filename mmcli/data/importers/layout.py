"""What every importer shares: the layouts, their options, file kinds, and how a layout
is recognised (``--format auto``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.userfiles import open_file, open_text

log = logging.getLogger("mmcli")

FORMATS = (
    "auto", "jsonl", "imagefolder", "karpathy", "coco", "csv", "audiofolder", "webdataset",
    "parquet", "videofolder",
)  # fmt: skip
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}
VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class ImportOptions:
    """Layout-specific options (ignored by layouts that do not use them)."""

    images_dir: str | None = None
    image_col: str | None = None
    text_col: str | None = None
    audio_col: str | None = None
    video_col: str | None = None
    label_col: str | None = None
    id_col: str | None = None
    split_col: str | None = None
    delimiter: str | None = None
    on_error: str = "skip"
    errors: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, reason: str, at: str, **record: Any) -> None:
        """A bad row or sample (``at``: where, for the message): BadInput with
        ``--on-error fail``, else listed in ``errors`` (``record`` + the reason), skipped."""
        if self.on_error == "fail":
            raise BadInput(reason, where=at, hint="use --on-error skip")
        self.errors.append({**record, "reason": reason})


# ------------------------------------------------------------------- files


def load_json(path: str) -> Any:
    try:
        with open_text(path, "JSON file") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise BadInput("not a UTF-8 text file (expected JSON)", where=path) from None
    except RecursionError:
        raise BadInput("bad JSON (nested too deeply)", where=path) from None
    except json.JSONDecodeError as e:
        raise BadInput(
            f"bad JSON ({e.msg} at line {e.lineno}, column {e.colno})", where=path
        ) from None


# ------------------------------------------------------------------- detection


def manifest_in_folder(path: str, fmt: str) -> str:
    """A folder holding ``manifest.jsonl`` (what ``examples/toydata.py`` and ``mmcli
    preprocess`` write) means that manifest, for ``--format auto`` and ``jsonl``: not an
    ImageFolder whose class folders are ``images/`` and ``audio/``."""
    if is_stdio(path) or fmt not in ("auto", "jsonl"):
        return path
    candidate = Path(path) / "manifest.jsonl"
    if Path(path).is_dir() and candidate.is_file():
        log.info("reading the manifest in the folder: %s", candidate)
        return str(candidate)
    return path


def detect_format(path: str) -> str:
    """Guess the layout of ``path`` (see the module docstring)."""
    if is_stdio(path):
        return "jsonl"
    p = Path(path)
    if "{" in path and path.rstrip("/").lower().endswith(".tar"):
        return "webdataset"  # a brace pattern of shards
    if not p.exists():
        raise BadInput("input not found", where=path, hint="check the path")
    if p.is_dir():
        return _detect_folder(p)
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json":
        return _detect_json(p)
    # unknown extension: sniff the first line
    with open_file(p, "input") as f:
        head = f.readline(1 << 16).strip()
    if head.startswith(b"{"):
        return "jsonl"
    raise BadInput(
        "cannot tell the input format",
        where=path,
        hint=f"pass --format {'|'.join(FORMATS[1:])}",
    )


def _detect_json(p: Path) -> str:
    try:
        with open_text(p, "input") as f:
            first = f.read(1)
            f.seek(0)
            if first != "{":
                raise BadInput("expected a JSON object", where=str(p))
            data = json.load(f)
    except UnicodeDecodeError:
        raise BadInput("not a UTF-8 text file (expected JSON)", where=str(p)) from None
    except RecursionError:
        raise BadInput("bad JSON (nested too deeply)", where=str(p)) from None
    except json.JSONDecodeError as e:
        # a .json file holding JSON lines
        if e.msg == "Extra data":
            return "jsonl"
        raise BadInput(f"bad JSON ({e.msg} at line {e.lineno})", where=str(p)) from None
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list):
        if "annotations" in data:
            return "coco"
        if not images or "sentences" in images[0]:
            return "karpathy"
    if isinstance(data, dict) and "id" in data:
        return "jsonl"  # a one-line manifest
    raise BadInput(
        "JSON file is neither a Karpathy split file nor a COCO captions file",
        where=str(p),
        hint="pass --format explicitly",
    )


def files_of(path: str, ext: str) -> list[Path]:
    """``path`` itself, or for a folder every ``*ext`` file below it, sorted (BadInput
    when there is none): the shards of a tar or parquet dataset."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    files = sorted(f for f in p.rglob(f"*{ext}") if f.is_file())
    if not files:
        raise BadInput(f"folder holds no {ext} files", where=path)
    return files


def class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _detect_folder(root: Path) -> str:
    n_img = n_audio = n_video = n_tar = n_parquet = 0
    for i, f in enumerate(folder_files(root)):
        ext = f.suffix.lower()
        n_img += ext in IMAGE_EXTS
        n_audio += ext in AUDIO_EXTS
        n_video += ext in VIDEO_EXTS
        n_tar += ext == ".tar"
        n_parquet += ext == ".parquet"
        if i > 2000:
            break
    media = n_img + n_audio + n_video
    if n_tar and media == 0:
        return "webdataset"  # img2dataset's output folder: tars (+ parquet, _stats.json)
    if n_parquet and media == 0:
        return "parquet"
    if media == 0:
        raise BadInput(
            "folder holds no images, audio or video files",
            where=str(root),
            hint="expected ROOT/<label>/<file> with one of "
            f"{sorted(IMAGE_EXTS | AUDIO_EXTS | VIDEO_EXTS)}",
        )
    most = max(n_img, n_audio, n_video)
    return "imagefolder" if n_img == most else "audiofolder" if n_audio == most else "videofolder"
