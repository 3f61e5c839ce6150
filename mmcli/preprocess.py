"""``preprocess``: raw images, captions and audio -> normalized tensor shards.

    from mmcli.preprocess import PreprocessConfig, preprocess
    summary = preprocess("data/manifest.jsonl", "out/tensors", config=PreprocessConfig(image_size=64))

Items are read from any supported layout (:mod:`mmcli.data.importers`), split into
shards of ``shard_size`` items, decoded (optionally in worker processes) and written as
safetensors shards, each atomically. An item whose image or audio cannot be decoded is
skipped as a whole (``on_error="skip"``, listed in ``OUT/errors.jsonl``) or stops the run
(``"fail"``). A killed run started again with ``resume=True`` keeps the finished shards.
At the end ``OUT/manifest.jsonl`` lists the kept items in row order, with paths relative
to OUT, and ``OUT/preprocess.json`` records the options and the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmcli.data.audio import AudioDecodeError, AudioTransform
from mmcli.data.captions import RAW_TEXT
from mmcli.data.image import ImageDecodeError, ImageTransform, image_options_of, image_transform_of
from mmcli.data.importers import ImportOptions, import_items, manifest_in_folder
from mmcli.data.text import ByteTokenizer
from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_open, is_stdio
from mmcli.formats.manifest import (
    MANIFEST_NAME,
    MODALITY_FIELDS,
    Item,
    file_sha256,
    item_to_json,
    manifest_source,
)
from mmcli.formats.tensorfile import (
    SHARD_RE,
    Shard,
    ShardFile,
    serialize_shard,
    shard_name,
    write_shard,
)
from mmcli.progress import ProgressFactory, null_progress

log = logging.getLogger("mmcli")

SHARD_PREFIX = "data"
STATE_FILE = "preprocess.json"
ERRORS_FILE = "errors.jsonl"
CHUNK = 16  # items per worker task


@dataclass
class PreprocessConfig:
    image_size: int = 224
    context_length: int = 77
    lowercase: bool = False
    sample_rate: int = 16000
    audio_seconds: float = 5.0
    shard_size: int = 1000
    workers: int = 0
    on_error: str = "skip"
    split: str | None = None
    modalities: list[str] | None = None  # None = every modality the items have
    #: a pretrained model's image transform (``--like``), see mmcli.data.image.ImageTransform
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    resize_size: int | None = None
    image_backend: str = "mmcli"
    fill: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "context_length", "sample_rate", "shard_size"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name.replace('_', '-')} must be positive")
        if self.audio_seconds <= 0:
            raise BadInput("audio-seconds must be positive")
        if self.on_error not in ("skip", "fail"):
            raise BadInput("on-error must be skip or fail")
        if self.modalities is not None:
            unknown = set(self.modalities) - set(MODALITY_FIELDS)
            if unknown:
                raise BadInput(
                    f"unknown modality {sorted(unknown)[0]!r}",
                    hint=f"use {', '.join(MODALITY_FIELDS)}",
                )

    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer(self.context_length, self.lowercase)

    def image_transform(self) -> ImageTransform:
        return image_transform_of(self)

    def specs(self) -> dict[str, dict[str, Any]]:
        return {
            "image": self.image_transform().spec(),
            "text": self.tokenizer().spec(),
            "audio": AudioTransform(self.sample_rate, self.audio_seconds).spec(),
        }

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (workers/on_error do not)."""
        d = asdict(self)
        for k in ("workers", "on_error"):
            d.pop(k)
        return image_options_of(self, d)


# ---------------------------------------------------------------- decoding


def _decode_chunk(task: tuple) -> tuple[int, list[tuple]]:
    """Worker: decode the image/audio files of a chunk of items.

    Returns (chunk id, [(image uint8 [3,S,S] | None, audio float16 [N] | None,
    (field, reason) | None)] in item order).
    """
    chunk_id, files, image_tf, sample_rate, seconds = task
    audio_tf = AudioTransform(sample_rate, seconds)
    out = []
    for image_path, audio_path in files:
        image = audio = error = None
        try:
            if image_path is not None:
                try:
                    image = image_tf(image_path)
                except ImageDecodeError as e:
                    error = ("image", str(e))
            if error is None and audio_path is not None:
                try:
                    audio = audio_tf(audio_path).astype("float16")
                except AudioDecodeError as e:
                    error = ("audio", str(e))
        except Exception as e:  # never let one bad file kill a worker pool
            error = (
                "image" if image is None and image_path else "audio",
                f"{type(e).__name__}: {e}",
            )
        out.append((image, audio, error))
    return chunk_id, out


