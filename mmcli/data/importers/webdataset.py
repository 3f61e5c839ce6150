"""``webdataset``: tar shards of samples, as img2dataset and CLIP_benchmark write them.

A sample is the run of consecutive tar members that share a key (the member's path up to
the first dot of its file name): ``000123.jpg``, ``000123.txt``, ``000123.json``,
``000123.cls``. What each extension gives:

* ``jpg jpeg png webp bmp gif tif tiff`` (or ``image.*``): the image, read later straight
  from the archive (the item's ``image`` is ``ARCHIVE#MEMBER``, see
  :mod:`mmcli.formats.archive`);
* ``wav flac ogg mp3``: the audio, likewise;
* ``txt``: the captions, one per non-empty line (CLIP_benchmark writes one per line;
  img2dataset one per file);
* ``cls``: an integer class; with ``classnames.txt`` (one name per line) in the folder of
  the tars or above it, the class name is the label;
* ``json``: img2dataset's metadata; its ``url`` and ``caption`` (when there is no
  ``.txt``) are kept.

Inputs: one ``.tar``, a folder of them (every ``*.tar`` below it, sorted; a split folder
``train/`` ``val/`` ``test/`` names the split), or a brace pattern
``data/{00000..00099}.tar`` (numeric ranges keep their zero padding; ``{a,b}`` lists).
The standard library's ``tarfile`` reads them: nothing to install, and an index of member
offsets lets worker processes read one image with one seek, where webdataset's stream
decodes in the order of the tar. Samples without a modality most samples have, with a
caption that is not UTF-8, or cut off by a truncated tar are skipped and listed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmcli.data.importers.layout import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    SPLIT_NAMES,
    VIDEO_EXTS,
    ImportOptions,
    files_of,
    log,
)
from mmcli.errors import BadInput
from mmcli.formats.archive import ArchiveIndex, Member, member_path, members, read_member
from mmcli.formats.manifest import Item

_IMAGE = {e.lstrip(".") for e in IMAGE_EXTS}
_AUDIO = {e.lstrip(".") for e in AUDIO_EXTS}
_VIDEO = {e.lstrip(".") for e in VIDEO_EXTS}
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{00..02}.tar`` -> ``a/00.tar a/01.tar a/02.tar``; ``{x,y}`` lists; nested
    patterns expand left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for c in choices for out in expand_braces(head + c + tail)]


def tar_paths(path: str) -> list[Path]:
    if "{" in path:
        tars = [Path(t) for t in expand_braces(path)]
        missing = [t for t in tars if not t.is_file()]
        if missing:
            raise BadInput(
                f"{len(missing)} of the {len(tars)} tars of the pattern do not exist, "
                f"the first: {missing[0]}",
                where=path,
            )
        return tars
    return files_of(path, ".tar")


def webdataset_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    tars = tar_paths(path)
    indices = [members(t) for t in tars]
    log.info("webdataset: %d tar(s), %d members", len(tars), sum(len(i.members) for i in indices))
    expected = _expected(indices)
    seen: set[str] = set()
    for tar, index in zip(tars, indices):
        with open(tar, "rb") as f:
            yield from _tar_items(tar, f, index, expected, seen, opts)
        if index.truncated:
            opts.reject(
                f"tar {index.truncated}: the rest is skipped", str(tar), where=str(tar), id=None
            )


def _tar_items(tar: Path, f: BinaryIO, index, expected, seen: set[str], opts) -> Iterator[Item]:
    classnames = _classnames(tar)
    split = _split_of(tar)
    resolved, base = tar.resolve(), Path.cwd()  # once per tar, not per sample
    for key, group in _samples(index):
        where = f"{member_path(tar, key)}.*"
        item_id = key if key not in seen else f"{tar.stem}/{key}"
        seen.add(item_id)
        try:
            fields = _fields(resolved, f, group, classnames)
            lacking = sorted(expected - _modalities(fields))
            if lacking:
                raise BadInput(f"sample has no {' or '.join(lacking)}")
        except BadInput as e:
            opts.reject(e.message, where, where=where, id=item_id)
            continue
        fields["id"] = item_id
        if split and "split" not in fields:
            fields["split"] = split
        yield Item(id=item_id, fields=fields, base=base, source=str(tar))


def _key_ext(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _samples(index: ArchiveIndex) -> Iterator[tuple[str, dict[str, Member]]]:
    """(key, {extension: member}) per run of members sharing a key, in tar order."""
    key, group = None, {}
    for m in index.members:
        k, ext = _key_ext(m.name)
        if k != key:
            if group:
                yield key, group
            key, group = k, {}
        group[ext] = m
    if group:
        yield key, group


def _kind(ext: str) -> str | None:
    last = ext.rsplit(".", 1)[-1]
    if last in _IMAGE:
        return "image"
    if last in _AUDIO:
        return "audio"
    if last in _VIDEO:
        return "video"
    return {"txt": "text", "cls": "label", "json": "json"}.get(ext)


def _expected(indices: list[ArchiveIndex]) -> set[str]:
    """The modalities (and label) that at least half of all samples have."""
    counts: dict[str, int] = {}
    total = 0
    for index in indices:
        for _, group in _samples(index):
            total += 1
            for kind in {_kind(e) for e in group} - {None, "json"}:
                counts[kind] = counts.get(kind, 0) + 1
    return {k for k, c in counts.items() if 2 * c >= total}


def _modalities(fields: dict[str, Any]) -> set[str]:
    have = {k for k in ("image", "audio", "video", "label") if fields.get(k) is not None}
    return have | ({"text"} if fields.get("text") else set())


def _text(f: BinaryIO, m: Member) -> str:
    try:
        return read_member(f, m).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(f"{m.name} is not UTF-8 text") from None


def _fields(tar: Path, f: BinaryIO, group: dict[str, Member], classnames: list[str]) -> dict:
    """A sample's fields: the image / audio as member paths of ``tar`` (resolved), the
    small members read through ``f``, the tar already open."""
    fields: dict[str, Any] = {}
    for ext, m in group.items():
        kind = _kind(ext)
        if kind in ("image", "audio", "video") and kind not in fields:
            fields[kind] = member_path(tar, m.name)
        elif kind == "text":
            fields["text"] = [line.strip() for line in _text(f, m).splitlines() if line.strip()]
        elif kind == "label":
            fields["label"] = _label(_text(f, m).strip(), classnames, m.name)
        elif kind == "json":
            meta = _json(f, m)
            if meta.get("url"):
                fields["url"] = str(meta["url"])
            if "text" not in group and isinstance(meta.get("caption"), str) and meta["caption"]:
                fields["text"] = [meta["caption"].strip()]
    return fields


def _json(f: BinaryIO, m: Member) -> dict:
    try:
        meta = json.loads(_text(f, m))
    except json.JSONDecodeError as e:
        raise BadInput(f"{m.name} is not JSON ({e.msg})") from None
    return meta if isinstance(meta, dict) else {}


def _label(text: str, classnames: list[str], name: str) -> str:
    if not classnames:
        return text
    try:
        return classnames[int(text)]
    except (ValueError, IndexError):
        raise BadInput(
            f"{name}: class {text!r} is not an index into classnames.txt ({len(classnames)} names)"
        ) from None


def _classnames(tar: Path) -> list[str]:
    """CLIP_benchmark's ``classnames.txt`` in the tar's folder or the two above it."""
    for folder in (tar.parent, tar.parent.parent, tar.parent.parent.parent):
        f = folder / "classnames.txt"
        if f.is_file():
            return [line.strip() for line in f.read_text("utf-8-sig").splitlines() if line.strip()]
    return []


def _split_of(tar: Path) -> str | None:
    """``test/0.tar`` (CLIP_benchmark) is in split ``test``."""
    return SPLIT_NAMES.get(tar.parent.name.lower())
