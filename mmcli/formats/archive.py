"""Files inside tar archives and parquet tables, named by path: ``data/00000.tar#000123.jpg``,
``data/00000.parquet#jpg/17`` (column ``jpg``, row 17).

webdataset tars (img2dataset's output, CLIP_benchmark's datasets) hold each sample's
files as tar members. The importer names a member ``ARCHIVE#MEMBER`` in the item's
fields, so items stay plain JSON and a worker process reads one member with one seek:

    with open_member("data/00000.tar#000123.jpg") as f:   # a BytesIO
        ...

Each process indexes an archive once (the tar headers: names, data offsets and sizes;
:func:`members`) and keeps the last few indices. Members that run past the end of a
truncated archive are left out of its index, and :func:`members` reports the truncation.
Only regular members are indexed; links and devices never are. A parquet cell is read
with its row group (pyarrow, the ``parquet`` extra), and each process keeps the last two
row groups it read, so items in table order cost one read per row group.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

from mmcli.errors import BadInput

#: what separates the archive from the member in a member path
SEP = "#"
ARCHIVE_EXTS = (".tar", ".parquet")


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data in the archive
    size: int


@dataclass
class ArchiveIndex:
    path: str
    members: list[Member] = field(default_factory=list)
    by_name: dict[str, Member] = field(default_factory=dict)
    #: why the index stops early (a truncated or corrupt archive), else None
    truncated: str | None = None


def split_member(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(archive, member)`` when ``path`` names a member of a tar archive (and is not
    itself an existing file), else None."""
    text = os.fspath(path)
    if SEP not in text or os.path.lexists(text):
        return None
    archive, member = text.split(SEP, 1)
    if not archive.lower().endswith(ARCHIVE_EXTS) or not member:
        return None
    return archive, member


def member_path(archive: str | os.PathLike, name: str) -> str:
    return f"{os.fspath(archive)}{SEP}{name}"


def members(archive: str | os.PathLike) -> ArchiveIndex:
    """The regular members of ``archive`` in archive order (cached per process, keyed on
    the file's size and modification time). BadInput when it is not a tar archive."""
    p = os.fspath(archive)
    try:
        st = os.stat(p)
    except OSError as e:
        raise BadInput(f"cannot read the archive ({e.strerror or e})", where=p) from None
    return _index(p, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _index(path: str, size: int, mtime_ns: int) -> ArchiveIndex:
    index = ArchiveIndex(path)
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(path, mode="r:"))
        except tarfile.ReadError as e:
            raise BadInput(f"not a tar archive ({e})", where=path) from None
        try:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    index.truncated = f"truncated at member {info.name}"
                    break
                m = Member(info.name, info.offset_data, info.size)
                index.members.append(m)
                index.by_name[m.name] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            index.truncated = f"unreadable after {len(index.members)} members ({e})"
    return index


def read_member(archive: str | os.PathLike | BinaryIO, member: Member) -> bytes:
    """The bytes of ``member``, from the archive's path or from the archive already open
    (one handle for many members)."""
    if isinstance(archive, str | os.PathLike):
        with open(archive, "rb") as f:
            return read_member(f, member)
    archive.seek(member.offset)
    data = archive.read(member.size)
    if len(data) != member.size:
        raise BadInput(f"member {member.name} is truncated", where=getattr(archive, "name", None))
    return data


def open_member(path: str | os.PathLike) -> io.BytesIO:
    """The bytes of the member ``ARCHIVE#MEMBER`` as a file object; BadInput when the
    archive or the member is missing."""
    parts = split_member(path)
    if parts is None:
        raise BadInput("not an archive member path (ARCHIVE.tar#MEMBER)", where=os.fspath(path))
    archive, name = parts
    if archive.lower().endswith(".parquet"):
        return io.BytesIO(parquet_cell(archive, name))
    found = members(archive).by_name.get(name)
    if found is None:
        raise BadInput(f"no member {name!r} in the archive", where=archive)
    return io.BytesIO(read_member(archive, found))


def member_exists(path: str | os.PathLike) -> bool:
    parts = split_member(path)
    if parts is None:
        return False
    try:
        if parts[0].lower().endswith(".parquet"):
            return bool(parquet_cell(*parts))
        return parts[1] in members(parts[0]).by_name
    except BadInput:
        return False


# ------------------------------------------------------------------------ parquet


def cell_name(column: str, row: int) -> str:
    return f"{column}/{row}"


def parquet_cell(path: str, name: str) -> bytes:
    """The bytes in cell ``COLUMN/ROW`` of the parquet file ``path``."""
    column, _, row = name.rpartition("/")
    if not column or not row.isdigit():
        raise BadInput(f"bad parquet cell {name!r} (expected COLUMN/ROW)", where=path)
    st = os.stat(path)
    groups = _row_groups(path, st.st_size, st.st_mtime_ns)
    r = int(row)
    for g, (lo, hi) in enumerate(groups):
        if lo <= r < hi:
            value = _group_column(path, st.st_size, st.st_mtime_ns, g, column)[r - lo].as_py()
            if not isinstance(value, bytes | bytearray) or not value:
                raise BadInput(f"row {r} has no bytes in column {column!r}", where=path)
            return bytes(value)
    raise BadInput(f"no row {r} in the table", where=path)


def open_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from mmcli.errors import MissingDependency

        raise MissingDependency("pyarrow", "parquet", "parquet input") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise BadInput(f"not a parquet file ({e})", where=path) from None


@lru_cache(maxsize=4)
def _opened(path: str, size: int, mtime_ns: int):
    """The open ParquetFile (its footer read once per process and version of the file)."""
    return open_parquet(path)


@lru_cache(maxsize=8)
def _row_groups(path: str, size: int, mtime_ns: int) -> list[tuple[int, int]]:
    meta = _opened(path, size, mtime_ns).metadata
    out, at = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        out.append((at, at + n))
        at += n
    return out


@lru_cache(maxsize=2)
def _group_column(path: str, size: int, mtime_ns: int, group: int, column: str):
    return _opened(path, size, mtime_ns).read_row_group(group, columns=[column]).column(0)
