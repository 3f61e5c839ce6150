#!/usr/bin/env python
"""Toy viewing histories with a known preference structure, for ``eval --task recommend``.

    python examples/toyhistories.py data/toy/manifest.jsonl -o data/toy [--users 300] [--seed 0]

writes ``histories.jsonl`` (one user a line) and ``unwatched.txt`` (the items nobody has
watched, one id a line) into the output folder. From Python::

    from toyhistories import ATTRIBUTES, make_histories, oracle_recall
    h = make_histories(rows, ATTRIBUTES, users=300, seed=0)
    oracle_recall(h, rows, ATTRIBUTES, k=10)

Each user prefers one value of one attribute (``{"prefers": {"color": "red"}}``), the
attributes taken in turn: colour or shape for the toy scenes, colour or motion for the toy
videos (``toydata.py --video``). An item is *preferred* when the attribute's extractor gives
that value for it (the toy data's extractors: the colour or the shape of a one-shape
scene; a two-shape scene has none). A history of 5 to 12 items is drawn without
replacement: each item is a preferred one with probability 1 - ``noise`` (else any other
item; any item once the preferred ones run out), weighted by a fixed per-item popularity
(``(1 + r) ** -skew`` for a seeded random rank r, so some items are watched far more than
others and the popularity baseline has something to find). A seeded share ``unwatched`` of the items is never drawn: those are
the cold-start items, recommended from their content alone.

The right answer is known: the *oracle* ranks a user's unseen preferred items by
popularity (then the others); :func:`oracle_recall` is its leave-last-out recall@k on the
very histories written, the ceiling a recommender can reach on them
(``popularity=False``: the ceiling from content alone, preferred items in random order).

Only numpy and the standard library are needed (no torch); deterministic per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Extractor = Callable[[dict], "str | None"]


def _one_shape(row: dict, key: str) -> str | None:
    if "objects" not in row:  # a row that names the attribute itself (the toy videos)
        return row.get(key)
    objects = row["objects"] or []
    return objects[0].get(key) if len(objects) == 1 else None


def color_of(row: dict) -> str | None:
    """The colour of a one-shape toy scene (None for two shapes), or the row's ``color``."""
    return _one_shape(row, "color")


def shape_of(row: dict) -> str | None:
    """The shape of a one-shape toy scene (None for two shapes), or the row's ``shape``."""
    return _one_shape(row, "shape")


def motion_of(row: dict) -> str | None:
    """The motion of a toy video ("moving to the left", "growing", ...)."""
    return row.get("motion")


#: the toy image dataset's preference attributes
ATTRIBUTES: dict[str, Extractor] = {"color": color_of, "shape": shape_of}
#: the toy videos': users who like one colour or one motion
VIDEO_ATTRIBUTES: dict[str, Extractor] = {"color": color_of, "motion": motion_of}


def attributes_for(rows: Sequence[dict]) -> dict[str, Extractor]:
    """The preference attributes of a dataset: colour or motion for the toy videos (rows
    with a ``motion``), colour or shape for the toy scenes."""
    return VIDEO_ATTRIBUTES if any("motion" in r for r in rows) else ATTRIBUTES


@dataclass
class Histories:
    users: list[dict]  # {"user", "prefers": {attribute: value}, "history": [ids]}
    unwatched: list[str]  # items no history holds
    popularity: dict[str, float] = field(default_factory=dict)  # the drawing weight per item