def _pool_context() -> mp.context.BaseContext:
    # fork is fastest, but forking a process that already runs torch's thread pools
    # (e.g. inside a test session) can deadlock: use forkserver then.
    if sys.platform != "win32" and "torch" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if sys.platform != "win32" else "spawn")


# ---------------------------------------------------------------- the run


@dataclass
class _ShardPlan:
    index: int
    items: list[Item]
    chunks: int = 0
    results: dict[int, list[tuple]] = field(default_factory=dict)


def _plan_items_hash(items: list[Item]) -> str:
    """sha256 of the items in order: ids and every field (captions, paths, labels), so a
    resume notices any edit of the input's items (not of the image or audio files)."""
    h = hashlib.sha256()
    for it in items:
        h.update(item_to_json(it).encode("utf-8") + b"\n")
    return h.hexdigest()


def _collect_items(
    input: str, fmt: str, config: PreprocessConfig, opts: ImportOptions
) -> tuple[str, list[Item]]:
    fmt, stream = import_items(input, fmt, opts)
    items = list(stream)
    if config.split is not None:
        if items and not any(it.split for it in items):
            raise BadInput(
                f"--split {config.split}: no item has a split",
                where=input,
                hint="drop --split, or add a split field to the items",
            )
        items = [it for it in items if it.split == config.split]
    if not items:
        if opts.errors and config.split is None:
            first = opts.errors[0]
            raise BadInput(
                f"no items to preprocess: all {len(opts.errors)} were rejected "
                f"(first, line {first.get('line')}: {first.get('reason')})",
                where=input,
                hint=f"is --format {fmt} right for this file?",
            )
        raise BadInput(
            "no items to preprocess" + (f" in split {config.split!r}" if config.split else ""),
            where=input,
        )
    return fmt, items


def _modalities(items: list[Item], config: PreprocessConfig) -> list[str]:
    present = [m for m in MODALITY_FIELDS if any(it.has(m) for it in items)]
    if config.modalities is not None:
        missing = [m for m in config.modalities if m not in present]
        if missing:
            raise BadInput(
                f"no item has {missing[0]}", hint=f"the items have: {', '.join(present)}"
            )
        present = [m for m in present if m in config.modalities]
    if not present:
        raise BadInput("items have no image, text or audio")
    return present


class _Output:
    """The output folder: ownership checks, resume state, finished shards."""

    def __init__(self, out: str, state: dict[str, Any], resume: bool, overwrite: bool, count: int):
        self.dir = Path(out)
        self.count = count
        if self.dir.exists() and not self.dir.is_dir():
            raise BadInput(
                "output exists and is not a folder", where=out, hint="pass a folder path"
            )
        state_path = self.dir / STATE_FILE
        old = None
        if state_path.exists():
            try:
                old = json.loads(state_path.read_text())
            except json.JSONDecodeError:
                old = {}
        owned = self._owned_files()
        others = [p for p in self.dir.iterdir() if p not in owned] if self.dir.exists() else []
        if old is not None and not overwrite:
            if not resume:
                raise BadInput(
                    "output folder already holds a preprocess run",
                    where=out,
                    hint="use --resume to finish it, --overwrite to replace it, or another -o",
                )
            diff = [
                k
                for k in ("input", "format", "options", "items", "items_sha256")
                if old.get(k) != state.get(k)
            ]
            if diff:
                names = {"items_sha256": "items (ids, captions, paths or labels changed)"}
                raise BadInput(
                    "cannot resume: the run in this folder had different "
                    + ", ".join(names.get(k, k) for k in diff),
                    where=out,
                    hint="use --overwrite to start again, or another -o",
                )
        elif old is None and others and not overwrite:
            raise BadInput(
                "output folder is not empty and holds no preprocess run",
                where=out,
                hint="pick an empty or new folder, or use --overwrite (only mmcli's files are replaced)",
            )
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in owned:
                p.unlink()
        self.done: set[int] = set()
        if resume and not overwrite:
            for i in range(count):
                path = self.shard_path(i)
                if path.exists():
                    try:
                        if ShardFile(path).shard_position == (i, count):
                            self.done.add(i)
                    except BadInput:
                        pass
        with atomic_open(state_path) as f:
            json.dump({**state, "complete": False}, f, indent=2, ensure_ascii=False)

    def discard_if_unstarted(self) -> None:
        """A run stopped by bad input before it finished a shard leaves nothing behind
        (a run with finished shards keeps its state, for --resume)."""
        if self.done or any(self.shard_path(i).exists() for i in range(self.count)):
            return
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        if self.created and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def _owned_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        owned = [
            self.dir / n
            for n in (STATE_FILE, MANIFEST_NAME, ERRORS_FILE)
            if (self.dir / n).exists()
        ]
        owned += [
            p
            for p in self.dir.iterdir()
            if (m := SHARD_RE.match(p.name)) and m["name"] == SHARD_PREFIX
        ]
        return owned

    def shard_path(self, index: int) -> Path:
        return self.dir / shard_name(SHARD_PREFIX, index, self.count)


