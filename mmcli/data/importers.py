"""Importers: every supported dataset layout -> a stream of manifest :class:`Item` s.

=============  ===========================================================================
format         layout
=============  ===========================================================================
jsonl          an mmcli manifest (file or ``-`` for stdin)
imagefolder    ``ROOT/<label>/*.jpg`` (or ``ROOT/<split>/<label>/*.jpg``)
audiofolder    ``ROOT/<label>/*.wav|flac|ogg`` (or ``ROOT/<split>/<label>/...``)
karpathy       Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
               ``dataset_coco.json``): ``images[]`` with ``filename``, ``split``,
               ``sentences[].raw``; files under ``--images-dir``
coco           COCO captions JSON: ``images[]`` (``id``, ``file_name``) and ``annotations[]``
               (``image_id``, ``caption``); files under ``--images-dir``
csv            CSV/TSV with a header; columns chosen with ``--image-col`` etc. Rows with the
               same id (or the same image when there is no id column) are one item with
               several captions.
=============  ===========================================================================
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.manifest import Item, read_manifest
from mmcli.formats.userfiles import open_file, open_text

log = logging.getLogger("mmcli")

FORMATS = ("auto", "jsonl", "imagefolder", "karpathy", "coco", "csv", "audiofolder")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class ImportOptions:
    """Layout-specific options (ignored by layouts that do not use them)."""

    images_dir: str | None = None
    image_col: str | None = None
    text_col: str | None = None
    audio_col: str | None = None
    label_col: str | None = None
    id_col: str | None = None
    split_col: str | None = None
    delimiter: str | None = None
    on_error: str = "skip"
    errors: list[dict[str, Any]] = field(default_factory=list)


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
    if not p.exists():
        raise BadInput("input not found", where=path, hint="check the path")
    if p.is_dir():
        return _detect_folder(p)
    suffix = p.suffix.lower()
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
        hint="pass --format jsonl|imagefolder|karpathy|coco|csv|audiofolder",
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


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _detect_folder(root: Path) -> str:
    n_img = n_audio = 0
    for i, f in enumerate(_folder_files(root)):
        ext = f.suffix.lower()
        n_img += ext in IMAGE_EXTS
        n_audio += ext in AUDIO_EXTS
        if i > 2000:
            break
    if n_img == 0 and n_audio == 0:
        raise BadInput(
            "folder holds no images or audio files",
            where=str(root),
            hint=f"expected ROOT/<label>/<file> with one of {sorted(IMAGE_EXTS | AUDIO_EXTS)}",
        )
    return "audiofolder" if n_audio > n_img else "imagefolder"


# ------------------------------------------------------------------- importers


def _folder_items(root: Path, exts: set[str], modality: str, fmt: str) -> Iterator[Item]:
    if not root.is_dir():
        raise BadInput(f"{fmt} expects a folder", where=str(root))
    top = _class_dirs(root)
    # ROOT/<split>/<label>/file when the top level is made of split names only
    split_layout = bool(top) and all(d.name.lower() in SPLIT_NAMES for d in top)
    groups = [(SPLIT_NAMES[d.name.lower()], d) for d in top] if split_layout else [(None, root)]
    base = root.resolve()
    found = 0
    for split, group_root in groups:
        loose = sorted(f for f in group_root.iterdir() if f.is_file() and f.suffix.lower() in exts)
        if loose:
            log.warning(
                "%d files directly in %s have no class folder and are ignored",
                len(loose),
                group_root,
            )
        for class_dir in _class_dirs(group_root):
            # relative to ROOT as walked, not resolved: a symlinked file may point
            # anywhere, and its path under ROOT is what the item is called
            files = [
                f.relative_to(root).as_posix()
                for f in _folder_files(class_dir)
                if f.suffix.lower() in exts
            ]
            # the id is the path without its extension, unless two files differ only by
            # it (a.png and a.jpg): those keep the extension, so ids stay unique
            stems = Counter(str(Path(rel).with_suffix("")) for rel in files)
            for rel in files:
                stem = str(Path(rel).with_suffix(""))
                fields: dict[str, Any] = {
                    "id": stem if stems[stem] == 1 else rel,
                    modality: rel,
                    "label": class_dir.name,
                }
                if split:
                    fields["split"] = split
                found += 1
                yield Item(id=fields["id"], fields=fields, base=base, source=root.name)
    if not found:
        raise BadInput(
            f"no {modality} files in class folders",
            where=str(root),
            hint=f"expected {root}/<label>/<file> with one of {sorted(exts)}",
        )


def _load_json(path: str) -> Any:
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


def _images_dir(path: str, opts: ImportOptions) -> Path:
    if opts.images_dir:
        d = Path(opts.images_dir)
        if not d.is_dir():
            raise BadInput("--images-dir is not a folder", where=opts.images_dir)
        return d.resolve()
    return Path(path).resolve().parent


def _karpathy_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    data = _load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise BadInput('not a Karpathy split file (no "images" list)', where=path)
    base = _images_dir(path, opts)
    if not opts.images_dir:
        log.info("no --images-dir given: image paths resolve against %s", base)
    name = Path(path).name
    seen: set[str] = set()
    for i, img in enumerate(images):
        where = f"images[{i}] of {name}"
        if not isinstance(img, dict) or "filename" not in img:
            raise BadInput('image entry has no "filename"', where=where)
        rel = Path(img.get("filepath") or "") / img["filename"]
        item_id = str(img.get("cocoid") if "cocoid" in img else Path(img["filename"]).stem)
        if item_id in seen:
            item_id = rel.with_suffix("").as_posix()
        seen.add(item_id)
        texts = [s.get("raw") or " ".join(s.get("tokens", [])) for s in img.get("sentences", [])]
        split = img.get("split")
        fields: dict[str, Any] = {"id": item_id, "image": rel.as_posix(), "text": texts}
        if split:
            # Karpathy's "restval" images are conventionally trained on.
            fields["split"] = "train" if split == "restval" else str(split)
        yield Item(id=item_id, fields=fields, base=base, source=name)


def _coco_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInput('not a COCO captions file (no "images" list)', where=path)
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise BadInput('not a COCO captions file (no "annotations" list)', where=path)
    base = _images_dir(path, opts)
    name = Path(path).name
    captions: dict[Any, list[str]] = {}
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise BadInput(
                'annotation lacks "image_id" or "caption"', where=f"annotations[{j}] of {name}"
            )
        captions.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    # "captions_val2014.json" -> split "val"
    words = re.split(r"[^a-z]+", name.lower())
    split = next((SPLIT_NAMES[w] for w in words if w in SPLIT_NAMES), None)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise BadInput('image entry lacks "id" or "file_name"', where=f"images[{i}] of {name}")
        fields: dict[str, Any] = {
            "id": str(img["id"]),
            "image": img["file_name"],
            "text": captions.get(img["id"], []),
        }
        if split:
            fields["split"] = split
        yield Item(id=fields["id"], fields=fields, base=base, source=name)


def _csv_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    if is_stdio(path):
        # read whole: the delimiter sniffing below seeks back, and a pipe cannot seek
        try:
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadInput(
                f"not valid UTF-8 ({e.reason})", where="<stdin>", hint="save the CSV as UTF-8"
            ) from None
        stream = io.StringIO(text, newline="")
        base, name = Path.cwd(), "<stdin>"
    else:
        p = Path(path)
        stream = open_text(p, "CSV file", newline="")
        base, name = p.resolve().parent, p.name
    try:
        delimiter = opts.delimiter
        if delimiter is None:
            if name.lower().endswith(".tsv"):
                delimiter = "\t"
            else:
                sample = stream.read(1 << 16)
                stream.seek(0)
                try:
                    delimiter = csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
                except csv.Error:
                    delimiter = ","
        reader = csv.DictReader(stream, delimiter=delimiter)
        header = reader.fieldnames or []
        if not header:
            raise BadInput("CSV file is empty (no header row)", where=path)

        def pick(option: str, given: str | None, defaults: tuple[str, ...]) -> str | None:
            if given is not None:
                if given not in header:
                    raise BadInput(
                        f"no column {given!r} for {option} (columns: {', '.join(header)})",
                        where=path,
                    )
                return given
            return next((c for c in defaults if c in header), None)

        cols = {
            "id": pick("--id-col", opts.id_col, ("id",)),
            "image": pick(
                "--image-col",
                opts.image_col,
                ("image", "filepath", "image_path", "file", "filename"),
            ),
            "text": pick("--text-col", opts.text_col, ("text", "caption", "title", "sentence")),
            "audio": pick("--audio-col", opts.audio_col, ("audio", "audio_path", "wav")),
            "label": pick("--label-col", opts.label_col, ("label", "class", "category")),
            "split": pick("--split-col", opts.split_col, ("split",)),
        }
        if not any(cols[m] for m in ("image", "text", "audio")):
            raise BadInput(
                f"no image, text or audio column found (columns: {', '.join(header)})",
                where=path,
                hint="name them with --image-col, --text-col, --audio-col",
            )
        log.info(
            "CSV columns: %s",
            ", ".join(f"{k}={v}" for k, v in cols.items() if v),
        )
        items: dict[str, Item] = {}
        key_col = cols["id"] or cols["image"] or cols["audio"]
        for lineno, row in enumerate(reader, start=2):
            if key_col:
                key = (row.get(key_col) or "").strip()
            else:
                key = str(lineno - 1)
            if not key:
                reason = f"empty {key_col!r} value"
                if opts.on_error == "fail":
                    raise BadInput(
                        reason, where=f"line {lineno} of {name}", hint="use --on-error skip"
                    )
                opts.errors.append({"line": lineno, "id": None, "reason": reason})
                continue
            text = (row.get(cols["text"]) or "").strip() if cols["text"] else ""
            item = items.get(key)
            if item is None:
                fields: dict[str, Any] = {"id": key}
                for m in ("image", "audio"):
                    if cols[m] and (row.get(cols[m]) or "").strip():
                        fields[m] = row[cols[m]].strip()
                if cols["text"]:
                    fields["text"] = []
                for m in ("label", "split"):
                    if cols[m] and (row.get(cols[m]) or "").strip():
                        fields[m] = row[cols[m]].strip()
                for c in header:  # keep unknown columns, like manifests keep unknown keys
                    if c not in cols.values() and c is not None and row.get(c) not in (None, ""):
                        fields[c] = row[c]
                item = Item(id=key, fields=fields, line=lineno, base=base, source=name)
                items[key] = item
            if text:
                item.fields["text"].append(text)
        yield from items.values()
    except UnicodeDecodeError as e:
        raise BadInput(
            f"not valid UTF-8 ({e.reason})", where=path, hint="save the CSV as UTF-8"
        ) from None
    except csv.Error as e:
        raise BadInput(f"bad CSV ({e})", where=path) from None
    finally:
        stream.close()


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
        items = _folder_items(Path(path), IMAGE_EXTS, "image", fmt)
    elif fmt == "audiofolder":
        items = _folder_items(Path(path), AUDIO_EXTS, "audio", fmt)
    elif fmt == "karpathy":
        items = _karpathy_items(path, opts)
    elif fmt == "coco":
        items = _coco_items(path, opts)
    else:
        items = _csv_items(path, opts)
    return fmt, items
