#!/usr/bin/env python
"""Toy videos: one coloured shape that moves, with captions that name the motion.

    python examples/toydata.py OUT_DIR --video [--items 300] [--seed 0] [--image-size 64x64]
        [--video-frames 16] [--video-fps 8] [--no-audio]

writes ``OUT_DIR/manifest.jsonl`` and ``OUT_DIR/videos/<id>.mp4`` (H.264, with an AAC audio
track unless ``--no-audio``). From Python::

    from toyvideo import generate_videos
    manifest = generate_videos("data/toyvideo", items=120, seed=1)

Every item is one shape (5 shapes x 6 colours) doing one of six motions: moving to the
right, to the left, up or down (small or large), growing or shrinking: 5 x 6 x (4 x 2 + 2)
= 300 distinct clips. A motion and its reverse show the same set of frames in the opposite
order, so the motion word of a caption can only be learnt from the order of several frames:
a mean over frame features cannot tell "moving to the left" from "moving to the right",
attention over frames with their positions can. The audio track sonifies the shape (the
colour's pitch, the shape's waveform, as in toydata's audio) with a loudness that rises
while the shape moves right, up or grows, and falls otherwise.

Clips come in reverse pairs that share their geometry and split, so a clip's reverse is in
every evaluation as the hard negative a mean over frames cannot separate; ``swap_id`` and
``swap_text`` name it (``fuse-train --hard-negatives swap_text --batch-with swap_id``).
Manifest rows carry ``color``, ``shape``, ``motion`` and ``size`` (so histories and
evaluations can use them), a ``label`` (the motion) and an 80/10/10 ``split``.

Needs numpy, Pillow and PyAV (``pip install av``); no torch.
"""

from __future__ import annotations

import os
from fractions import Fraction
from itertools import product
from pathlib import Path

import numpy as np
import toydata as td

MOTIONS = ("moving to the right", "moving to the left", "moving up", "moving down",
           "growing", "shrinking")  # fmt: skip
REVERSE = {"moving to the right": "moving to the left", "moving to the left": "moving to the right",
           "moving up": "moving down", "moving down": "moving up",
           "growing": "shrinking", "shrinking": "growing"}  # fmt: skip
TRANSLATIONS = MOTIONS[:4]
VIDEO_SIZES = ("small", "large")  # of translating shapes; growing / shrinking have none
_R = {"small": 0.11, "large": 0.17}
_PATH = 0.30  # a translation runs from 0.5 - _PATH to 0.5 + _PATH of the frame
_GROW = (0.06, 0.22)  # radius from / to


def video_combos() -> list[tuple[str, str, str, str | None]]:
    """Every clip: (shape, colour, motion, size or None), 300 of them."""
    moving = [
        (s, c, m, z) for s, c, m, z in product(td.SHAPES, td.COLORS, TRANSLATIONS, VIDEO_SIZES)
    ]
    sizing = [(s, c, m, None) for s, c, m in product(td.SHAPES, td.COLORS, MOTIONS[4:])]
    return moving + sizing


MAX_VIDEOS = len(td.SHAPES) * len(td.COLORS) * (len(TRANSLATIONS) * len(VIDEO_SIZES) + 2)


def captions(shape: str, color: str, motion: str, size: str | None) -> list[str]:
    """English captions of a clip, the canonical one first; each names every attribute."""
    thing = f"{size} {color} {shape}" if size else f"{color} {shape}"
    short = {"moving to the right": "moves to the right", "moving to the left": "moves to the left",
             "moving up": "moves up", "moving down": "moves down",
             "growing": "grows bigger", "shrinking": "shrinks"}[motion]  # fmt: skip
    return [
        td.fix_articles(f"a {thing} {motion}"),
        td.fix_articles(f"a {thing} that {short}"),
        f"the {thing} {short}",
    ]


def trajectory(
    motion: str, size: str | None, t: float, jitter: np.ndarray
) -> tuple[float, float, float]:
    """(cx, cy, r) at time fraction ``t`` in [0, 1] (``jitter``: dx, dy, dr of this clip)."""
    dx, dy, dr = jitter
    if motion in ("growing", "shrinking"):
        a, b = _GROW if motion == "growing" else _GROW[::-1]
        return 0.5 + dx, 0.5 + dy, (a + (b - a) * t) * (1 + dr)
    r = _R[size] * (1 + dr)
    along = 0.5 - _PATH + 2 * _PATH * t
    if motion == "moving to the left":
        along = 1.0 - along
    if motion in ("moving up", "moving down"):
        y = along if motion == "moving down" else 1.0 - along
        return 0.5 + dx, y, r
    return along, 0.5 + dy, r


def render_frames(combo, background, jitter, angle, frames: int, size: tuple[int, int]):
    """The clip's frames as PIL images. Frame k shows the motion at time fraction k / T, so
    frame k of a clip is frame T - k of its reverse: the frames that uniform sampling takes
    (the frame nearest each of N segment centres, N dividing T) are the same set for a clip
    and its reverse, in the opposite order."""
    shape, color, motion, z = combo
    out = []
    for k in range(frames):
        cx, cy, r = trajectory(motion, z, k / frames, jitter)
        obj = td.Obj(shape, color, z or "medium", "center", cx=cx, cy=cy, r=r, angle=angle)
        scene = td.Scene([obj], "video", "train", 0, (0,), (0,), background)
        out.append(td.render_image(scene, size))
    return out