def make_histories(
    rows: Sequence[dict],
    attributes: dict[str, Extractor] = ATTRIBUTES,
    *,
    users: int = 300,
    seed: int = 0,
    length: tuple[int, int] = (5, 12),
    noise: float = 0.15,
    unwatched: float = 0.1,
    skew: float = 0.7,
) -> Histories:
    """Histories of ``users`` users over the manifest ``rows`` (see the module docstring)."""
    if users < 1 or not attributes or not rows:
        raise ValueError("need at least one user, one attribute and one item")
    if not 1 <= length[0] <= length[1] or not 0 <= noise <= 1 or not 0 <= unwatched < 1:
        raise ValueError("length must be 1 <= lo <= hi, noise in [0, 1], unwatched in [0, 1)")
    rng = np.random.default_rng([seed, 7])
    ids = [str(r["id"]) for r in rows]
    n = len(ids)
    weight = (1.0 + rng.permutation(n)) ** -skew
    cold = np.zeros(n, dtype=bool)
    cold[rng.choice(n, size=int(round(unwatched * n)), replace=False)] = True
    values = {a: [f(r) for r in rows] for a, f in attributes.items()}
    names = list(attributes)
    out = []
    for u in range(users):
        attr = names[u % len(names)]
        choices = sorted({v for v, c in zip(values[attr], cold) if v is not None and not c})
        if not choices:
            raise ValueError(f"no watchable item has a {attr}")
        value = choices[int(rng.integers(len(choices)))]
        liked = np.array([v == value for v in values[attr]]) & ~cold
        other = ~liked & ~cold
        taken = np.zeros(n, dtype=bool)
        history = []
        for _ in range(int(rng.integers(length[0], length[1] + 1))):
            pool = other if rng.random() < noise else liked
            pool = pool & ~taken
            if not pool.any():
                pool = ~cold & ~taken
                if not pool.any():
                    break
            p = np.where(pool, weight, 0.0)
            i = int(rng.choice(n, p=p / p.sum()))
            taken[i] = True
            history.append(ids[i])
        out.append({"user": f"user-{u:04d}", "prefers": {attr: value}, "history": history})
    return Histories(
        users=out,
        unwatched=[ids[i] for i in np.flatnonzero(cold)],
        popularity=dict(zip(ids, weight.tolist())),
    )


def oracle_recall(
    h: Histories,
    rows: Sequence[dict],
    attributes: dict[str, Extractor] = ATTRIBUTES,
    k: int = 10,
    popularity: bool = True,
) -> float:
    """Leave-last-out recall@k of the oracle that knows each user's preference (users with
    2+ items): the unseen preferred items by popularity, then the other unseen items. With
    ``popularity=False``, the oracle knows the preference but not the popularity (what a
    recommender from content alone can reach): the unseen preferred items in a random
    order, then the others; its expected recall, exactly."""
    by_id = {str(r["id"]): r for r in rows}
    ids = list(by_id)
    hits = 0.0
    total = 0
    for user in h.users:
        if len(user["history"]) < 2:
            continue
        (attr, value), *_ = user["prefers"].items()
        seen, held = set(user["history"][:-1]), user["history"][-1]
        unseen = [i for i in ids if i not in seen]
        liked = {i for i in unseen if attributes[attr](by_id[i]) == value}
        total += 1
        if popularity:
            ranked = sorted(unseen, key=lambda i: (i not in liked, -h.popularity[i], i))
            hits += held in ranked[:k]
        elif held in liked:
            hits += min(k, len(liked)) / len(liked)
        elif held in unseen and len(unseen) > len(liked):
            hits += max(0, k - len(liked)) / (len(unseen) - len(liked))
    return hits / total if total else 0.0


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_histories(out_dir: str | os.PathLike, h: Histories) -> Path:
    """``OUT/histories.jsonl`` and ``OUT/unwatched.txt``; returns the histories' path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "histories.jsonl"
    _atomic_text(path, "".join(json.dumps(u, ensure_ascii=False) + "\n" for u in h.users))
    _atomic_text(out / "unwatched.txt", "".join(i + "\n" for i in h.unwatched))
    return path


def read_manifest(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def histories_for(manifest: str | os.PathLike, out_dir, users: int, seed: int = 0) -> float:
    """Write the histories of the toy dataset at ``manifest``; returns the oracle's
    recall@10 (what ``toydata.py --histories`` and this script's CLI print)."""
    rows = read_manifest(manifest)
    attributes = attributes_for(rows)
    h = make_histories(rows, attributes, users=users, seed=seed)
    write_histories(out_dir, h)
    return oracle_recall(h, rows, attributes, k=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="toyhistories.py", description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="the toy dataset's manifest.jsonl")
    p.add_argument("-o", "--out", help="output folder (default: the manifest's folder)")
    p.add_argument("--users", type=int, default=300, help="number of users (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    out = args.out or str(Path(args.manifest).parent)
    try:
        oracle = histories_for(args.manifest, out, args.users, args.seed)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(out) / "histories.jsonl")
    print(
        f"toyhistories: {args.users} users; the oracle's recall@10 is {oracle:.3f}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
