"""What every writer checks about its output, and what every reader checks about its input.

* An output is never an input: :func:`refuse_inputs_as_outputs` compares real paths (links
  resolved) of the files a command would write, and of its output folder, with the files
  and folders it reads, before anything is written; ``--overwrite`` does not lift it.
* An existing file a command did not write is replaced only with ``--overwrite``: each
  command knows what its own outputs look like (:func:`refuse_foreign_file`).
* A preprocess output folder is complete only when its completion record says so:
  ``preprocess.json`` is written first with ``"complete": false`` and rewritten, last of
  all, with ``"complete": true``. :func:`refuse_unfinished` (called by every reader of
  tensor files, through :func:`mmcli.formats.tensorfile.resolve_sources`) refuses the
  shards of a folder whose record says otherwise, naming ``--resume``. A folder without a
  record (written by hand, or an extract output, complete when every shard is there) is
  read as before.

Standard library only: ``mmcli info`` and ``--help`` stay light.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mmcli.errors import BadInput
from mmcli.formats.atomic import is_stdio

PREPROCESS_RECORD = "preprocess.json"  # preprocess's completion record, in its output folder


def real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def input_paths(sources: Iterable[str | os.PathLike | None]) -> tuple[set[Path], set[Path]]:
    """(files, folders) that ``sources`` read, as real paths: each file named and its
    folder, each folder named and the files in it, the files a glob matches and their
    folders. ``-``, None and names that do not exist are left out."""
    files: set[Path] = set()
    folders: set[Path] = set()
    for src in sources:
        if src is None or is_stdio(src):
            continue
        s = str(src)
        matches = globlib.glob(s) if any(c in s for c in "*?[") else [s]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                folders.add(real(p))
                files.update(real(f) for f in p.iterdir() if f.is_file())
            elif p.is_file():
                files.add(real(p))
                folders.add(real(p).parent)
    return files, folders


def refuse_inputs_as_outputs(
    inputs: Iterable[str | os.PathLike | None],
    *,
    files: Iterable[str | os.PathLike] = (),
    folder: str | os.PathLike | None = None,
    option: str = "-o",
) -> None:
    """BadInput when an output file would replace an input file, or the output ``folder``
    is a folder the inputs are read from (or one of them)."""
    in_files, in_folders = input_paths(inputs)
    for f in files:
        if is_stdio(f):
            continue
        if real(f) in in_files:
            raise BadInput(
                f"{option} {f} would replace an input file ({real(f)})",
                hint=f"write to another {option}: an output is never one of the inputs",
            )
    if folder is not None and not is_stdio(folder) and real(folder) in in_folders | in_files:
        raise BadInput(
            f"{option} {folder} is where the input is read from",
            hint=f"write to another {option} folder: an output is never one of the inputs",
        )


def refuse_foreign_file(
    path: str | os.PathLike, ours: Callable[[Path], bool], *, what: str, overwrite: bool
) -> None:
    """BadInput when ``path`` exists and ``ours`` says this command did not write it
    (unless ``overwrite``). ``what`` names the command's kind of output."""
    p = Path(path)
    if overwrite or is_stdio(path) or not p.exists():
        return
    if p.is_dir():
        raise BadInput("the output is an existing folder, not a file", where=str(path))
    if not ours(p):
        raise BadInput(
            f"the output file exists and is not {what}",
            where=str(path),
            hint="pass --overwrite to replace it, or write to another file",
        )


# ------------------------------------------------------------------ completion


def read_record(folder: str | os.PathLike) -> dict | None:
    """The preprocess completion record of ``folder``: None when there is none,
    ``{}`` when it is unreadable."""
    path = Path(folder) / PREPROCESS_RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def refuse_while_written(sources: Iterable[str | os.PathLike]) -> None:
    """BadInput when a live mmcli process holds the lock of a folder the ``sources``
    (folders, globs, files) are read from: it is still writing them."""
    from mmcli.formats.locks import holder_of

    folders: set[Path] = set()
    for src in sources:
        s = str(src)
        if is_stdio(s):
            continue
        if any(c in s for c in "*?["):
            folders.update(Path(m).parent for m in globlib.glob(s))
        else:
            folders.add(Path(s) if Path(s).is_dir() else Path(s).parent)
    for folder in sorted(folders):
        holder = holder_of(folder)
        if holder:
            raise BadInput(
                f"another mmcli process is still writing this folder ({holder})",
                where=str(folder),
                hint="wait for it to finish",
            )


def refuse_unfinished(paths: Iterable[str]) -> None:
    """BadInput when any of ``paths`` lies in a preprocess output folder that is not
    complete (killed before it finished, or still being written)."""
    seen: set[Path] = set()
    for p in paths:
        if is_stdio(p):
            continue
        folder = Path(p).parent
        if folder in seen:
            continue
        seen.add(folder)
        record = read_record(folder)
        if record is None or record.get("complete") is True:
            continue
        refuse_while_written([folder])
        source = record.get("input") or "INPUT"
        raise BadInput(
            "unfinished preprocess output: the run writing it stopped before it finished",
            where=str(folder),
            hint=f"finish it with: mmcli preprocess {source} -o {folder} --resume "
            "(and the run's other options)",
        )