def preprocess(
    input: str,
    out: str,
    *,
    fmt: str = "auto",
    config: PreprocessConfig | None = None,
    import_options: ImportOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFactory = null_progress,
) -> dict[str, Any]:
    """Preprocess ``input`` into tensor shards in folder ``out`` (``-``: one file on stdout).

    Returns the summary (also written to ``OUT/preprocess.json``).
    """
    config = config or PreprocessConfig()
    opts = import_options or ImportOptions()
    input = manifest_in_folder(input, fmt)
    opts.on_error = config.on_error
    started = time.perf_counter()
    fmt, items = _collect_items(input, fmt, config, opts)
    modalities = _modalities(items, config)
    label_names = sorted({it.label for it in items if it.label is not None})
    specs = {m: s for m, s in config.specs().items() if m in modalities}
    source: dict[str, Any] = {
        "input": str(input) if is_stdio(input) else str(Path(input).resolve()),
        "format": fmt,
    }
    if not is_stdio(input) and Path(input).is_file():
        source["input_sha256"] = file_sha256(input)
    if fmt == "jsonl" and not is_stdio(input):
        source["manifest"] = source["input"]

    to_stdout = is_stdio(out)
    shard_size = len(items) if to_stdout else config.shard_size
    count = math.ceil(len(items) / shard_size)
    plans = [_ShardPlan(i, items[i * shard_size : (i + 1) * shard_size]) for i in range(count)]
    output = None
    if not to_stdout:
        source.update(manifest_source(Path(out) / MANIFEST_NAME, out))
        state = {
            "version": 1,
            "input": source["input"],
            "format": fmt,
            "options": config.output_options(),
            "items": len(items),
            "items_sha256": _plan_items_hash(items),
            "shards": count,
        }
        output = _Output(out, state, resume, overwrite, count)
        if output.done:
            log.info("resuming: %d of %d shards already done", len(output.done), count)
    pending = [p for p in plans if output is None or p.index not in output.done]

    writer = _ShardWriter(config, modalities, specs, label_names, source, count, output)
    done_items = sum(len(p.items) for p in plans) - sum(len(p.items) for p in pending)
    with progress("preprocess", total=len(items), unit="items") as bar:
        bar.update(done_items)
        try:
            for plan, results in _decode(pending, config, modalities):
                data = writer.write(plan, results)
                bar.update(len(plan.items))
                if to_stdout:
                    if len(writer.errors) == len(items):
                        _nothing_kept(writer.errors, fmt, input, out)
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
        except BadInput:
            if output is not None:
                output.discard_if_unstarted()
            raise

    processed = sum(len(p.items) for p in pending)
    summary = _finish(
        plans, output, writer, items, fmt, opts, modalities, started, input, out, processed
    )
    if summary["kept"] == 0:
        errors = writer.errors
        if output is not None:  # keep only the list of reasons
            errors = [json.loads(line) for line in (output.dir / ERRORS_FILE).open()]
            errors = [e for e in errors if e.get("stage") != "manifest"] or errors
            for i in range(count):
                output.shard_path(i).unlink(missing_ok=True)
            (output.dir / MANIFEST_NAME).unlink(missing_ok=True)
            (output.dir / STATE_FILE).unlink(missing_ok=True)
        _nothing_kept(errors, fmt, input, out)
    return summary


