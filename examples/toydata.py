#!/usr/bin/env python
"""Toy multimodal dataset: coloured shapes, bilingual captions and sonified audio.

    python examples/toydata.py OUT_DIR [--items 2000] [--seed 0] [--image-size 96x96]
        [--image-format png|jpg] [--audio-seconds 1.0] [--sample-rate 16000] [--no-audio]
        [--two-shape-fraction 0.7] [--quiet]

writes ``OUT_DIR/manifest.jsonl``, ``OUT_DIR/images/<id>.png`` and ``OUT_DIR/audio/<id>.wav``,
prints the manifest path on stdout and a one-line summary on stderr. From Python::

    from toydata import generate
    manifest = generate("data/toy", items=200, seed=1)

Each item is a scene of one or two coloured shapes on a light background:

* ``one-shape`` items: one shape with a colour, a size (small/medium/large) and one of
  nine positions (left/right/top/bottom/center and the four corners, "top left", ...):
  5 x 6 x 3 x 9 = 810 distinct scenes.
* ``two-shape`` items: a (size, colour, shape) object to the left of another one, with
  different shapes and different colours, sizes small/large: 20 x 30 x 4 = 2,400 distinct
  scenes. Every layout is generated in both colour *bindings* ("a small red circle to the
  left of a large blue square" and "a small blue circle to the left of a large red
  square") with the same geometry, so the other binding is a real hard negative.
  ``swap_text`` holds the caption of the swapped scene and ``swap_id`` the id of the item
  that shows it; two-shape items therefore come in pairs.

Every item of a dataset shows a different combination of the attributes its captions
describe (sampled without replacement, so ``items`` is bounded by the two spaces above),
and every caption names all of them, so each caption describes exactly one image.

The audio sonifies the scene: colour -> pitch, shape -> waveform, size -> loudness and
left-to-right -> time order (the left object of a pair sounds in the first half, the
right one in the second). A single shape sounds throughout, loudest early, in the middle
or late for a left, central or right position, with a fast tremolo at the top, a slow one
at the bottom and none in the middle row. Splits are 80/10/10 (per subset), and both
bindings of a layout always land in the same split.

Only numpy, Pillow, soundfile and the standard library are needed (no torch).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from itertools import combinations, permutations, product
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {  # name -> RGB, well separated from each other and from the light background
    "red": (220, 40, 40),
    "orange": (250, 135, 20),
    "yellow": (235, 200, 0),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
SIZES = ("small", "medium", "large")  # one-shape scenes
PAIR_SIZES = ("small", "large")  # each object of a two-shape scene
POSITIONS = (
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)

COLOR_ZH = {
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "green": "绿色",
    "blue": "蓝色",
    "purple": "紫色",
}
SHAPE_ZH = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "五角星",
    "cross": "十字形",
}
SIZE_ZH = {"small": "小", "medium": "中号", "large": "大"}  # always followed by 的
POSITION_EN = {  # the canonical phrase
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
POSITION_EN_ALT = {  # a second wording, used by some paraphrases
    "left": "on the left side",
    "right": "on the right side",
    "top": "near the top",
    "bottom": "near the bottom",
    "center": "at the center",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
POSITION_ZH = {
    "left": "左边",
    "right": "右边",
    "top": "上方",
    "bottom": "下方",
    "center": "中间",
    "top left": "左上角",
    "top right": "右上角",
    "bottom left": "左下角",
    "bottom right": "右下角",
}

# Sonification. Pitches are a fourth (5 semitones) apart from A3, so no colour's
# fundamental is a harmonic of another's; each waveform keeps its fundamental dominant.
PITCH_HZ = {c: round(220.0 * 2 ** (5 * i / 12), 2) for i, c in enumerate(COLORS)}
WAVEFORMS = {
    "circle": "sine",
    "square": "square",
    "triangle": "triangle",
    "star": "sawtooth",
    "cross": "pulse",
}
GAIN = {"small": 0.5, "medium": 0.75, "large": 1.0}  # size -> loudness
TONE_RMS = 0.16  # RMS of a tone at gain 1 (peaks stay below ~0.85)
NOISE_STD = 0.004
FADE_SECONDS = 0.01
# One-shape position: the horizontal column sets where in the clip the tone swells
# (fraction of the clip), the vertical row a tremolo rate (Hz, 0 = steady).
SWELL_AT = {"left": 1 / 6, "center": 0.5, "right": 5 / 6}
SWELL_FLOOR, SWELL_WIDTH = 0.3, 0.12
TREMOLO_HZ = {"top": 12.0, "middle": 0.0, "bottom": 5.0}
TREMOLO_DEPTH = 0.6

MAX_CAPTION_BYTES = 75  # mmcli's byte tokenizer: context 77 incl. BOS/EOS
SPLIT_PATTERN = ("train",) * 4 + ("val",) + ("train",) * 4 + ("test",)  # 80/10/10 for any prefix
SUPERSAMPLE = 4

# Scene geometry, as fractions of the image (x of width, y of height, radius of the short
# side). The largest shape reaches 1.13 radii from its centre (a rotated triangle), so a
# large shape in a corner keeps a margin of ~2.5% of the image and the two objects of a
# pair never cross the vertical midline.
_GRID = (0.26, 0.5, 0.74)
_RADIUS = {"small": 0.08, "medium": 0.125, "large": 0.175}
_PAIR_X = (0.25, 0.75)
_JITTER_XY = 0.02
_JITTER_R = 0.08
_JITTER_DEG = 10.0


def column(position: str) -> str:
    """'left', 'center' or 'right': the horizontal part of a position."""
    words = position.split()
    return "left" if "left" in words else "right" if "right" in words else "center"


def row(position: str) -> str:
    """'top', 'middle' or 'bottom': the vertical part of a position."""
    words = position.split()
    return "top" if "top" in words else "bottom" if "bottom" in words else "middle"


def _centre(position: str) -> tuple[float, float]:
    x = _GRID[("left", "center", "right").index(column(position))]
    y = _GRID[("top", "middle", "bottom").index(row(position))]
    return x, y


# ------------------------------------------------------------------- combination spaces


def one_shape_combos() -> list[tuple[str, str, str, str]]:
    """Every one-shape scene: (shape, colour, size, position), 810 of them."""
    return list(product(SHAPES, COLORS, SIZES, POSITIONS))


def two_shape_layouts() -> list[tuple[str, str, str, str, str, str]]:
    """Every two-shape layout (s1, z1, s2, z2, ca, cb): left object s1 of size z1, right
    object s2 of size z2, colours {ca, cb}. Each layout is shown in both bindings (ca on
    the left and cb on the left), so 1,200 layouts give the 2,400 two-shape scenes."""
    return [
        (s1, z1, s2, z2, ca, cb)
        for (s1, s2), z1, z2, (ca, cb) in product(
            permutations(SHAPES, 2), PAIR_SIZES, PAIR_SIZES, combinations(COLORS, 2)
        )
    ]


MAX_ONE_SHAPE = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)  # 810
MAX_TWO_SHAPE = (  # 2,400
    len(SHAPES) * (len(SHAPES) - 1) * len(COLORS) * (len(COLORS) - 1) * len(PAIR_SIZES) ** 2
)


def _subset_counts(items: int, two_shape_fraction: float) -> tuple[int, int]:
    """(one-shape, two-shape) item counts; the two-shape count is even (binding pairs)."""
    n_two = min(2 * round(items * two_shape_fraction / 2), items - items % 2)
    return items - n_two, n_two


def max_items(two_shape_fraction: float = 0.7) -> int:
    """The most items a dataset can have at this fraction with every scene distinct."""
    for n in range(MAX_ONE_SHAPE + MAX_TWO_SHAPE, 0, -1):
        n_one, n_two = _subset_counts(n, two_shape_fraction)
        if n_one <= MAX_ONE_SHAPE and n_two <= MAX_TWO_SHAPE:
            return n
    return 0


# ------------------------------------------------------------------------------ captions

EN_ONE = (  # the first one is the canonical description; pos2 is the alternative wording
    "a {size} {color} {shape} {pos}",
    "{pos} there is a {size} {color} {shape}",
    "a picture of a {size} {color} {shape} {pos2}",
    "there is a {size} {color} {shape} {pos}",
    "a drawing of a {size} {color} {shape} {pos2}",
    "a {size} {color} {shape} {pos} of the image",
    "{pos2}: a {size} {color} {shape}",
    "a {size} {color} {shape} {pos} on a light background",
)
ZH_ONE = (
    "{pos}有一个{size}的{color}{shape}",
    "一个{size}的{color}{shape}在{pos}",
    "图片{pos}是一个{size}的{color}{shape}",
    "{pos}画着一个{size}的{color}{shape}",
)
EN_TWO = (  # o1 is the left object ("small red circle"), o2 the right one; first is canonical
    "a {o1} to the left of a {o2}",
    "a {o2} to the right of a {o1}",
    "a {o1} on the left and a {o2} on the right",
    "on the left a {o1}, on the right a {o2}",
    "a picture of a {o1} left of a {o2}",
    "there is a {o1} to the left of a {o2}",
    "a {o2} on the right and a {o1} on the left",
    "a {o1} with a {o2} to its right",
)
ZH_TWO = (  # o1/o2 as in EN_TWO ("小的红色圆形")
    "一个{o1}在一个{o2}左边",
    "一个{o2}在一个{o1}右边",
    "左边是{o1}，右边是{o2}",
    "图中{o1}在左，{o2}在右",
)
EN_PER_ITEM = 3  # canonical + 2 sampled paraphrases
ZH_PER_ITEM = 1

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def fix_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle'."""
    return _ARTICLE.sub("an ", text)


