"""``preprocess``: raw images, captions and audio -> normalized tensor shards.

    from mmcli.preprocess import PreprocessConfig, preprocess
    summary = preprocess("data/manifest.jsonl", "out/tensors", config=PreprocessConfig(image_size=64))

Items are read from any supported layout (:mod:`mmcli.data.importers`), split into
shards of ``shard_size`` items, decoded (optionally in worker processes,
:mod:`~mmcli.preprocess.decode`) and written as safetensors shards, each atomically
(:mod:`~mmcli.preprocess.shards`). An item whose image or audio cannot be decoded is
skipped as a whole (``on_error="skip"``, listed in ``OUT/errors.jsonl``) or stops the run
(``"fail"``). A killed run started again with ``resume=True`` keeps the finished shards.
At the end ``OUT/manifest.jsonl`` lists the kept items in row order, with paths relative
to OUT; ``OUT/preprocess.json``, the completion record, is written first with the
options and ``"complete": false`` and last of all with ``"complete": true`` and the
summary (:mod:`~mmcli.preprocess.output`): readers refuse a folder until then. One
writer at a time: the folder is locked (:mod:`mmcli.formats.locks`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from mmcli.data.importers import ImportOptions, manifest_in_folder
from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.locks import OutputLock
from mmcli.formats.manifest import MANIFEST_NAME, file_sha256, manifest_source
from mmcli.formats.outputs import refuse_inputs_as_outputs
from mmcli.preprocess.config import ERRORS_FILE, STATE_FILE, PreprocessConfig
from mmcli.preprocess.decode import ShardPlan, decode
from mmcli.preprocess.output import Output, finish_folder, write_complete
from mmcli.preprocess.report import caption_report, check_skips, upsampled_images, warn
from mmcli.preprocess.shards import (
    ShardWriter,
    collect_items,
    items_hash,
    present_modalities,
)
from mmcli.progress import ProgressFactory, null_progress

log = logging.getLogger("mmcli")

__all__ = ["PreprocessConfig", "preprocess"]


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
    if not is_stdio(out):
        refuse_inputs_as_outputs(
            [input, opts.images_dir],
            files=[Path(out) / n for n in (MANIFEST_NAME, ERRORS_FILE, STATE_FILE)],
            folder=out,
        )
    lock = contextlib.nullcontext() if is_stdio(out) else OutputLock(out, "preprocess")
    with lock:
        return _run(input, out, fmt, config, opts, resume, overwrite, progress)


def _run(input, out, fmt, config, opts, resume, overwrite, progress) -> dict[str, Any]:
    started = time.perf_counter()
    fmt, items = collect_items(input, fmt, config, opts)
    modalities = present_modalities(items, config)
    label_names = sorted({it.label for it in items if it.label is not None})
    specs = {m: s for m, s in config.specs().items() if m in modalities}
    source = _source(input, fmt)
    to_stdout = is_stdio(out)
    shard_size = len(items) if to_stdout else config.shard_size
    count = math.ceil(len(items) / shard_size)
    plans = [ShardPlan(i, items[i * shard_size : (i + 1) * shard_size]) for i in range(count)]
    output = None
    if not to_stdout:
        source.update(manifest_source(Path(out) / MANIFEST_NAME, out))
        state = {
            "version": 1,
            "input": source["input"],
            "format": fmt,
            "options": config.output_options(),
            "items": len(items),
            "items_sha256": items_hash(items),
            "shards": count,
        }
        output = Output(out, state, resume, overwrite, count)
        if output.done:
            log.info("resuming: %d of %d shards already done", len(output.done), count)
    pending = [p for p in plans if output is None or p.index not in output.done]
    writer = ShardWriter(config, modalities, specs, label_names, source, count, output)
    _write_shards(plans, pending, writer, config, modalities, output, progress, fmt, input, out)
    processed = sum(len(p.items) for p in pending)
    summary = _finish(plans, output, writer, items, fmt, opts, modalities, started, processed)
    summary.update(input=str(input), out=str(out))
    summary["upsampled_images"] = upsampled_images(output, plans, writer)
    summary.update(caption_report(items, config, summary["truncated_captions"]))
    warn(summary, config)
    if summary["kept"] == 0:
        errors = writer.errors
        if output is not None:  # keep only the list of reasons
            errors = output.skipped()
            output.remove_all()
        _nothing_kept(errors, fmt, input, out)
    check_skips(summary, config, out)  # too many skipped: the folder stays unfinished
    if output is not None:
        write_complete(output, summary)
    return summary


def _source(input: str, fmt: str) -> dict[str, Any]:
    source: dict[str, Any] = {
        "input": str(input) if is_stdio(input) else str(Path(input).resolve()),
        "format": fmt,
    }
    if not is_stdio(input) and Path(input).is_file():
        source["input_sha256"] = file_sha256(input)
    if fmt == "jsonl" and not is_stdio(input):
        source["manifest"] = source["input"]
    return source


def _write_shards(plans, pending, writer, config, modalities, output, progress, fmt, input, out):
    done_items = sum(len(p.items) for p in plans) - sum(len(p.items) for p in pending)
    n_items = sum(len(p.items) for p in plans)
    with progress("preprocess", total=n_items, unit="items") as bar:
        bar.update(done_items)
        # closed on the way out, so that an exception (SIGTERM, Ctrl-C, bad input) stops the
        # worker pool at once, not when the generator is collected at interpreter shutdown
        # (where the pool's teardown can hang)
        shards = contextlib.closing(decode(pending, config, modalities))
        try:
            with shards as decoded:
                for plan, results in decoded:
                    data = writer.write(plan, results)
                    bar.update(len(plan.items))
                    if output is None:
                        if len(writer.errors) == n_items:
                            _nothing_kept(writer.errors, fmt, input, out)
                        sys.stdout.buffer.write(data)
                        sys.stdout.buffer.flush()
        except BadInput:
            if output is not None:
                output.discard_if_unstarted()
            raise


def _finish(plans, output, writer, items, fmt, opts, modalities, started, processed):
    """The summary; for a folder output also write manifest.jsonl and errors.jsonl."""
    rows, item_errors, truncated = writer.rows, writer.errors, writer.truncated
    if output is not None:  # count over every shard, those of an earlier run included
        rows, item_errors, truncated, kept_ids = finish_folder(
            output, plans, items, modalities, opts.errors
        )
        n_kept = len(kept_ids)
    else:
        n_kept = len(items) - len(item_errors)
    seconds = time.perf_counter() - started
    return {
        "input": None,
        "format": fmt,
        "out": None,
        "items": len(items) + len(opts.errors),  # every item read, those rejected included
        "kept": n_kept,
        "skipped": len(item_errors) + len(opts.errors),
        "rows": rows,
        "truncated_captions": truncated,
        "shards": len(plans),
        "seconds": round(seconds, 3),
        "items_per_s": round(processed / seconds, 1) if seconds > 0 else None,  # by this run
    }


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
