"""``parquet``: a table of paths + captions (+ labels, splits), or img2dataset's parquet
output with the encoded images in a bytes column.

Columns are found as in CSV (``--image-col``, ``--text-col`` ... or the usual names; a
bytes column named ``jpg``, ``png``, ``webp`` or ``image`` is the image), and rows with
the same id are one item with several captions. Image bytes are not read here: an item's
``image`` is ``FILE.parquet#COLUMN/ROW`` and the decoding workers read the row group it
is in (:mod:`mmcli.formats.archive`). Image URLs are not downloaded: such rows are
skipped and listed (fetch the images first, with img2dataset). Needs pyarrow
(``pip install "mmcli[parquet]"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcli.data.importers.layout import ImportOptions, files_of, log
from mmcli.data.importers.table import DEFAULT_COLUMNS, find_columns, rows_to_items
from mmcli.errors import MissingDependency
from mmcli.formats.archive import cell_name, member_path, open_parquet
from mmcli.formats.manifest import Item

#: bytes columns taken for the image when no --image-col names one (img2dataset's names)
BYTES_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")


def parquet_items(path: str, opts: ImportOptions) -> Iterator[Item]:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingDependency("pyarrow", "parquet", "parquet input") from None
    items: dict[str, Item] = {}
    for f in files_of(path, ".parquet"):
        for key, item in _table_items(f, opts).items():
            if key in items:
                items[key].fields["text"] = items[key].texts + item.texts
            else:
                items[key] = item
    yield from items.values()


def _table_items(f: Path, opts: ImportOptions) -> dict[str, Item]:
    import pyarrow as pa

    pf = open_parquet(str(f))
    schema = pf.schema_arrow
    binary = [n for n in schema.names if pa.types.is_binary(schema.field(n).type)
              or pa.types.is_large_binary(schema.field(n).type)]  # fmt: skip
    image_bytes = _bytes_column(binary, opts)
    columns = [n for n in schema.names if n not in binary]
    header = columns + ([image_bytes] if image_bytes else [])
    cols = find_columns(header, _with_image(opts, image_bytes), str(f))
    log.info("parquet %s: %d rows; columns: %s", f.name, pf.metadata.num_rows,
             ", ".join(f"{k}={v}" for k, v in cols.items() if v))  # fmt: skip
    rows = _rows(pf, columns, image_bytes, cols["image"], f, opts)
    return rows_to_items(rows, header, cols, opts, f.parent, f.name, start=0)


def _bytes_column(binary: list[str], opts: ImportOptions) -> str | None:
    """The bytes column holding the images: ``--image-col`` if it is one, else the first
    of img2dataset's names and then the usual image column names."""
    if opts.image_col is not None:
        return opts.image_col if opts.image_col in binary else None
    names = (*BYTES_IMAGE_COLUMNS, *DEFAULT_COLUMNS["image"])
    return next((c for c in names if c in binary), None)


def _with_image(opts: ImportOptions, image_bytes: str | None) -> ImportOptions:
    if image_bytes is None or opts.image_col is not None:
        return opts
    from dataclasses import replace

    return replace(opts, image_col=image_bytes)


def _rows(pf, columns, image_bytes, image_col, f: Path, opts) -> Iterator[dict[str, Any]]:
    """Row dicts of strings, in table order, the bytes column as a cell path; a row whose
    image is a URL is listed as skipped, not handed on."""
    row, resolved = 0, f.resolve()
    for batch in pf.iter_batches(columns=columns or None, batch_size=4096):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            out: dict[str, Any] = {c: _text(data[c][i]) for c in columns}
            if image_bytes:
                out[image_bytes] = member_path(resolved, cell_name(image_bytes, row))
            if image_col and _is_url(out.get(image_col)):
                _reject(opts, f, row, out[image_col])
            else:
                yield out
            row += 1


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _reject(opts: ImportOptions, f: Path, row: int, url: str) -> None:
    reason = f"image is a URL ({url[:80]}): mmcli does not download; fetch them first (img2dataset)"
    opts.reject(reason, f"row {row} of {f}", where=str(f), row=row, id=None)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return str(value)