@dataclass(frozen=True)
class Obj:
    """One drawn object: its attributes and its (jittered) geometry."""

    shape: str
    color: str
    size: str
    position: str
    cx: float = 0.5  # centre, fraction of the image width
    cy: float = 0.5  # centre, fraction of the image height
    r: float = 0.2  # radius, fraction of the short side
    angle: float = 0.0  # rotation in degrees

    def attrs(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": self.position,
        }


def english_captions(objects: list[Obj]) -> list[str]:
    """Every English caption template rendered for a scene (canonical first)."""
    if len(objects) == 1:
        (o,) = objects
        fields = {
            "size": o.size,
            "color": o.color,
            "shape": o.shape,
            "pos": POSITION_EN[o.position],
            "pos2": POSITION_EN_ALT[o.position],
        }
        return [fix_articles(t.format(**fields)) for t in EN_ONE]
    a, b = objects
    fields = {"o1": f"{a.size} {a.color} {a.shape}", "o2": f"{b.size} {b.color} {b.shape}"}
    return [fix_articles(t.format(**fields)) for t in EN_TWO]


def _zh_object(o: Obj) -> str:
    return f"{SIZE_ZH[o.size]}的{COLOR_ZH[o.color]}{SHAPE_ZH[o.shape]}"


def chinese_captions(objects: list[Obj]) -> list[str]:
    """Every Chinese caption template rendered for a scene."""
    if len(objects) == 1:
        (o,) = objects
        fields = {
            "size": SIZE_ZH[o.size],
            "color": COLOR_ZH[o.color],
            "shape": SHAPE_ZH[o.shape],
            "pos": POSITION_ZH[o.position],
        }
        return [t.format(**fields) for t in ZH_ONE]
    a, b = objects
    return [t.format(o1=_zh_object(a), o2=_zh_object(b)) for t in ZH_TWO]


