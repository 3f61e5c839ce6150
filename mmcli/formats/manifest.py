"""The manifest: one JSON object per line, one item per object.

    {"id": "1000268201", "image": "imgs/1000268201.jpg", "text": ["a child ...", "a girl ..."],
     "audio": "wav/1000268201.wav", "label": "dog", "split": "test"}

Only ``id`` is required and it is unique. ``text`` is a string or a list of strings
(several captions). Relative paths resolve against the manifest's own folder (the
current directory for stdin). Unknown keys are kept untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.atomic import atomic_open, is_stdio
from mmcli.formats.userfiles import open_file
from mmcli.modalities import MODALITIES

MANIFEST_NAME = "manifest.jsonl"  # the normalized manifest preprocess writes beside its shards

PATH_FIELDS = ("image", "audio", "video")
MODALITY_FIELDS = MODALITIES  # the manifest fields that hold an item's modalities


@dataclass
class Item:
    """One manifest row. ``fields`` holds every key of the row, ``id`` included."""

    id: str
    fields: dict[str, Any]
    line: int = 0
    base: Path = field(default_factory=Path.cwd)
    source: str = "<manifest>"

    @property
    def texts(self) -> list[str]:
        text = self.fields.get("text")
        if text is None:
            return []
        return [text] if isinstance(text, str) else list(text)

    @property
    def label(self) -> str | None:
        label = self.fields.get("label")
        return None if label is None else str(label)

    @property
    def split(self) -> str | None:
        return self.fields.get("split")

    def path(self, key: str) -> Path | None:
        """The file named by ``key`` (image, audio, video), resolved against the manifest folder."""
        value = self.fields.get(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def where(self, key: str | None = None) -> str:
        """Where this item comes from, for error messages."""
        loc = f"line {self.line} of {self.source}" if self.line else self.source
        loc += f", id {self.id}"
        if key and self.fields.get(key) is not None:
            return f"{self.fields[key]} ({loc})"
        return loc

    def has(self, modality: str) -> bool:
        if modality == "text":
            return bool(self.texts)
        return self.fields.get(modality) is not None


def _check_fields(obj: dict[str, Any]) -> str | None:
    """Return a reason the row is invalid, or None. Normalises ``id`` and ``label`` to str."""
    if "id" not in obj:
        return 'missing "id"; every manifest row needs a unique non-empty "id"'
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        return f'"id" must be a string or an integer, got {type(item_id).__name__}'
    if str(item_id) == "":
        return '"id" is empty'
    obj["id"] = str(item_id)
    for key in PATH_FIELDS + ("split",):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            return f'"{key}" must be a string, got {type(value).__name__}'
    text = obj.get("text")
    if text is not None and not (
        isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        return '"text" must be a string or a list of strings'
    label = obj.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            return f'"label" must be a string or an integer, got {type(label).__name__}'
        obj["label"] = str(label)
    return None


def _open_binary(path: str | os.PathLike) -> tuple[BinaryIO, Path, str]:
    if is_stdio(path):
        return sys.stdin.buffer, Path.cwd(), "<stdin>"
    p = Path(path)
    return open_file(p, "manifest", stdin_ok=True), p.resolve().parent, p.name


def read_manifest(
    path: str | os.PathLike,
    *,
    on_error: str = "fail",
    errors: list[dict[str, Any]] | None = None,
) -> Iterator[Item]:
    """Stream the items of a manifest (``-`` for stdin).

    Invalid rows (bad JSON, missing/duplicate id, wrong field types) raise
    :class:`BadInput` naming the line, or with ``on_error="skip"`` are appended to
    ``errors`` as ``{"line", "id", "reason"}`` and skipped.
    """
    stream, base, source = _open_binary(path)
    seen: dict[str, int] = {}
    try:
        for lineno, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise BadInput(
                    f"not valid UTF-8 ({e.reason})",
                    where=f"line {lineno} of {source}",
                    hint="save the manifest as UTF-8",
                ) from None
            if not line:
                continue
            reason, obj = None, None
            try:
                obj = safejson.loads(line)
            except safejson.JSONError as e:
                reason = str(e)
            if reason is None and not isinstance(obj, dict):
                reason = f"expected a JSON object, got {type(obj).__name__}"
            if reason is None:
                reason = _check_fields(obj)
            if reason is None and obj["id"] in seen:
                reason = f'duplicate id "{obj["id"]}" (first seen on line {seen[obj["id"]]})'
            if reason is not None:
                item_id = obj.get("id") if isinstance(obj, dict) else None
                if on_error == "skip":
                    if errors is not None:
                        errors.append({"line": lineno, "id": item_id, "reason": reason})
                    continue
                raise BadInput(
                    reason,
                    where=f"line {lineno} of {source}",
                    hint="fix the line, or use --on-error skip to skip bad rows",
                )
            seen[obj["id"]] = lineno
            yield Item(id=obj["id"], fields=obj, line=lineno, base=base, source=source)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def load_manifest_index(path: str | os.PathLike) -> dict[str, Item]:
    """All items of a manifest by id (for attaching manifest fields to results)."""
    return {item.id: item for item in read_manifest(path, on_error="skip")}


def item_to_json(item: Item | dict[str, Any]) -> str:
    fields = item.fields if isinstance(item, Item) else item
    return json.dumps(fields, ensure_ascii=False, separators=(", ", ": "))


def write_manifest(path: str | os.PathLike, items: Iterable[Item | dict[str, Any]]) -> int:
    """Write items as JSONL, atomically (``-`` for stdout). Returns the number written."""
    n = 0
    with atomic_open(path, "w") as f:
        for item in items:
            f.write(item_to_json(item) + "\n")
            n += 1
    return n


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_file(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_source(manifest: str | os.PathLike, shard_dir: str | os.PathLike) -> dict[str, str]:
    """How shards written to ``shard_dir`` name their manifest: its absolute path, and its
    path relative to the shards' folder, so a moved or copied folder tree still finds it."""
    path = Path(manifest).resolve()
    try:
        relative = os.path.relpath(path, Path(shard_dir).resolve())
    except ValueError:  # another drive (Windows)
        return {"manifest": str(path)}
    return {"manifest": str(path), "manifest_relative": Path(relative).as_posix()}


def locate_manifest(
    source: dict[str, Any] | None, shard_paths: Iterable[str | os.PathLike]
) -> Path | None:
    """The manifest that tensor or feature shards point to (their ``mmcli.source``).

    Tried in order: the recorded path; the recorded path relative to the shards' folder
    (``manifest_relative``, for a folder tree that was moved or copied); ``manifest.jsonl``
    beside the shards. None when none is a file.
    """
    source = source or {}
    first = next((Path(p) for p in shard_paths if not is_stdio(p)), None)
    candidates: list[Path] = []
    name = source.get("manifest")
    if name and not is_stdio(name):
        if Path(name).is_absolute() or first is None:
            candidates.append(Path(name))
        else:
            candidates.append(first.parent / name)
    if first is not None:
        if source.get("manifest_relative"):
            candidates.append(first.parent / source["manifest_relative"])
        candidates.append(first.parent / MANIFEST_NAME)
    return next((c for c in candidates if c.is_file()), None)