def render_track(combo, seconds: float, sample_rate: int) -> np.ndarray:
    """The clip's audio: the shape's tone with a rising or falling loudness, float32."""
    shape, color, motion, _ = combo
    n = int(round(seconds * sample_rate))
    tone = td._tone(shape, color, n, sample_rate)
    ramp = np.linspace(0.15, 1.0, n)
    if motion in ("moving to the left", "moving down", "shrinking"):
        ramp = ramp[::-1]
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sample_rate))
    return (0.3 * tone * ramp * fade).astype(np.float32)


def write_video(path: Path, images, fps: int, audio: np.ndarray | None, sample_rate: int) -> None:
    """Encode PIL frames (and a mono float track) into ``path`` (H.264 + AAC in mp4)."""
    import av

    with av.open(str(path), mode="w") as out:
        v = out.add_stream("libx264", rate=Fraction(fps))
        v.width, v.height = images[0].size
        v.pix_fmt = "yuv420p"
        v.options = {"crf": "18", "preset": "veryfast", "g": str(max(1, fps))}
        a = None
        if audio is not None:
            a = out.add_stream("aac", rate=sample_rate, layout="mono")
        for im in images:
            for packet in v.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        if a is not None:
            frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = sample_rate
            for packet in a.encode(frame):
                out.mux(packet)
            for packet in a.encode():
                out.mux(packet)


def reverse_pairs() -> list[tuple[int, int]]:
    """Every clip paired with its reverse (the same shape, colour and size doing the
    opposite motion): 150 pairs of indices into :func:`video_combos`."""
    combos = video_combos()
    index = {c: i for i, c in enumerate(combos)}
    pairs = []
    for i, (s, c, m, z) in enumerate(combos):
        j = index[(s, c, REVERSE[m], z)]
        if i < j:
            pairs.append((i, j))
    return pairs


def plan_videos(items: int, seed: int) -> list[dict]:
    """The clips of a dataset, in output order. Clips come in reverse pairs (a motion and
    its opposite) drawn without replacement; the two clips of a pair share their geometry
    (jitter, angle, background) and their split (80/10/10 in draw order), so that in every
    split a clip's reverse is the hard negative a mean over frames cannot tell apart."""
    combos = video_combos()
    if not 1 <= items <= len(combos):
        raise ValueError(
            f"video items must be from 1 to {len(combos)} (every clip is distinct), got {items}"
        )
    rng = np.random.default_rng([seed, 7])
    pairs = reverse_pairs()
    pick = rng.choice(len(pairs), size=(items + 1) // 2, replace=False)
    out = []
    for k, p in enumerate(pick):
        g = np.random.default_rng([seed, 8, k])
        jitter = np.array([*g.uniform(-0.03, 0.03, size=2), g.uniform(-0.08, 0.08)])
        angle = 0.0 if combos[pairs[p][0]][0] == "circle" else float(g.uniform(-10, 10))
        background = tuple(int(v) for v in 244 + g.integers(-6, 7, size=3))
        first = len(out)
        for i in pairs[p][: min(2, items - first)]:
            out.append({"combo": combos[i], "jitter": jitter, "angle": angle,
                        "background": background, "split": td.SPLIT_PATTERN[k % 10],
                        "partner": None})  # fmt: skip
        if len(out) - first == 2:
            out[first]["partner"], out[first + 1]["partner"] = first + 1, first
    order = rng.permutation(len(out))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    shuffled = [out[i] for i in order]
    for clip in shuffled:
        if clip["partner"] is not None:
            clip["partner"] = int(where[clip["partner"]])
    return shuffled


def generate_videos(
    out_dir: str | os.PathLike,
    items: int = 300,
    seed: int = 0,
    image_size: tuple[int, int] = (64, 64),
    frames: int = 16,
    fps: int = 8,
    audio: bool = True,
    sample_rate: int = 16000,
) -> Path:
    """Write the toy videos into ``out_dir`` and return the manifest's path (written last,
    temp file + rename, so a killed run leaves no manifest)."""
    if frames < 2 or fps < 1:
        raise ValueError("videos need at least 2 frames and 1 frame per second")
    w, h = (int(v) for v in image_size)
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f"video frames must be at least 16x16 and even, got {w}x{h}")
    clips = plan_videos(items, seed)
    out = Path(out_dir)
    videos = out / "videos"
    manifest = out / "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    videos.mkdir(exist_ok=True)
    width = max(5, len(str(items - 1)))
    rows = []
    for k, clip in enumerate(clips):
        vid = f"vid-{k:0{width}d}"
        images = render_frames(
            clip["combo"], clip["background"], clip["jitter"], clip["angle"], frames, (w, h)
        )
        track = render_track(clip["combo"], frames / fps, sample_rate) if audio else None
        write_video(videos / f"{vid}.mp4", images, fps, track, sample_rate)
        shape, color, motion, z = clip["combo"]
        row_extra = {}
        if (
            clip["partner"] is not None
        ):  # the reverse clip: a hard negative (fuse-train --hard-negatives)
            row_extra = {"swap_id": f"vid-{clip['partner']:0{width}d}",
                         "swap_text": captions(*clips[clip["partner"]]["combo"])[0]}  # fmt: skip
        rows.append({"id": vid, "video": f"videos/{vid}.mp4", "text": captions(*clip["combo"]),
                     "label": motion, "split": clip["split"], "shape": shape, "color": color,
                     "motion": motion, "size": z, **row_extra})  # fmt: skip
    keep = {f"{r['id']}.mp4" for r in rows}
    for p in videos.iterdir():
        if p.suffix == ".mp4" and p.name not in keep:
            p.unlink()
    return td.write_rows(manifest, rows)


__all__ = ["MAX_VIDEOS", "MOTIONS", "captions", "generate_videos"]
