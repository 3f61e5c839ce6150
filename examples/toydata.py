#!/usr/bin/env python
"""Toy multimodal dataset: coloured shapes, bilingual captions and sonified audio.

    python examples/toydata.py OUT_DIR [--items 2000] [--seed 0] [--image-size 96x96]
        [--image-format png|jpg] [--audio-seconds 1.0] [--sample-rate 16000] [--no-audio]
        [--two-shape-fraction 0.5] [--quiet]

writes ``OUT_DIR/manifest.jsonl``, ``OUT_DIR/images/<id>.png`` and ``OUT_DIR/audio/<id>.wav``,
prints the manifest path on stdout and a one-line summary on stderr. From Python::

    from toydata import generate
    manifest = generate("data/toy", items=200, seed=1)

Each item is a scene of one or two coloured shapes on a light background:

* ``one-shape`` items: one shape with a colour, a size (small/large) and a position
  (left/right/top/bottom/center).
* ``two-shape`` items: two shapes of different colours side by side. Every such scene is
  generated in both *bindings* ("a red circle to the left of a blue square" and "a blue
  circle to the left of a red square") with the same geometry, so the other binding is a
  real hard negative. ``swap_text`` holds the caption of the swapped scene and
  ``swap_id`` the id of the item that shows it.

The audio sonifies the scene: colour -> pitch, shape -> waveform, size -> loudness and
left-to-right order -> time order (the left object sounds in the first half, the right
one in the second). Splits are assigned per combination, so both bindings (and both
left/right arrangements) of a two-shape combination always land in the same split.

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
from itertools import combinations, product
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
SIZES = ("small", "large")  # one-shape scenes; both objects of a two-shape scene are "medium"
POSITIONS = ("left", "right", "top", "bottom", "center")

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
SIZE_ZH = {"small": "小", "large": "大", "medium": ""}
POSITION_EN = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITION_ZH = {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间"}

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
TONE_RMS = 0.25  # RMS of a tone at gain 1
NOISE_STD = 0.004
FADE_SECONDS = 0.01

MAX_CAPTION_BYTES = 75  # mmcli's byte tokenizer: context 77 incl. BOS/EOS
SPLIT_PATTERN = ("train",) * 4 + ("val",) + ("train",) * 4 + ("test",)  # 80/10/10 for any prefix
SUPERSAMPLE = 4

# Scene geometry, as fractions of the image (x of width, y of height, radius of the short side).
_CENTRES = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 0.12, "large": 0.21, "medium": 0.17}
_PAIR_X = (0.27, 0.73)
_JITTER_XY = 0.03
_JITTER_R = 0.08
_JITTER_DEG = 10.0

# ------------------------------------------------------------------------------ captions

EN_ONE = (  # the first one is the canonical description
    "a {size} {color} {shape} {pos}",
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a picture of a {color} {shape}",
    "a picture of a {size} {color} {shape} {pos}",
    "there is a {size} {color} {shape} {pos}",
    "a {color} {shape} {pos} on a light background",
    "a drawing of a {size} {color} {shape}",
    "{pos}, a {size} {color} {shape}",
)
ZH_ONE = (
    "一个{color}的{size}{shape}在{pos}",
    "一个{color}的{shape}",
    "图片{pos}有一个{color}的{size}{shape}",
    "{pos}有一个{size}的{color}{shape}",
)
EN_TWO = (  # c1/s1 is the left object, c2/s2 the right one; the first is canonical
    "a {c1} {s1} to the left of a {c2} {s2}",
    "a {c2} {s2} to the right of a {c1} {s1}",
    "a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} next to a {c2} {s2}",
    "a picture of a {c1} {s1} next to a {c2} {s2}",
    "a {c1} {s1} on the left and a {c2} {s2} on the right",
    "on the left a {c1} {s1}, on the right a {c2} {s2}",
    "there is a {c1} {s1} left of a {c2} {s2}",
)
ZH_TWO = (
    "一个{c1}的{s1}在一个{c2}的{s2}左边",
    "一个{c2}的{s2}在一个{c1}的{s1}右边",
    "左边是一个{c1}的{s1}，右边是一个{c2}的{s2}",
    "图中有一个{c1}的{s1}和一个{c2}的{s2}",
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
        }
        return [fix_articles(t.format(**fields)) for t in EN_ONE]
    a, b = objects
    fields = {"c1": a.color, "s1": a.shape, "c2": b.color, "s2": b.shape}
    return [fix_articles(t.format(**fields)) for t in EN_TWO]


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
    fields = {
        "c1": COLOR_ZH[a.color],
        "s1": SHAPE_ZH[a.shape],
        "c2": COLOR_ZH[b.color],
        "s2": SHAPE_ZH[b.shape],
    }
    return [t.format(**fields) for t in ZH_TWO]


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


def plan(items: int, seed: int = 0, two_shape_fraction: float = 0.5) -> list[Scene]:
    """The scenes of a dataset, in output order (item ``i`` gets id ``toy-0000i``)."""
    rng = np.random.default_rng([seed, 0])
    n_two = min(2 * round(items * two_shape_fraction / 2), items - items % 2)
    n_one = items - n_two

    # One-shape combinations, cycled in a seeded order; the split follows the position
    # in that order, so repeats of a combination (with other jitter) share its split.
    singles = list(product(SHAPES, COLORS, SIZES, POSITIONS))
    order1 = rng.permutation(len(singles))
    # Two-shape combinations: an unordered pair of shapes and one of colours. Each is
    # shown in both left/right arrangements and both colour bindings, all in one split.
    doubles = list(product(combinations(SHAPES, 2), combinations(COLORS, 2)))
    order2 = rng.permutation(len(doubles))
    flips = rng.integers(0, 2, size=len(doubles))

    scenes: list[Scene] = []
    for k in range(n_one):
        i = k % len(singles)
        shape, color, size, position = singles[order1[i]]
        g = np.random.default_rng([seed, 1, k])
        geo = _jittered(g, *_CENTRES[position], _RADIUS[size], shape)
        en, zh, bg = _group_choices(g, len(EN_ONE), len(ZH_ONE))
        obj = Obj(shape, color, size, position, **geo)
        scenes.append(Scene([obj], "one-shape", SPLIT_PATTERN[i % 10], k, en, zh, bg))

    for k in range(n_two // 2):
        i = k % len(doubles)
        j = order2[i]
        (sa, sb), (ca, cb) = doubles[j]
        if flips[j] ^ ((k // len(doubles)) % 2):
            sa, sb = sb, sa
        group = n_one + k
        g = np.random.default_rng([seed, 2, k])
        geo = [_jittered(g, x, 0.5, _RADIUS["medium"], s) for x, s in zip(_PAIR_X, (sa, sb))]
        en, zh, bg = _group_choices(g, len(EN_TWO), len(ZH_TWO))
        split = SPLIT_PATTERN[i % 10]
        first = len(scenes)
        for c1, c2 in ((ca, cb), (cb, ca)):
            objs = [
                Obj(sa, c1, "medium", "left", **geo[0]),
                Obj(sb, c2, "medium", "right", **geo[1]),
            ]
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


def render_image(scene: Scene, size: tuple[int, int]) -> Image.Image:
    """Draw a scene at ``size`` (width, height): supersampled 4x, then box-filtered down."""
    w, h = size
    ss = SUPERSAMPLE
    short = min(w, h) * ss
    im = Image.new("RGB", (w * ss, h * ss), scene.background)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        cx, cy, r = o.cx * w * ss, o.cy * h * ss, o.r * short
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            continue
        t = np.deg2rad(o.angle)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        pts = _POLYGONS[o.shape] @ rot.T * r + (cx, cy)
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


def render_audio(
    scene: Scene, seconds: float, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Sonify a scene: float32 mono [round(seconds * sample_rate)] in [-1, 1].

    One object sounds for the whole clip; two objects sound one after the other, the left
    one in the first half and the right one in the second.
    """
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    bounds = np.linspace(0, n, len(scene.objects) + 1).astype(int)
    for o, a, b in zip(scene.objects, bounds[:-1], bounds[1:]):
        gain = TONE_RMS * GAIN[o.size] * rng.uniform(0.95, 1.05)
        out[a:b] += _tone(o.shape, o.color, b - a, sample_rate) * _fade(b - a, sample_rate) * gain
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
    two_shape_fraction: float = 0.5,
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

    out = Path(out_dir)
    images_dir, audio_dir = out / "images", out / "audio"
    manifest = out / "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    images_dir.mkdir(exist_ok=True)
    if audio:
        audio_dir.mkdir(exist_ok=True)

    scenes = plan(items, seed, two_shape_fraction)
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
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=out)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="toydata.py",
        description="Generate the toy multimodal dataset (shapes, captions, sonified audio).",
        epilog="example: python examples/toydata.py data/toy --items 200 --seed 1",
    )
    p.add_argument("out_dir", help="output folder (manifest.jsonl, images/, audio/)")
    p.add_argument("--items", type=int, default=2000, help="number of items (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=_image_size, default=(96, 96), help="WxH (default 96x96)")
    p.add_argument("--image-format", choices=("png", "jpg", "jpeg"), default="png")
    p.add_argument("--audio-seconds", type=float, default=1.0, help="clip length (default 1.0)")
    p.add_argument("--sample-rate", type=int, default=16000, help="audio rate (default 16000)")
    p.add_argument("--no-audio", action="store_true", help="write no audio files")
    p.add_argument(
        "--two-shape-fraction",
        type=float,
        default=0.5,
        help="share of two-shape (attribute binding) items (default 0.5)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
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
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(f"toydata: {args.items} items in {seconds:.1f} s -> {manifest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
