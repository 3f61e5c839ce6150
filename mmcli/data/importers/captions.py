"""Caption datasets: Karpathy split JSON (Flickr8k / Flickr30k / COCO) and COCO
captions JSON, one item per image with all its captions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcli.data.importers.layout import SPLIT_NAMES, ImportOptions, load_json, log
from mmcli.errors import BadInput
from mmcli.formats.manifest import Item


def _images_dir(path: str, opts: ImportOptions) -> Path:
    if opts.images_dir:
        d = Path(opts.images_dir)
        if not d.is_dir():
            raise BadInput("--images-dir is not a folder", where=opts.images_dir)
        return d.resolve()
    return Path(path).resolve().parent


def karpathy_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    data = load_json(path)
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


def coco_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    data = load_json(path)
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
