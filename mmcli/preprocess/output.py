"""preprocess's output folder: ownership, the lock, resume state, and the files written
after the last shard (manifest.jsonl, errors.jsonl, then the completion record)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_open
from mmcli.formats.locks import is_temp_of, remove_stale_temps
from mmcli.formats.manifest import MANIFEST_NAME, Item, item_to_json
from mmcli.formats.tensorfile import ShardFile, shard_name
from mmcli.preprocess.config import ERRORS_FILE, SHARD_PREFIX, STATE_FILE, owns

log = logging.getLogger("mmcli")

RESUME_KEYS = ("input", "format", "options", "items", "items_sha256")


class Output:
    """The output folder: ownership checks, resume state, finished shards.

    Call it holding the folder's lock (:class:`mmcli.formats.locks.OutputLock`).
    """

    def __init__(self, out: str, state: dict[str, Any], resume: bool, overwrite: bool, count: int):
        self.dir = Path(out)
        self.count = count
        if self.dir.exists() and not self.dir.is_dir():
            raise BadInput(
                "output exists and is not a folder", where=out, hint="pass a folder path"
            )
        self._check(state, resume, overwrite)
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(self.dir, owns)  # left by a killed run; we hold the lock
        if stale:
            log.info("removed %d temporary file(s) of a stopped run", stale)
        if overwrite:
            for p in self._owned_files():
                p.unlink()
        self.done: set[int] = set()
        if resume and not overwrite:
            self.done = self._finished_shards()
        with atomic_open(self.dir / STATE_FILE) as f:
            json.dump({**state, "complete": False}, f, indent=2, ensure_ascii=False)

    def _check(self, state: dict[str, Any], resume: bool, overwrite: bool) -> None:
        out = str(self.dir)
        old = None
        state_path = self.dir / STATE_FILE
        if state_path.exists():
            try:
                old = json.loads(state_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                old = {}
        if old is not None and not overwrite:
            if not resume:
                raise BadInput(
                    "output folder already holds a preprocess run",
                    where=out,
                    hint="use --resume to finish it, --overwrite to replace it, or another -o",
                )
            diff = [k for k in RESUME_KEYS if old.get(k) != state.get(k)]
            if diff:
                names = {"items_sha256": "items (ids, captions, paths or labels changed)"}
                raise BadInput(
                    "cannot resume: the run in this folder had different "
                    + ", ".join(names.get(k, k) for k in diff),
                    where=out,
                    hint="use --overwrite to start again, or another -o",
                )
        elif old is None and not overwrite and self.dir.is_dir():
            others = [p for p in self.dir.iterdir() if not is_temp_of(p.name, owns)]
            owned = set(self._owned_files())
            if any(p not in owned for p in others):
                raise BadInput(
                    "output folder is not empty and holds no preprocess run",
                    where=out,
                    hint="pick an empty or new folder, or use --overwrite (only mmcli's files are replaced)",
                )

    def _finished_shards(self) -> set[int]:
        done = set()
        for i in range(self.count):
            path = self.shard_path(i)
            if path.exists():
                try:
                    if ShardFile(path).shard_position == (i, self.count):
                        done.add(i)
                except BadInput:
                    pass
        return done

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
        return [p for p in self.dir.iterdir() if owns(p.name)]

    def shard_path(self, index: int) -> Path:
        return self.dir / shard_name(SHARD_PREFIX, index, self.count)

    def remove_all(self) -> None:
        """Every item was skipped: remove the shards and the record (errors.jsonl stays)."""
        for i in range(self.count):
            self.shard_path(i).unlink(missing_ok=True)
        (self.dir / MANIFEST_NAME).unlink(missing_ok=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)

    def skipped(self) -> list[dict[str, Any]]:
        """What errors.jsonl lists (the items skipped for their files, when there are any)."""
        errors = [json.loads(line) for line in (self.dir / ERRORS_FILE).open()]
        return [e for e in errors if e.get("stage") != "manifest"] or errors


def finish_folder(
    output: Output, plans, items: list[Item], modalities, manifest_errors
) -> tuple[dict[str, int], list[dict[str, Any]], int, list[str]]:
    """After the last shard: count over every shard (an earlier run's included), write
    manifest.jsonl and errors.jsonl. Returns (rows, item errors, truncated, kept ids)."""
    by_id = {it.id: it for it in items}
    rows, item_errors, truncated = dict.fromkeys(modalities, 0), [], 0
    kept_ids: list[str] = []
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
        for e in manifest_errors:
            f.write(json.dumps({**e, "stage": "manifest"}, ensure_ascii=False) + "\n")
        for e in item_errors:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return rows, item_errors, truncated, kept_ids


def write_complete(output: Output, summary: dict[str, Any]) -> None:
    """The completion record, last of all: readers take the folder from now on."""
    state = json.loads((output.dir / STATE_FILE).read_text())
    with atomic_open(output.dir / STATE_FILE) as f:
        json.dump({**state, "complete": True, "summary": summary}, f, indent=2, ensure_ascii=False)


def _relocated(item: Item, out_dir: Path) -> dict[str, Any]:
    """The item's fields with image / audio / video paths made relative to the output folder."""
    fields = dict(item.fields)
    for key in ("image", "audio", "video"):
        p = item.path(key)
        if p is not None:
            fields[key] = Path(os.path.relpath(p.resolve(), out_dir)).as_posix()
    return fields
