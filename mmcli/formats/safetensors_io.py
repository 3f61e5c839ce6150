"""The safetensors container, read and written with the standard library only.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{"__metadata__": {str: str}, NAME: {"dtype", "shape", "data_offsets"}, ...}``) and the
tensor data. :func:`parse_header` validates everything a reader relies on before any
tensor is touched: the JSON (no absurd nesting), every dtype, every shape (non-negative
integers), that each tensor's byte range matches its shape and lies inside the file, and
that no two tensors share bytes. :func:`read_header` reads only the header of a file
(opened through :mod:`mmcli.formats.userfiles`: a FIFO is refused, never opened).

Writing: safetensors' own ``save`` emits the metadata in hash order, so two identical
runs would give files that differ in their header bytes. :func:`save_numpy` and
:func:`save_torch` rewrite the header canonically (metadata keys sorted, tensors in data
order, compact JSON), so identical content gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.userfiles import open_file

#: largest header accepted (safetensors' own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000
#: most dimensions a tensor may have
MAX_DIMS = 16

# safetensors dtype code -> (numpy dtype name, torch dtype name, itemsize)
DTYPES = {
    "BOOL": ("bool", "bool", 1),
    "U8": ("uint8", "uint8", 1),
    "I8": ("int8", "int8", 1),
    "I16": ("int16", "int16", 2),
    "U16": ("uint16", "uint16", 2),
    "F16": ("float16", "float16", 2),
    "BF16": (None, "bfloat16", 2),
    "I32": ("int32", "int32", 4),
    "U32": ("uint32", "uint32", 4),
    "F32": ("float32", "float32", 4),
    "I64": ("int64", "int64", 8),
    "U64": ("uint64", "uint64", 8),
    "F64": ("float64", "float64", 8),
}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
INT_CODES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
_NAME_TO_CODE = {v[1]: k for k, v in DTYPES.items()}


def torch_dtype_code(dtype_name: str) -> str:
    """safetensors dtype code of a torch/numpy dtype name ("float16" -> "F16")."""
    return _NAME_TO_CODE[dtype_name]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ----------------------------------------------------------------------- reading


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, t: Any, where: str) -> TensorInfo:
    if not isinstance(t, dict):
        raise BadInput(f"not a safetensors file (entry {name!r} is not an object)", where=where)
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadInput(
            f"unsupported dtype {_show(dtype)} for tensor {name!r}",
            where=where,
            hint=f"safetensors dtypes: {', '.join(DTYPES)}",
        )
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) for d in shape):
        raise BadInput(
            f"not a safetensors file (bad shape {_show(shape)} for tensor {name!r}: "
            "expected a list of integers)",
            where=where,
        )
    if any(d < 0 for d in shape):
        raise BadInput(
            f"not a safetensors file (negative dimension in the shape {shape} of {name!r})",
            where=where,
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
        raise BadInput(
            f"not a safetensors file (bad data_offsets {_show(offsets)} for tensor {name!r}: "
            "expected [begin, end])",
            where=where,
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _show(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_header(
    raw: bytes, where: str, size: int | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensor infos, metadata, data start).

    ``raw`` starts at the file's first byte (the whole file, or at least the header);
    ``size``: the whole file's size in bytes (``len(raw)`` when None). BadInput, one
    line, for anything a reader could trip over.
    """
    if len(raw) < 8:
        raise _not_safetensors(raw, "too short", where)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or len(raw) < 8 + n:
        raise _not_safetensors(raw[:8], "bad header length", where)
    try:
        header = safejson.loads(bytes(raw[8 : 8 + n]).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("not a safetensors file (header is not UTF-8)", where=where) from None
    except safejson.JSONError as e:
        raise BadInput(f"not a safetensors file (header: {e})", where=where) from None
    if not isinstance(header, dict):
        raise BadInput("not a safetensors file (header is not a JSON object)", where=where)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(
            "corrupt safetensors metadata (expected a map of strings to strings)", where=where
        )
    tensors = {name: _entry(name, t, where) for name, t in header.items()}
    total = len(raw) if size is None else size
    data_start = 8 + n
    for name, info in tensors.items():
        nbytes = info.numel * DTYPES[info.dtype][2]
        if not 0 <= info.begin <= info.end or info.end - info.begin != nbytes:
            raise BadInput(
                f"corrupt safetensors file (the byte range of {name!r} does not fit its "
                f"shape {list(info.shape)} and dtype {info.dtype})",
                where=where,
            )
        if data_start + info.end > total:
            raise BadInput(
                f"truncated file: tensor {name!r} ends at byte {data_start + info.end:,} "
                f"but the file has {total:,}",
                where=where,
                hint="the file was cut short (an interrupted copy or write); recreate it",
            )
    _check_disjoint(tensors, where)
    return tensors, metadata, data_start


def _not_safetensors(head: bytes, why: str, where: str) -> BadInput:
    """The error for a file that is not safetensors; text that looks like a manifest (JSON
    lines, a JSON or CSV file) says to preprocess it first."""
    text = bytes(head).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if text in (b"{", b"["):
        return BadInput(
            "this looks like a manifest (JSON text), not a safetensors tensor file",
            where=where,
            hint="turn raw data into tensor shards first: mmcli preprocess MANIFEST -o DIR, then pass DIR",
        )
    return BadInput(f"not a safetensors file ({why})", where=where)


def _check_disjoint(tensors: dict[str, TensorInfo], where: str) -> None:
    ranges = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise BadInput(
                f"corrupt safetensors file (tensors {a!r} and {b!r} overlap)", where=where
            )


def read_header(
    path: str | os.PathLike, what: str = "file"
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensor infos, metadata, data start) of a safetensors file, reading only its header;
    ``what`` names the file in errors ("checkpoint not found")."""
    where = str(path)
    with open_file(path, what) as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(head, "too short", where)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _not_safetensors(head, "bad header length", where)
        return parse_header(head + f.read(n), where, os.fstat(f.fileno()).st_size)


# ----------------------------------------------------------------------- writing


def canonical(raw: bytes) -> bytes:
    """The same safetensors file with a canonical header: metadata keys sorted, tensors
    in data order, compact JSON padded to 8 bytes. The data bytes are unchanged."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    metadata = header.pop("__metadata__", None)
    out: dict[str, Any] = {}
    if metadata is not None:
        out["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(header, key=lambda k: (header[k]["data_offsets"], k)):
        t = header[name]
        out[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": t["data_offsets"]}
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def save_numpy(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of numpy arrays, with a canonical header (see :func:`canonical`)."""
    from safetensors.numpy import save

    return canonical(save(tensors, metadata=metadata))


def save_torch(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of torch tensors, with a canonical header (see :func:`canonical`)."""
    from safetensors.torch import save

    return canonical(save(tensors, metadata=metadata))
