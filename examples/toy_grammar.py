"""Parse a caption of the toy data back into the scene it describes.

    from toy_grammar import parse_caption, judge
    parse_caption("a small red circle to the left of a large blue cross")
    # [{"shape": "circle", "color": "red", "size": "small", "position": "left"},
    #  {"shape": "cross", "color": "blue", "size": "large", "position": "right"}]
    judge(caption, item["objects"])   # {"parsed", "binding", "exact"}

The grammar is exactly the caption templates of ``toydata.py`` (English and Chinese, one
and two shapes): a caption parses when it is one of them with attribute words filled
in, and comes back as the manifest's ``objects`` (left object first). Only numpy-free
standard library code: no torch.
"""

from __future__ import annotations

import functools
import re
import string

from toydata import (
    COLOR_ZH,
    COLORS,
    EN_ONE,
    EN_TWO,
    PAIR_SIZES,
    POSITION_EN,
    POSITION_EN_ALT,
    POSITION_ZH,
    SHAPE_ZH,
    SHAPES,
    SIZE_ZH,
    SIZES,
    ZH_ONE,
    ZH_TWO,
)


def _alt(name: str, words: dict[str, str]) -> str:
    """A named group matching any of the words (longest first), mapped back by ``words``."""
    return (
        f"(?P<{name}>" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"
    )


def _object(n: str, zh: bool) -> str:
    if zh:
        return (
            _alt(f"size{n}", {SIZE_ZH[s]: s for s in PAIR_SIZES})
            + "的"
            + _alt(f"color{n}", {v: k for k, v in COLOR_ZH.items()})
            + _alt(f"shape{n}", {v: k for k, v in SHAPE_ZH.items()})
        )
    return (
        _alt(f"size{n}", {s: s for s in PAIR_SIZES})
        + " "
        + _alt(f"color{n}", {c: c for c in COLORS})
        + " "
        + _alt(f"shape{n}", {s: s for s in SHAPES})
    )


def _fields(zh: bool) -> dict[str, str]:
    if zh:
        return {
            "size": _alt("size", {v: k for k, v in SIZE_ZH.items()}),
            "color": _alt("color", {v: k for k, v in COLOR_ZH.items()}),
            "shape": _alt("shape", {v: k for k, v in SHAPE_ZH.items()}),
            "pos": _alt("pos", {v: k for k, v in POSITION_ZH.items()}),
            "o1": _object("1", True),
            "o2": _object("2", True),
        }
    return {
        "size": _alt("size", {s: s for s in SIZES}),
        "color": _alt("color", {c: c for c in COLORS}),
        "shape": _alt("shape", {s: s for s in SHAPES}),
        "pos": _alt("pos", {v: k for k, v in POSITION_EN.items()}),
        "pos2": _alt("pos2", {v: k for k, v in POSITION_EN_ALT.items()}),
        "o1": _object("1", False),
        "o2": _object("2", False),
    }


def _pattern(template: str, zh: bool) -> re.Pattern:
    fields = _fields(zh)
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        # 'a' before a word may have become 'an' (toydata.fix_articles)
        out.append(re.escape(literal).replace(r"a\ ", r"an?\ ") if not zh else re.escape(literal))
        if name:
            out.append(fields[name])
    return re.compile("".join(out))


@functools.lru_cache(maxsize=1)
def _patterns() -> list[tuple[re.Pattern, int]]:
    """(pattern, number of objects) of every template."""
    return (
        [(_pattern(t, False), 1) for t in EN_ONE]
        + [(_pattern(t, True), 1) for t in ZH_ONE]
        + [(_pattern(t, False), 2) for t in EN_TWO]
        + [(_pattern(t, True), 2) for t in ZH_TWO]
    )


_BACK: dict[str, dict[str, str]] = {
    "size": {**{s: s for s in SIZES}, **{v: k for k, v in SIZE_ZH.items()}},
    "color": {**{c: c for c in COLORS}, **{v: k for k, v in COLOR_ZH.items()}},
    "shape": {**{s: s for s in SHAPES}, **{v: k for k, v in SHAPE_ZH.items()}},
    "pos": {
        **{v: k for k, v in POSITION_EN.items()},
        **{v: k for k, v in POSITION_EN_ALT.items()},
        **{v: k for k, v in POSITION_ZH.items()},
    },
}


def parse_caption(text: str) -> list[dict[str, str]] | None:
    """The objects a toy caption describes (left first), or None when it is not one."""
    text = " ".join(text.split())
    for pattern, count in _patterns():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        if count == 1:
            pos = g.get("pos") or g.get("pos2")
            return [
                {
                    "shape": _BACK["shape"][g["shape"]],
                    "color": _BACK["color"][g["color"]],
                    "size": _BACK["size"][g["size"]],
                    "position": _BACK["pos"][pos],
                }
            ]
        return [
            {
                "shape": _BACK["shape"][g[f"shape{n}"]],
                "color": _BACK["color"][g[f"color{n}"]],
                "size": _BACK["size"][g[f"size{n}"]],
                "position": side,
            }
            for n, side in (("1", "left"), ("2", "right"))
        ]
    return None


def judge(caption: str, objects: list[dict[str, str]]) -> dict[str, bool]:
    """Is ``caption`` right about a scene (the manifest's ``objects``)?

    ``parsed``: it is a caption of the grammar; ``binding``: it names the scene's shapes
    with the right colour each (which shape is red); ``exact``: every attribute right
    (shape, colour, size and position of every object)."""
    got = parse_caption(caption)
    if got is None:
        return {"parsed": False, "binding": False, "exact": False}
    pairs = sorted((o["shape"], o["color"]) for o in got)
    truth = sorted((o["shape"], o["color"]) for o in objects)
    as_set = lambda objs: sorted(tuple(sorted(o.items())) for o in objs)  # noqa: E731
    exact = as_set(got) == as_set(objects)
    return {"parsed": True, "binding": pairs == truth, "exact": exact}