# ---------------------------------------------------------------------------------- plan


@dataclass
class Scene:
    objects: list[Obj]
    subset: str  # "one-shape" | "two-shape"
    split: str
    group: int  # scenes of one group share geometry and caption templates (the two bindings)
    en_pick: tuple[int, ...]  # indices into the English templates
    zh_pick: tuple[int, ...]
    background: tuple[int, int, int]
    partner: int | None = None  # plan index of the other binding


def _jittered(rng: np.random.Generator, x: float, y: float, r: float, shape: str):
    dx, dy = rng.uniform(-_JITTER_XY, _JITTER_XY, size=2)
    scale = rng.uniform(1 - _JITTER_R, 1 + _JITTER_R)
    angle = 0.0 if shape == "circle" else rng.uniform(-_JITTER_DEG, _JITTER_DEG)
    return {"cx": x + dx, "cy": y + dy, "r": r * scale, "angle": angle}


def _group_choices(rng: np.random.Generator, n_en: int, n_zh: int):
    extra = rng.choice(np.arange(1, n_en), size=EN_PER_ITEM - 1, replace=False)
    en = (0, *(int(i) for i in extra))
    zh = tuple(int(i) for i in rng.choice(n_zh, size=ZH_PER_ITEM, replace=False))
    background = tuple(int(v) for v in 244 + rng.integers(-6, 7, size=3))
    return en, zh, background


