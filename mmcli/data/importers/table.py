"""``csv``: CSV / TSV with a header; rows with the same id (or image) are one item."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcli.data.importers.layout import ImportOptions, log
from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.manifest import Item
from mmcli.formats.userfiles import open_text
from mmcli.modalities import MODALITIES

#: the columns each field is read from when no ``--*-col`` option names one, by preference
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id", "key"),
    "image": ("image", "filepath", "image_path", "file", "filename"),
    "text": ("text", "caption", "title", "sentence"),
    "audio": ("audio", "audio_path", "wav"),
    "video": ("video", "video_path", "clip"),
    "label": ("label", "class", "category"),
    "split": ("split",),
}


def csv_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    stream, base, name = _open(path)
    try:
        reader = csv.DictReader(stream, delimiter=_delimiter(stream, name, opts.delimiter))
        header = reader.fieldnames or []
        if not header:
            raise BadInput("CSV file is empty (no header row)", where=path)
        cols = find_columns(header, opts, path)
        log.info(
            "CSV columns: %s",
            ", ".join(f"{k}={v}" for k, v in cols.items() if v),
        )
        yield from rows_to_items(reader, header, cols, opts, base, name).values()
    except UnicodeDecodeError as e:
        raise BadInput(
            f"not valid UTF-8 ({e.reason})", where=path, hint="save the CSV as UTF-8"
        ) from None
    except csv.Error as e:
        raise BadInput(f"bad CSV ({e})", where=path) from None
    finally:
        stream.close()


def _open(path: str) -> tuple[io.TextIOBase, Path, str]:
    """(text stream, folder paths resolve against, name for messages)."""
    if is_stdio(path):
        # read whole: the delimiter sniffing seeks back, and a pipe cannot seek
        try:
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadInput(
                f"not valid UTF-8 ({e.reason})", where="<stdin>", hint="save the CSV as UTF-8"
            ) from None
        return io.StringIO(text, newline=""), Path.cwd(), "<stdin>"
    p = Path(path)
    stream = open_text(p, "CSV file", newline="")
    return stream, p.resolve().parent, p.name


def _delimiter(stream, name: str, given: str | None) -> str:
    if given is not None:
        return given
    if name.lower().endswith(".tsv"):
        return "\t"
    sample = stream.read(1 << 16)
    stream.seek(0)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def find_columns(header: list[str], opts: ImportOptions, path: str) -> dict[str, str | None]:
    """The column of each field: the one its option names, else the first default present."""
    cols: dict[str, str | None] = {}
    for key, defaults in DEFAULT_COLUMNS.items():
        given = getattr(opts, f"{key}_col")
        if given is not None and given not in header:
            raise BadInput(
                f"no column {given!r} for --{key}-col (columns: {', '.join(header)})",
                where=path,
            )
        cols[key] = given if given is not None else next((c for c in defaults if c in header), None)
    if not any(cols[m] for m in MODALITIES):
        raise BadInput(
            f"no image, text, audio or video column found (columns: {', '.join(header)})",
            where=path,
            hint="name them with --image-col, --text-col, --audio-col, --video-col",
        )
    return cols


def rows_to_items(
    reader, header, cols, opts: ImportOptions, base: Path, name: str, start: int = 2
) -> dict[str, Item]:
    """Items by key, in first-seen order; the rows of one key add their captions."""
    items: dict[str, Item] = {}
    key_col = cols["id"] or cols["image"] or cols["audio"] or cols["video"]
    for lineno, row in enumerate(reader, start=start):
        # no key column: the row's number, from 1 (a CSV's first row is its line 2)
        key = (row.get(key_col) or "").strip() if key_col else str(lineno - start + 1)
        if not key:
            opts.reject(
                f"empty {key_col!r} value", f"line {lineno} of {name}", line=lineno, id=None
            )
            continue
        item = items.get(key)
        if item is None:
            fields = _fields(row, key, header, cols)
            item = items[key] = Item(id=key, fields=fields, line=lineno, base=base, source=name)
        text = (row.get(cols["text"]) or "").strip() if cols["text"] else ""
        if text:
            item.fields["text"].append(text)
    return items


def _fields(row: dict, key: str, header: list[str], cols: dict[str, str | None]) -> dict[str, Any]:
    """The manifest fields of a new item from its first row (captions added after)."""
    fields: dict[str, Any] = {"id": key}
    for m in ("image", "audio", "video"):
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
    return fields