def _nothing_kept(errors: list[dict[str, Any]], fmt: str, input: str, out: str) -> None:
    """Every item was skipped: an error (exit 2), not an empty dataset."""
    first = errors[0] if errors else {}
    where_files = (
        "; image paths resolve against --images-dir (default: the JSON file's folder)"
        if fmt in ("karpathy", "coco")
        else ""
    )
    listed = "" if is_stdio(out) else f"; all are listed in {Path(out) / ERRORS_FILE}"
    raise BadInput(
        f"every item was skipped ({len(errors)}); the first, {first.get('id')!r}: "
        f"{first.get('reason')} ({first.get('path')}){listed}",
        where=input,
        hint="fix the paths or files" + where_files,
    )


def _decode(
    pending: list[_ShardPlan], config: PreprocessConfig, modalities: list[str]
) -> Iterator[tuple[_ShardPlan, list[tuple]]]:
    """Yield (shard plan, decoded results in item order) shard by shard, decoding in workers."""
    want_image, want_audio = "image" in modalities, "audio" in modalities
    image_tf = config.image_transform()
    tasks = []
    owner: dict[int, _ShardPlan] = {}
    for plan in pending:
        for start in range(0, len(plan.items), CHUNK):
            files = [
                (
                    str(it.path("image")) if want_image and it.has("image") else None,
                    str(it.path("audio")) if want_audio and it.has("audio") else None,
                )
                for it in plan.items[start : start + CHUNK]
            ]
            cid = len(tasks)
            tasks.append((cid, files, image_tf, config.sample_rate, config.audio_seconds))
            owner[cid] = plan
            plan.chunks += 1
    if not want_image and not want_audio:  # text only: nothing to decode
        for plan in pending:
            yield plan, [(None, None, None)] * len(plan.items)
        return
    if config.workers > 0 and len(tasks) > 1:
        pool = _pool_context().Pool(config.workers)
        results = pool.imap(_decode_chunk, tasks)
    else:
        pool = None
        results = map(_decode_chunk, tasks)
    try:
        for cid, decoded in results:
            plan = owner[cid]
            plan.results[cid] = decoded
            if len(plan.results) == plan.chunks:
                flat = [r for k in sorted(plan.results) for r in plan.results[k]]
                plan.results.clear()
                yield plan, flat
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