def plan(items: int, seed: int = 0, two_shape_fraction: float = 0.7) -> list[Scene]:
    """The scenes of a dataset, in output order (item ``i`` gets id ``toy-0000i``).

    One-shape scenes and two-shape layouts are drawn without replacement (so no two
    items show the same attribute combination); ``ValueError`` when ``items`` does not
    fit. Splits follow the draw order within each subset (80/10/10), one split per layout
    so both bindings share it.
    """
    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    if not 0.0 <= two_shape_fraction <= 1.0:
        raise ValueError(f"two_shape_fraction must be in [0, 1], got {two_shape_fraction}")
    n_one, n_two = _subset_counts(items, two_shape_fraction)
    if n_one > MAX_ONE_SHAPE or n_two > MAX_TWO_SHAPE:
        raise ValueError(
            f"items={items} is too many: every item must be a distinct scene, and at "
            f"two_shape_fraction={two_shape_fraction:g} the maximum is "
            f"{max_items(two_shape_fraction)} items ({MAX_ONE_SHAPE} one-shape and "
            f"{MAX_TWO_SHAPE} two-shape scenes exist)"
        )
    rng = np.random.default_rng([seed, 0])
    singles = one_shape_combos()
    layouts = two_shape_layouts()
    pick1 = rng.choice(len(singles), size=n_one, replace=False)
    pick2 = rng.choice(len(layouts), size=n_two // 2, replace=False)

    scenes: list[Scene] = []
    for k, i in enumerate(pick1):
        shape, color, size, position = singles[i]
        g = np.random.default_rng([seed, 1, k])
        geo = _jittered(g, *_centre(position), _RADIUS[size], shape)
        en, zh, bg = _group_choices(g, len(EN_ONE), len(ZH_ONE))
        obj = Obj(shape, color, size, position, **geo)
        scenes.append(Scene([obj], "one-shape", SPLIT_PATTERN[k % 10], k, en, zh, bg))

    for k, j in enumerate(pick2):
        s1, z1, s2, z2, ca, cb = layouts[j]
        group = n_one + k
        g = np.random.default_rng([seed, 2, k])
        geo = [_jittered(g, x, 0.5, _RADIUS[z], s) for x, s, z in zip(_PAIR_X, (s1, s2), (z1, z2))]
        en, zh, bg = _group_choices(g, len(EN_TWO), len(ZH_TWO))
        split = SPLIT_PATTERN[k % 10]
        first = len(scenes)
        for c1, c2 in ((ca, cb), (cb, ca)):
            objs = [Obj(s1, c1, z1, "left", **geo[0]), Obj(s2, c2, z2, "right", **geo[1])]
            scenes.append(Scene(objs, "two-shape", split, group, en, zh, bg))
        scenes[first].partner, scenes[first + 1].partner = first + 1, first

    perm = rng.permutation(len(scenes))
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    out = [scenes[p] for p in perm]
    return [s if s.partner is None else replace(s, partner=int(where[s.partner])) for s in out]


# ------------------------------------------------------------------------------- drawing


def _unit_polygon(shape: str) -> np.ndarray:
    if shape == "square":
        a = 0.82
        return np.array([(-a, -a), (a, -a), (a, a), (-a, a)])
    if shape == "triangle":
        t = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(t), np.sin(t) + 0.25], axis=1) * 1.15
    if shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([np.cos(t) * radius, np.sin(t) * radius + 0.08], axis=1)
    if shape == "cross":
        w = 0.32
        return np.array(
            [
                (-w, -1),
                (w, -1),
                (w, -w),
                (1, -w),
                (1, w),
                (w, w),
                (w, 1),
                (-w, 1),
                (-w, w),
                (-1, w),
                (-1, -w),
                (-w, -w),
            ]
        )
    raise ValueError(f"unknown shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _outline(o: Obj, w: float, h: float) -> np.ndarray:
    """The polygon of a non-circle object in pixels of a w x h canvas, [K, 2] (x, y)."""
    t = np.deg2rad(o.angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return _POLYGONS[o.shape] @ rot.T * (o.r * min(w, h)) + (o.cx * w, o.cy * h)


def object_bounds(o: Obj, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of an object drawn on a ``size`` (width, height) image."""
    w, h = size
    if o.shape == "circle":
        r = o.r * min(w, h)
        return o.cx * w - r, o.cy * h - r, o.cx * w + r, o.cy * h + r
    pts = _outline(o, w, h)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def render_image(scene: Scene, size: tuple[int, int]) -> Image.Image:
    """Draw a scene at ``size`` (width, height): supersampled 4x, then box-filtered down."""
    w, h = size
    ss = SUPERSAMPLE
    im = Image.new("RGB", (w * ss, h * ss), scene.background)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(object_bounds(o, (w * ss, h * ss)), fill=fill)
        else:
            pts = _outline(o, w * ss, h * ss)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return im.reduce(ss)


# --------------------------------------------------------------------------------- audio


@functools.lru_cache(maxsize=256)
def _tone(shape: str, color: str, n: int, sample_rate: int) -> np.ndarray:
    """Band-limited tone (additive synthesis below 0.45 * sample_rate), RMS 1. Read-only."""
    f0 = PITCH_HZ[color]
    x = 2 * np.pi * f0 * np.arange(n) / sample_rate
    kmax = max(1, min(40, int(0.45 * sample_rate / f0)))
    kind = WAVEFORMS[shape]
    wave = np.zeros(n)
    for k in range(1, kmax + 1):
        if kind == "sine":
            amp = 1.0 if k == 1 else 0.0
        elif kind == "square":
            amp = 1.0 / k if k % 2 else 0.0
        elif kind == "triangle":
            amp = (-1) ** ((k - 1) // 2) / k**2 if k % 2 else 0.0
        elif kind == "sawtooth":
            amp = (-1) ** (k + 1) / k
        else:  # pulse, 25% duty cycle
            amp = np.sin(np.pi * k * 0.25) / k
        if amp:
            wave += amp * (np.sin(k * x) if kind != "pulse" else np.cos(k * x))
    wave /= np.sqrt(np.mean(wave**2))
    wave.setflags(write=False)
    return wave


def _fade(n: int, sample_rate: int) -> np.ndarray:
    m = max(1, min(int(FADE_SECONDS * sample_rate), n // 4))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / m)
    env = np.ones(n)
    env[:m] = ramp
    env[n - m :] = ramp[::-1]
    return env


@functools.lru_cache(maxsize=64)
def _position_envelope(position: str, n: int, sample_rate: int) -> np.ndarray:
    """Amplitude envelope of a one-shape tone (mean square 1): a swell early, mid-clip or
    late for the left, centre or right column, times a tremolo whose rate gives the row."""
    t = np.arange(n) / n
    swell = np.exp(-0.5 * ((t - SWELL_AT[column(position)]) / SWELL_WIDTH) ** 2)
    env = SWELL_FLOOR + (1 - SWELL_FLOOR) * swell
    rate = TREMOLO_HZ[row(position)]
    if rate:
        phase = 2 * np.pi * rate * np.arange(n) / sample_rate
        env = env * (1 - TREMOLO_DEPTH * (0.5 - 0.5 * np.cos(phase)))
    env /= np.sqrt(np.mean(env**2))
    env.setflags(write=False)
    return env


def render_audio(
    scene: Scene, seconds: float, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Sonify a scene: float32 mono [round(seconds * sample_rate)] in [-1, 1].

    One object sounds for the whole clip, shaped by its position (see
    ``_position_envelope``); two objects sound one after the other, the left one in the
    first half and the right one in the second. Each object's RMS is set by its size.
    """
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    bounds = np.linspace(0, n, len(scene.objects) + 1).astype(int)
    for o, a, b in zip(scene.objects, bounds[:-1], bounds[1:]):
        gain = TONE_RMS * GAIN[o.size] * rng.uniform(0.95, 1.05)
        wave = _tone(o.shape, o.color, b - a, sample_rate) * gain
        if len(scene.objects) == 1:
            wave = wave * _position_envelope(o.position, b - a, sample_rate)
        out[a:b] += wave * _fade(b - a, sample_rate)
    out += rng.normal(0.0, NOISE_STD, size=n)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------ manifest

_MEDIA_NAME = re.compile(r"^toy-\d+\.(png|jpg|wav)$")


def _row(scenes: list[Scene], i: int, ids: list[str], paths: dict[str, str]) -> dict:
    s = scenes[i]
    en, zh = english_captions(s.objects), chinese_captions(s.objects)
    row = {"id": ids[i], "image": paths["image"]}
    row["text"] = [en[j] for j in s.en_pick] + [zh[j] for j in s.zh_pick]
    if "audio" in paths:
        row["audio"] = paths["audio"]
    row["label"] = s.objects[0].shape
    row["split"] = s.split
    row["subset"] = s.subset
    if s.partner is not None:
        row["swap_text"] = english_captions(scenes[s.partner].objects)[0]
        row["swap_id"] = ids[s.partner]
    row["objects"] = [o.attrs() for o in s.objects]
    return row


def _remove_stale(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _MEDIA_NAME.match(p.name) and p.name not in keep:
            p.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def generate(
    out_dir: str | os.PathLike,
    items: int = 2000,
    seed: int = 0,
    image_size: tuple[int, int] = (96, 96),
    image_format: str = "png",
    audio_seconds: float = 1.0,
    sample_rate: int = 16000,
    audio: bool = True,
    two_shape_fraction: float = 0.7,
) -> Path:
    """Write the toy dataset into ``out_dir`` and return the manifest's path.

    Re-running over an existing folder replaces it: the old manifest is removed first,
    media files are (re)written, files of the old run that are no longer listed are
    deleted, and the new manifest is written last (temp file + rename), so a killed run
    leaves no manifest rather than one that disagrees with its files.
    """
    image_format = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    w, h = (int(v) for v in image_size)
    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    if w < 16 or h < 16:
        raise ValueError(f"image_size must be at least 16x16, got {w}x{h}")
    if not 0.0 <= two_shape_fraction <= 1.0:
        raise ValueError(f"two_shape_fraction must be in [0, 1], got {two_shape_fraction}")
    if audio and (sample_rate < 4000 or audio_seconds * sample_rate < 256):
        raise ValueError("audio needs sample_rate >= 4000 and at least 256 samples per clip")

    scenes = plan(items, seed, two_shape_fraction)  # raises before the folder is touched

    out = Path(out_dir)
    images_dir, audio_dir = out / "images", out / "audio"
    manifest = out / "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    images_dir.mkdir(exist_ok=True)
    if audio:
        audio_dir.mkdir(exist_ok=True)

    width = max(5, len(str(items - 1)))
    ids = [f"toy-{i:0{width}d}" for i in range(items)]
    image_names, audio_names, rows = set(), set(), []
    save_kw = (
        {"format": "PNG", "compress_level": 6}
        if image_format == "png"
        else {
            "format": "JPEG",
            "quality": 95,
        }
    )
    for i, scene in enumerate(scenes):
        name = f"{ids[i]}.{image_format}"
        render_image(scene, (w, h)).save(images_dir / name, **save_kw)
        image_names.add(name)
        paths = {"image": f"images/{name}"}
        if audio:
            rng = np.random.default_rng([seed, 3, i])
            wave = render_audio(scene, audio_seconds, sample_rate, rng)
            aname = f"{ids[i]}.wav"
            sf.write(audio_dir / aname, wave, sample_rate, subtype="PCM_16", format="WAV")
            audio_names.add(aname)
            paths["audio"] = f"audio/{aname}"
        rows.append(_row(scenes, i, ids, paths))

    _remove_stale(images_dir, image_names)
    _remove_stale(audio_dir, audio_names)
    return write_rows(manifest, rows)


def write_rows(manifest: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as the manifest (temp file + rename: all of it or none)."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=manifest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, manifest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------- CLI


def _image_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 96x96, got {text!r}")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def _videos(args: argparse.Namespace) -> Path:
    """``--video``: the toy videos (examples/toyvideo.py)."""
    import toyvideo

    return toyvideo.generate_videos(
        args.out_dir,
        items=args.items,
        seed=args.seed,
        image_size=args.image_size,
        frames=args.video_frames,
        fps=args.video_fps,
        audio=not args.no_audio,
        sample_rate=args.sample_rate,
    )


def _histories(manifest: Path, args: argparse.Namespace) -> None:
    """``--histories N``: users who like one colour or one shape (examples/toyhistories.py)."""
    import toyhistories

    oracle = toyhistories.histories_for(manifest, manifest.parent, args.histories, args.seed)
    if not args.quiet:
        print(
            f"toydata: {args.histories} histories, oracle recall@10 {oracle:.3f}", file=sys.stderr
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="toydata.py",
        description="Generate the toy multimodal dataset (shapes, captions, sonified audio).",
        epilog="example: python examples/toydata.py data/toy --items 200 --seed 1",
    )
    p.add_argument("out_dir", help="output folder (manifest.jsonl, images/, audio/)")
    p.add_argument(
        "--items", type=int, default=None, help="number of items (default 2000; --video: 300)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--image-size", type=_image_size, default=None, help="WxH (default 96x96; --video: 64x64)"
    )
    p.add_argument("--image-format", choices=("png", "jpg", "jpeg"), default="png")
    p.add_argument("--audio-seconds", type=float, default=1.0, help="clip length (default 1.0)")
    p.add_argument("--sample-rate", type=int, default=16000, help="audio rate (default 16000)")
    p.add_argument("--no-audio", action="store_true", help="write no audio files")
    p.add_argument(
        "--two-shape-fraction",
        type=float,
        default=0.7,
        help="share of two-shape (attribute binding) items, rounded to pairs (default 0.7)",
    )
    p.add_argument(
        "--histories",
        type=int,
        default=0,
        metavar="N",
        help="also write OUT/histories.jsonl: N users' viewing histories (examples/toyhistories.py)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.add_argument(
        "--video",
        action="store_true",
        help="write toy videos instead (moving shapes, videos/*.mp4; examples/toyvideo.py)",
    )
    p.add_argument("--video-frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--video-fps", type=int, default=8, help="video frame rate (default 8)")
    args = p.parse_args(argv)
    if args.items is None:
        args.items = 300 if args.video else 2000
    if args.image_size is None:
        args.image_size = (64, 64) if args.video else (96, 96)

    start = time.perf_counter()
    try:
        if args.video:
            manifest = _videos(args)
        else:
            manifest = generate(
                args.out_dir,
                items=args.items,
                seed=args.seed,
                image_size=args.image_size,
                image_format=args.image_format,
                audio_seconds=args.audio_seconds,
                sample_rate=args.sample_rate,
                audio=not args.no_audio,
                two_shape_fraction=args.two_shape_fraction,
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(manifest)
    if args.histories:
        _histories(manifest, args)
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(f"toydata: {args.items} items in {seconds:.1f} s -> {manifest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
