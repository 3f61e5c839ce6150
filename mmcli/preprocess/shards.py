"""From items and their decoded files to tensor shards (the rows of each table)."""

from __future__ import annotations

import hashlib
from typing import Any

from mmcli.data.captions import RAW_TEXT
from mmcli.data.importers import ImportOptions, import_items
from mmcli.errors import BadInput
from mmcli.formats.manifest import MODALITY_FIELDS, Item, item_to_json
from mmcli.formats.tensorfile import Shard, serialize_shard, write_shard
from mmcli.preprocess.config import PreprocessConfig
from mmcli.preprocess.decode import ShardPlan


def items_hash(items: list[Item]) -> str:
    """sha256 of the items in order: ids and every field (captions, paths, labels), so a
    resume notices any edit of the input's items (not of the image or audio files)."""
    h = hashlib.sha256()
    for it in items:
        h.update(item_to_json(it).encode("utf-8") + b"\n")
    return h.hexdigest()


def collect_items(
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
        present = sorted({str(it.split) for it in items if it.split})
        items = [it for it in items if it.split == config.split]
        if not items:
            raise BadInput(
                f"--split {config.split}: no item is in that split",
                where=input,
                hint=f"the data's splits: {', '.join(present)}",
            )
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


def present_modalities(items: list[Item], config: PreprocessConfig) -> list[str]:
    present = [m for m in MODALITY_FIELDS if any(it.has(m) for it in items)]
    if config.audio_from_video and "video" in present and "audio" not in present:
        present.insert(present.index("video"), "audio")  # the videos' audio tracks
    if config.modalities is not None:
        missing = [m for m in config.modalities if m not in present]
        if missing:
            raise BadInput(
                f"no item has {missing[0]}", hint=f"the items have: {', '.join(present)}"
            )
        present = [m for m in present if m in config.modalities]
    if not present:
        raise BadInput("items have no image, text, audio or video")
    return present


class ShardWriter:
    """Turns a shard plan and its decoded results into one shard (a file in the output
    folder, or bytes for stdout), keeping count of rows, skipped items and truncations."""

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
        self.upsampled = 0  # images whose shorter side was below --image-size
        self.rows = dict.fromkeys(modalities, 0)

    def _keep(self, plan: ShardPlan, results: list[tuple]):
        """(kept items, their rows per modality, item of each row, skipped items)."""
        kept: list[Item] = []
        rows: dict[str, list] = {m: [] for m in self.modalities}
        row_items: dict[str, list[int]] = {m: [] for m in self.modalities}
        errors = []
        self._upsampled = 0
        for item, (values, error, upsampled) in zip(plan.items, results):
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
            self._upsampled += bool(upsampled)
            for m, value in values.items():
                if m in rows:
                    rows[m].append(value)
                    row_items[m].append(local)
            if "text" in self.modalities:
                for t in item.texts:
                    rows["text"].append(t)
                    row_items["text"].append(local)
        return kept, rows, row_items, errors

    def _shard(self, kept, rows, row_items) -> tuple[Shard, int]:
        import numpy as np

        shard = Shard(ids=[it.id for it in kept])
        c = self.config
        truncated = 0
        empty = {
            "image": lambda: np.zeros((0, 3, c.image_size, c.image_size), np.uint8),
            "audio": lambda: np.zeros((0, int(round(c.sample_rate * c.audio_seconds))), np.float16),
            "video": lambda: np.zeros((0, c.frames, 3, c.image_size, c.image_size), np.uint8),
        }
        for m in self.modalities:
            if m == "text":
                shard.tables[m], truncated = self.tokenizer.encode_batch(rows[m])
                shard.strings[RAW_TEXT] = rows[m]  # the captions as given (pretrained tokenizers)
            elif m == "image" and c.store == "encoded":
                shard.encoded[m] = rows[m]  # the compressed files (mmcli.data.encoded)
            else:
                shard.tables[m] = np.stack(rows[m]) if rows[m] else empty[m]()
            shard.items[m] = np.asarray(row_items[m], dtype=np.int64)
        if self.label_names:
            shard.labels = np.asarray(
                [self.label_index[it.label] if it.label is not None else -1 for it in kept],
                dtype=np.int64,
            )
        return shard, truncated

    def write(self, plan: ShardPlan, results: list[tuple]) -> bytes | None:
        kept, rows, row_items, errors = self._keep(plan, results)
        shard, truncated = self._shard(kept, rows, row_items)
        self.errors.extend(errors)
        self.truncated += truncated
        self.upsampled += self._upsampled
        for m in self.modalities:
            self.rows[m] += len(shard.items[m])
        kwargs = dict(
            kind="tensors",
            specs=self.specs,
            label_names=self.label_names,
            source=self.source,
            index=plan.index,
            count=self.count,
            extra={
                "errors": errors,
                "stats": {
                    "truncated": truncated,
                    "skipped": len(errors),
                    "upsampled": self._upsampled,
                },
            },
        )
        if self.output is None:
            return serialize_shard(shard, **kwargs)
        write_shard(self.output.shard_path(plan.index), shard, **kwargs)
        return None
