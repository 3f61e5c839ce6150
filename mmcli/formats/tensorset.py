"""Sets of tensor files read as one: a file, a list, a glob, a folder of shards or ``-``.

    ts = TensorSet("out/tensors/")        # every shard of the set, checked to be complete
    ts.ids(), ts.labels(), ts.table("image")
    for shard_index, data, items in ts.iter_table("text"): ...

Shards are opened as :class:`~mmcli.formats.shardfile.ShardFile` (header checked on
open, column values on first read) and must agree on kind, tables, specs and labels.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio
from mmcli.formats.layout import SHARD_RE, shard_name
from mmcli.formats.outputs import refuse_unfinished, refuse_while_written
from mmcli.formats.shardfile import ShardFile


def resolve_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a file, a folder of shards, a glob or a list of them into file paths.

    ``-`` stays ``-`` (stdin). Shard sets found in a folder or by a glob must be
    complete (``NAME-i-of-N`` for every i); a shard named explicitly is read alone.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    refuse_while_written(sources)  # a live mmcli writer holds their folder's lock
    paths: list[str] = []
    for src in sources:
        s = str(src)
        if is_stdio(s):
            paths.append(s)
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.glob("*.safetensors") if not f.name.startswith("."))
            if not found:
                raise BadInput("no .safetensors files in folder", where=s)
            _check_complete(found)
            paths.extend(found)
        elif any(c in s for c in "*?["):
            found = sorted(globlib.glob(s))
            if not found:
                raise BadInput("the pattern matches no files", where=s)
            _check_complete(found)
            paths.extend(found)
        elif p.exists():
            paths.append(s)
        else:
            raise BadInput("file not found", where=s, hint="check the path")
    if paths.count("-") > (1 if paths == ["-"] else 0):
        raise BadInput("stdin ('-') can only be read alone, as one tensor file")
    refuse_unfinished(paths)  # a preprocess folder without its completion record
    return paths


def _check_complete(paths: list[str]) -> None:
    groups: dict[tuple[str, int], set[int]] = {}
    for path in paths:
        m = SHARD_RE.match(Path(path).name)
        if m:
            key = (str(Path(path).parent / m["name"]), int(m["count"]))
            groups.setdefault(key, set()).add(int(m["index"]))
    for (name, count), have in groups.items():
        missing = sorted(set(range(count)) - have)
        if missing:
            shown = ", ".join(shard_name(Path(name).name, i, count) for i in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise BadInput(
                f"incomplete shard set: missing {shown}{more}",
                where=str(Path(name).parent),
                hint="finish the job that writes them (rerun it with --resume)",
            )


class TensorSet:
    """A set of shards read as one: same kind, same tables and specs, same labels.

    Items are numbered globally in shard order: item ``j`` of shard ``s`` is
    ``item_offsets[s] + j``.
    """

    def __init__(self, sources: str | os.PathLike | Sequence[str | os.PathLike] | list[ShardFile]):
        if isinstance(sources, list) and sources and isinstance(sources[0], ShardFile):
            self.shards = list(sources)
        else:
            paths = resolve_sources(sources)
            self.shards = [ShardFile.from_stdin() if p == "-" else ShardFile(p) for p in paths]
        if not self.shards:
            raise BadInput("no tensor files given")
        self._check_consistent()
        counts = [s.num_items for s in self.shards]
        self.item_offsets = [0]
        for c in counts:
            self.item_offsets.append(self.item_offsets[-1] + c)

    def _check_consistent(self) -> None:
        first = self.shards[0]
        for other in self.shards[1:]:
            for what, a, b in (
                ("kind", first.kind, other.kind),
                ("tables", sorted(first.tables), sorted(other.tables)),
                ("table specs", first.specs, other.specs),
                ("label names", first.label_names, other.label_names),
            ):
                if a != b:
                    raise BadInput(
                        f"{what} differ from {first.path} ({_short(a)} vs {_short(b)})",
                        where=other.path,
                        hint="pass files of one dataset and one encoder together",
                    )

    # -- description -----------------------------------------------------------
    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.shards]

    @property
    def kind(self) -> str:
        return self.shards[0].kind

    @property
    def tables(self) -> list[str]:
        return self.shards[0].tables

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        return self.shards[0].specs

    def spec(self, table: str) -> dict[str, Any]:
        return self.specs.get(table, {})

    @property
    def label_names(self) -> list[str]:
        return self.shards[0].label_names

    @property
    def source(self) -> dict[str, Any]:
        return self.shards[0].source

    @property
    def num_items(self) -> int:
        return self.item_offsets[-1]

    def rows(self, table: str) -> int:
        self.require(table)
        return sum(s.rows(table) for s in self.shards)

    def require(self, table: str, hint: str | None = None) -> None:
        if table not in self.tables:
            raise BadInput(
                f"no {table} table in the input (it has: {', '.join(self.tables) or 'none'})",
                where=where_paths(self.paths),
                hint=hint,
            )

    # -- data ----------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every item id, in item order (BadInput when an id is in two shards)."""
        out: list[str] = []
        for s in self.shards:
            out.extend(s.ids())
        if len(set(out)) != len(out) and len(self.shards) > 1:
            owner: dict[str, str] = {}
            for s in self.shards:
                for i in s.ids():
                    if i in owner:
                        raise BadInput(
                            f"item id {i[:60]!r} is in two shards ({owner[i]} and {s.path})",
                            hint="pass the shards of one set once each",
                        )
                    owner[i] = s.path
        return out

    def labels(self):
        import numpy as np

        return np.concatenate([s.labels() for s in self.shards]) if self.shards else np.empty(0)

    def iter_table(self, table: str) -> Iterator[tuple[int, Any, Any]]:
        """Yield ``(shard index, data tensor, global item index tensor)`` shard by shard."""
        import torch

        self.require(table)
        for i, s in enumerate(self.shards):
            items = torch.from_numpy(s.item_index(table).astype("int64", copy=True))
            yield i, s.tensor(table), items + self.item_offsets[i]

    def table(self, table: str):
        """(data, global item index) of a whole table, concatenated (small tables only)."""
        import torch

        parts = list(self.iter_table(table))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _short(x: Any, n: int = 80) -> str:
    s = json.dumps(x, sort_keys=True, ensure_ascii=False) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


def where_paths(paths: Sequence[str]) -> str:
    """A set of files for an error's *where*: the first path, and how many more."""
    if len(paths) == 1:
        return paths[0]
    return f"{paths[0]} (+{len(paths) - 1} more)"


def open_tensors(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> TensorSet:
    return TensorSet(sources)
