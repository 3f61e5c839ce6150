"""``imagefolder`` and ``audiofolder``: ``ROOT/<label>/<file>`` (or
``ROOT/<split>/<label>/<file>``), one item per file, labelled by its folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcli.data.importers.layout import SPLIT_NAMES, class_dirs, folder_files, log
from mmcli.errors import BadInput
from mmcli.formats.manifest import Item


def folder_items(root: Path, exts: set[str], modality: str, fmt: str) -> Iterator[Item]:
    if not root.is_dir():
        raise BadInput(f"{fmt} expects a folder", where=str(root))
    top = class_dirs(root)
    # ROOT/<split>/<label>/file when the top level is made of split names only
    split_layout = bool(top) and all(d.name.lower() in SPLIT_NAMES for d in top)
    groups = [(SPLIT_NAMES[d.name.lower()], d) for d in top] if split_layout else [(None, root)]
    base = root.resolve()
    found = 0
    for split, group_root in groups:
        loose = sorted(f for f in group_root.iterdir() if f.is_file() and f.suffix.lower() in exts)
        if loose:
            log.warning(
                "%d files directly in %s have no class folder and are ignored",
                len(loose),
                group_root,
            )
        for class_dir in class_dirs(group_root):
            # relative to ROOT as walked, not resolved: a symlinked file may point
            # anywhere, and its path under ROOT is what the item is called
            files = [
                f.relative_to(root).as_posix()
                for f in folder_files(class_dir)
                if f.suffix.lower() in exts
            ]
            # the id is the path without its extension, unless two files differ only by
            # it (a.png and a.jpg): those keep the extension, so ids stay unique
            stems = Counter(str(Path(rel).with_suffix("")) for rel in files)
            for rel in files:
                stem = str(Path(rel).with_suffix(""))
                fields: dict[str, Any] = {
                    "id": stem if stems[stem] == 1 else rel,
                    modality: rel,
                    "label": class_dir.name,
                }
                if split:
                    fields["split"] = split
                found += 1
                yield Item(id=fields["id"], fields=fields, base=base, source=root.name)
    if not found:
        raise BadInput(
            f"no {modality} files in class folders",
            where=str(root),
            hint=f"expected {root}/<label>/<file> with one of {sorted(exts)}",
        )
