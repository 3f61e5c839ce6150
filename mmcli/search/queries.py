"""Queries for :class:`~mmcli.search.retrieve.Retriever`: where they come from and how
raw ones (text, image, audio or video files) become embeddings.

    batches = line_query_batches(sys.stdin)           # JSONL lines, answered as they arrive
    batches = feature_query_batches(["q.safetensors"], retriever)   # every row a query
    batches = [value_queries(text=["a red circle"], ids=["toy-00042"])]
    for line in retriever.run(batches):
        print(json.dumps(line))

Raw queries are preprocessed exactly as ``mmcli preprocess`` prepared the model's training
data, from the table specs stored in the checkpoint (``model.config.inputs``): the text
tokenizer and context length, the image size, the audio sample rate and length, the
video frames' sampling.

JSONL query lines (``retrieve`` on stdin) are objects with exactly one of
``{"text": "..."}``, ``{"image": "path"}``, ``{"audio": "path"}``, ``{"video": "path"}`` or
``{"id": "item"}``
(other keys are kept and echoed back). Relative paths resolve against the current folder.
A recommendation ("more like these", :mod:`mmcli.search.recommend`) is
``{"like": [ids], "exclude": [ids]}`` or a history line ``{"user": ..., "history": [ids]}``
(:func:`read_histories` reads a file of them).
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mmcli.data.audio import AudioDecodeError, audio_transform_from_spec
from mmcli.data.image import ImageDecodeError, image_transform_from_spec
from mmcli.data.text import tokenizer_from_spec
from mmcli.data.video import VideoDecodeError, video_transform_from_spec
from mmcli.errors import BadInput
from mmcli.formats import safejson
from mmcli.formats.features import FeatureSet
from mmcli.formats.tensorfile import where_paths
from mmcli.models.multimodal import MultimodalModel

QUERY_KEYS = ("text", "image", "audio", "video", "id")


@dataclass
class Query:
    """One query: ``kind`` is text / image / audio / video / id / vector / like; ``raw`` is echoed."""

    kind: str
    value: Any
    raw: dict[str, Any]


@dataclass
class LikeQuery:
    """The value of a ``like`` query: recommend items like ``like``, never ``exclude``.
    ``where`` (``line 3 of h.jsonl``) names the line in errors about its ids."""

    like: list[str]
    exclude: list[str]
    where: str | None = None  # None: given as options (--like, --exclude)
    key: str = "like"  # the field the liked ids came in: like | history


def _ids(value: Any, key: str, where: str | None, *, empty: bool = False) -> list[str]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]  # one id given bare
    ok = isinstance(value, list) and all(
        isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) for v in value
    )
    if not ok or (not value and not empty):
        raise BadInput(
            f'"{key}" must be a list of item ids' + ("" if empty else " (at least one)"),
            where=where,
            hint='e.g. {"like": ["toy-00003", "toy-00010"]}',
        )
    return [str(v) for v in value]


def like_query(obj: dict[str, Any], where: str | None = "query") -> Query:
    """A ``{"like": [...], "exclude": [...]}`` or ``{"history": [...]}`` object as a query."""
    if "like" in obj and "history" in obj:
        raise BadInput('a query has "like" or "history", not both', where=where)
    key = "like" if "like" in obj else "history"
    like = _ids(obj[key], key, where)
    exclude = _ids(obj.get("exclude", []), "exclude", where, empty=True)
    return Query("like", LikeQuery(like, exclude, where, key), obj)


def read_histories(path: str) -> list[Query]:
    """Every line of a history file (``{"user": ..., "history": [ids]}``) as a like query;
    a line that is not one is a :class:`BadInput` naming it (nothing is answered)."""
    from mmcli.formats.userfiles import open_text

    out = []
    with open_text(path, "history file") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {lineno} of {path}"
            try:
                obj = safejson.loads(line)
            except safejson.JSONError as e:
                raise BadInput(str(e), where=where) from None
            if not isinstance(obj, dict) or "history" not in obj:
                raise BadInput(
                    'a history line is an object with "history"', where=where,
                    hint='e.g. {"user": "u1", "history": ["toy-00003", "toy-00010"]}',
                )  # fmt: skip
            out.append(like_query(obj, where))
    if not out:
        raise BadInput("the history file has no history lines", where=path)
    return out


def query_from_obj(obj: Any, where: str = "query") -> Query:
    if not isinstance(obj, dict):
        raise BadInput(
            f"a query must be a JSON object, got {type(obj).__name__}",
            where=where,
            hint='e.g. {"text": "a red circle"}',
        )
    keys = [k for k in QUERY_KEYS if k in obj]
    likes = [k for k in ("like", "history") if k in obj]
    if likes and not keys:
        return like_query(obj, where)
    if likes:
        keys += likes  # one kind of query per line
    if len(keys) != 1:
        raise BadInput(
            "a query needs exactly one of text, image, audio, video, id or like"
            + (f" (got {', '.join(keys)})" if keys else ""),
            where=where,
            hint='e.g. {"text": "a red circle"} or {"image": "photo.jpg"}',
        )
    kind = keys[0]
    value = obj[kind]
    if kind == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise BadInput(f'"{kind}" must be a non-empty string', where=where)
    return Query(kind=kind, value=value, raw=obj)


def parse_query_line(line: str, where: str) -> Query:
    try:
        obj = safejson.loads(line)
    except safejson.JSONError as e:
        raise BadInput(
            str(e),
            where=where,
            hint='one query object per line, e.g. {"text": "a red circle"}',
        ) from None
    return query_from_obj(obj, where)


class QueryEncoder:
    """Encodes raw text / image / audio / video queries with a :class:`MultimodalModel`."""

    def __init__(self, model: Any, device: Any = "cpu", precision: str = "fp32"):
        """``precision`` bf16 on the CPU casts ``model`` to bfloat16 (in place); on CUDA
        bf16 / fp16 autocast."""
        from mmcli import runtime

        self.device = device
        dev = runtime.resolve_device(str(device))
        self.precision = runtime.inference_precision(precision, dev)
        self.model = runtime.cast_for_inference(model, self.precision, dev)
        self._dev = dev
        self._autocast = lambda: runtime.autocast(dev, self.precision)
        self._transforms: dict[str, Any] = {}

    def _raw(self, modality: str) -> None:
        """A ``features`` encoder whose backbone the model records (trained on frozen
        features): the backbone rebuilt and chained before it, once."""
        from mmcli import runtime
        from mmcli.models.backbones import chainable, with_backbones

        if not hasattr(self.model, "config") or chainable(self.model, modality) is None:
            return
        model = with_backbones(self.model, [modality])
        self.model = runtime.cast_for_inference(model, self.precision, self._dev)

    def _spec(self, modality: str) -> dict[str, Any]:
        modalities = getattr(self.model, "modalities", None) or list(self.model.config.encoders)
        if modality not in modalities:
            raise BadInput(
                f"the model has no {modality} encoder (it has: {', '.join(modalities)})",
                hint="use a checkpoint trained with that modality",
            )
        encoder = self.model.config.encoders.get(modality) or {}
        if encoder.get("name") == "features":
            spec = ((self.model.config.extra or {}).get("features") or {}).get(modality) or {}
            backbone = spec.get("encoder")
            raise BadInput(
                f"the model's {modality} encoder takes precomputed features"
                + (f" (of {backbone})" if backbone else "")
                + f", not raw {modality} queries, and its features do not record how to rebuild "
                "that backbone",
                hint="extract the queries with that backbone and search with their features "
                "(retrieve --queries FEATURES), or train on features written by this mmcli",
            )
        return dict((self.model.config.inputs or {}).get(modality) or {})

    def transform(self, modality: str):
        if modality not in self._transforms:
            spec = self._spec(modality)
            if modality == "text":
                self._transforms[modality] = tokenizer_from_spec(spec)
            elif modality == "image":
                self._transforms[modality] = image_transform_from_spec(spec)
            elif modality == "audio":
                self._transforms[modality] = audio_transform_from_spec(spec)
            elif modality == "video":
                self._transforms[modality] = video_transform_from_spec(spec)
            else:
                raise BadInput(f"cannot encode raw {modality} queries")
        return self._transforms[modality]

    def inputs(self, modality: str, values: list[str]):
        """The model's input rows for raw values (captions or file paths)."""
        self._raw(modality)
        encoders = dict(getattr(self.model, "encoders", {}))
        encoder = encoders.get(modality)
        if getattr(encoder, "takes_text", False):  # a pretrained model's own tokenizer
            return encoder.tokenize(list(values))
        t = self.transform(modality)
        if modality == "text":
            tokens, _ = t.encode_batch(values)
            return torch.from_numpy(tokens)
        rows = []
        for v in values:
            rows.append(self._load(modality, t, v))
        return torch.from_numpy(np.stack(rows))

    @staticmethod
    def _load(modality: str, transform, value: str):
        path = Path(value).expanduser()
        try:
            return transform(path)
        except (ImageDecodeError, AudioDecodeError, VideoDecodeError) as e:
            raise BadInput(str(e), where=str(value)) from None

    def encode(self, modality: str, values: list[str], batch_size: int = 64):
        """float32 [len(values), D] normalised embeddings."""
        out = []
        with torch.inference_mode():
            for b0 in range(0, len(values), batch_size):
                x = self.inputs(modality, values[b0 : b0 + batch_size]).to(self.device)
                with self._autocast():
                    out.append(self.model.encode(modality, x, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def load_model(path: str, device: Any = "cpu", weights: str | None = None) -> MultimodalModel:
    """A :class:`MultimodalModel` from a checkpoint, ``open_clip:ARCH`` or ``hf:DIR``
    (:func:`mmcli.models.load_model`)."""
    from mmcli.models.pretrained import load_model as load

    return load(path, weights=weights, device=device)


# --------------------------------------------------------------------- query batches


def value_queries(
    *,
    text: Iterable[str] = (),
    image: Iterable[str] = (),
    audio: Iterable[str] = (),
    video: Iterable[str] = (),
    ids: Iterable[str] = (),
) -> list[Query]:
    """Queries given as values: captions, image / audio / video file paths, item ids."""
    out = []
    pairs = (("text", text), ("image", image), ("audio", audio), ("video", video), ("id", ids))
    for kind, values in pairs:
        for v in values or ():
            out.append(Query(kind, v, {kind: v}))
    return out


def feature_query_batches(
    paths: list[str], retriever: Any, table: str | None = None, size: int = 1024
) -> Iterator[list[Query]]:
    """Every row of the feature files ``paths`` as a vector query, ``size`` at a time.

    ``table``: the table holding the query rows (default: the only one, else the
    retriever's target). Each query echoes ``{"id", "table", "row"}`` (the row within
    its item). A dimension that differs from the index is one :class:`BadInput`.
    """
    fs = FeatureSet.open(paths)
    if table is None:
        table = fs.tables[0] if len(fs.tables) == 1 else retriever.target
    x, items = fs.table(table)
    if x.shape[1] != retriever.index_dim:  # one line, exit 2: not an error per query row
        raise BadInput(
            f"the {table} queries have {x.shape[1]} dimensions, the {retriever.target} index "
            f"{retriever.index_dim}",
            where=where_paths(fs.paths),
            hint="extract queries and index with the same model (or the same backbone)",
        )
    items = items.tolist()
    seen: dict[int, int] = {}
    batch = []
    for r in range(x.shape[0]):
        item = items[r]
        j = seen.get(item, 0)
        seen[item] = j + 1
        batch.append(Query("vector", x[r], {"id": fs.ids[item], "table": table, "row": j}))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def line_query_batches(
    stream: IO | None = None, max_batch: int = 256, name: str = "<stdin>"
) -> Iterator[list[Query | BadInput]]:
    """Batches of parsed JSONL query lines from ``stream`` (default: ``sys.stdin``).

    A batch is whatever lines have arrived (at most ``max_batch``): the reader never waits
    for more while a complete line is ready, so a long-running caller answers each line
    as it comes. A bad line is a :class:`BadInput` in its place (``raw`` holds its line
    number and text), for :meth:`Retriever.run` to answer or raise; blank lines are
    skipped.
    """
    lineno = 0
    for lines in read_line_batches(sys.stdin if stream is None else stream, max_batch):
        batch = []
        for raw in lines:
            lineno += 1
            if raw.strip():
                batch.append(_parse_raw_line(raw, lineno, name))
        if batch:
            yield batch


def _parse_raw_line(raw: bytes, lineno: int, name: str) -> Query | BadInput:
    where = f"line {lineno} of {name}"
    try:
        return parse_query_line(raw.decode("utf-8"), where)
    except UnicodeDecodeError:
        e = BadInput("not valid UTF-8", where=where)
        e.raw = {"line": lineno}
        return e
    except BadInput as e:
        e.raw = {"line": lineno, "text": raw.decode("utf-8", "replace").strip()}
        return e


def read_line_batches(stream: IO, max_batch: int) -> Iterator[list[bytes]]:
    """Lines of ``stream`` as bytes, in batches of the lines ready (see
    :func:`line_query_batches`). A stream without a file descriptor is read line by line."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests): line by line
        for line in getattr(stream, "buffer", stream):
            yield [line if isinstance(line, bytes) else line.encode("utf-8")]
        return
    buf = b""
    eof = False
    while not eof or buf:
        while not eof and (b"\n" not in buf or _readable(fd)) and buf.count(b"\n") < max_batch:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                eof = True
            buf += chunk
        parts = buf.split(b"\n")
        if eof:
            lines, buf = parts, b""
        else:
            lines, buf = parts[:-1], parts[-1]
        for i in range(0, len(lines), max_batch):
            yield lines[i : i + max_batch]


def _readable(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return False