class _ShardWriter:
    def __init__(self, config, modalities, specs, label_names, source, count, output):
        self.config = config
        self.tokenizer = config.tokenizer()
        self.modalities = modalities
        self.specs = specs
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.label_names = label_names
        self.source = source
        self.count = count
        self.output = output
        self.errors: list[dict[str, Any]] = []  # of the shards written by this run
        self.truncated = 0
        self.rows = dict.fromkeys(modalities, 0)

    def write(self, plan: _ShardPlan, results: list[tuple]) -> bytes | None:
        import numpy as np

        kept: list[Item] = []
        images, audios, texts = [], [], []
        image_items, audio_items, text_items = [], [], []
        errors = []
        for item, (image, audio, error) in zip(plan.items, results):
            if error is not None:
                fld, reason = error
                if self.config.on_error == "fail":
                    raise BadInput(
                        reason, where=item.where(fld), hint="use --on-error skip to continue"
                    )
                errors.append(
                    {
                        "id": item.id,
                        "line": item.line or None,
                        "field": fld,
                        "path": item.fields.get(fld),
                        "reason": reason,
                    }
                )
                continue
            local = len(kept)
            kept.append(item)
            if image is not None:
                images.append(image)
                image_items.append(local)
            if audio is not None:
                audios.append(audio)
                audio_items.append(local)
            if "text" in self.modalities:
                for t in item.texts:
                    texts.append(t)
                    text_items.append(local)
        shard = Shard(ids=[it.id for it in kept])
        c = self.config
        if "image" in self.modalities:
            shard.tables["image"] = (
                np.stack(images)
                if images
                else np.zeros((0, 3, c.image_size, c.image_size), np.uint8)
            )
            shard.items["image"] = np.asarray(image_items, dtype=np.int64)
        if "text" in self.modalities:
            tokens, truncated = self.tokenizer.encode_batch(texts)
            shard.tables["text"] = tokens
            shard.strings[RAW_TEXT] = texts  # the captions as given, for pretrained tokenizers
            shard.items["text"] = np.asarray(text_items, dtype=np.int64)
        else:
            truncated = 0
        if "audio" in self.modalities:
            n = int(round(c.sample_rate * c.audio_seconds))
            shard.tables["audio"] = np.stack(audios) if audios else np.zeros((0, n), np.float16)
            shard.items["audio"] = np.asarray(audio_items, dtype=np.int64)
        if self.label_names:
            shard.labels = np.asarray(
                [self.label_index[it.label] if it.label is not None else -1 for it in kept],
                dtype=np.int64,
            )
        self.errors.extend(errors)
        self.truncated += truncated
        for m in self.modalities:
            self.rows[m] += len(shard.tables[m])
        kwargs = dict(
            kind="tensors",
            specs=self.specs,
            label_names=self.label_names,
            source=self.source,
            index=plan.index,
            count=self.count,
            extra={"errors": errors, "stats": {"truncated": truncated, "skipped": len(errors)}},
        )
        if self.output is None:
            return serialize_shard(shard, **kwargs)
        write_shard(self.output.shard_path(plan.index), shard, **kwargs)
        return None


def _finish(
    plans, output, writer, items, fmt, opts, modalities, started, input, out, processed
) -> dict[str, Any]:
    """Summarise; for a folder output also write manifest.jsonl, errors.jsonl, preprocess.json."""
    by_id = {it.id: it for it in items}
    rows, item_errors, truncated = writer.rows, writer.errors, writer.truncated
    kept_ids: list[str] = []
    if output is not None:  # count over every shard, those of an earlier run included
        rows, item_errors, truncated = dict.fromkeys(modalities, 0), [], 0
        for plan in plans:
            shard = ShardFile(output.shard_path(plan.index))
            kept_ids.extend(shard.ids())
            item_errors.extend(shard.extra("errors", []))
            truncated += shard.extra("stats", {}).get("truncated", 0)
            for m in modalities:
                rows[m] += shard.rows(m)
        out_dir = output.dir.resolve()
        with atomic_open(output.dir / MANIFEST_NAME) as f:
            for item_id in kept_ids:
                f.write(item_to_json(_relocated(by_id[item_id], out_dir)) + "\n")
        with atomic_open(output.dir / ERRORS_FILE) as f:
            for e in opts.errors:
                f.write(json.dumps({**e, "stage": "manifest"}, ensure_ascii=False) + "\n")
            for e in item_errors:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - started
    n_kept = len(kept_ids) if output is not None else len(items) - len(item_errors)
    summary = {
        "input": str(input),
        "format": fmt,
        "out": str(out),
        "items": len(items) + len(opts.errors),  # every item read, those rejected included
        "kept": n_kept,
        "skipped": len(item_errors) + len(opts.errors),
        "rows": rows,
        "truncated_captions": truncated,
        "shards": len(plans),
        "seconds": round(seconds, 3),
        "items_per_s": round(processed / seconds, 1) if seconds > 0 else None,  # by this run
    }
    if output is not None:
        state = json.loads((output.dir / STATE_FILE).read_text())
        with atomic_open(output.dir / STATE_FILE) as f:
            json.dump(
                {**state, "complete": True, "summary": summary}, f, indent=2, ensure_ascii=False
            )
    return summary


def _relocated(item: Item, out_dir: Path) -> dict[str, Any]:
    """The item's fields with image/audio paths made relative to the output folder."""
    fields = dict(item.fields)
    for key in ("image", "audio"):
        p = item.path(key)
        if p is not None:
            fields[key] = Path(os.path.relpath(p.resolve(), out_dir)).as_posix()
    return fields
