"""The toy dataset generator (examples/toydata.py): content, contract and determinism."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from toydata import (
    _POLYGONS,
    COLOR_ZH,
    COLORS,
    MAX_CAPTION_BYTES,
    MAX_ONE_SHAPE,
    MAX_TWO_SHAPE,
    PAIR_SIZES,
    PITCH_HZ,
    POSITION_ZH,
    POSITIONS,
    SHAPE_ZH,
    SHAPES,
    SIZE_ZH,
    SIZES,
    Obj,
    Scene,
    chinese_captions,
    english_captions,
    fix_articles,
    generate,
    main,
    max_items,
    object_bounds,
    one_shape_combos,
    plan,
    render_audio,
    render_image,
    two_shape_layouts,
)

from mmcli.data.text import ByteTokenizer, normalize_text
from mmcli.formats.manifest import read_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ITEMS, SEED, SECONDS, SR = 200, 3, 0.5, 16000
CJK = re.compile(r"[\u4e00-\u9fff]")
PLACE_WORDS = {"left", "right", "top", "bottom", "center"}
RADIUS = {"small": 0.08, "medium": 0.125, "large": 0.175}  # fraction of the short side


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    manifest = generate(out, items=ITEMS, seed=SEED, audio_seconds=SECONDS, sample_rate=SR)
    items = list(read_manifest(manifest))
    return manifest, items, {it.id: it for it in items}


@functools.cache
def _plan(items: int, seed: int = 0, two_shape_fraction: float = 0.7) -> tuple:
    """plan(), shared between tests (the larger plans take a fraction of a second each)."""
    return tuple(plan(items, seed, two_shape_fraction))


def _key(objects) -> tuple:
    """What the captions describe: every object's attributes, left to right."""
    return tuple(tuple((o if isinstance(o, dict) else o.attrs()).values()) for o in objects)


def _swap_colours(text: str, c1: str, c2: str) -> str:
    swap = {c1: c2, c2: c1, "an": "a"}
    return fix_articles(" ".join(swap.get(w, w) for w in text.split(" ")))


def _all_scenes() -> list[list[Obj]]:
    """Every scene the generator can make (810 one-shape + 2,400 two-shape)."""
    scenes = [[Obj(*c)] for c in one_shape_combos()]
    for s1, z1, s2, z2, ca, cb in two_shape_layouts():
        for c1, c2 in ((ca, cb), (cb, ca)):
            scenes.append([Obj(s1, c1, z1, "left"), Obj(s2, c2, z2, "right")])
    return scenes


def _assert_complete(text: str, objs: list[dict]) -> None:
    """The caption names every described attribute, and nothing it does not show."""
    if CJK.search(text):
        for o in objs:  # size, colour and shape, bound together
            assert f"{SIZE_ZH[o['size']]}的{COLOR_ZH[o['color']]}{SHAPE_ZH[o['shape']]}" in text
        assert {c for c, zh in COLOR_ZH.items() if zh in text} == {o["color"] for o in objs}
        assert {s for s, zh in SHAPE_ZH.items() if zh in text} == {o["shape"] for o in objs}
        places = {p for p, zh in POSITION_ZH.items() if zh in text}
        if len(objs) == 1:
            assert places == {objs[0]["position"]}, text
        else:
            assert ("左" in text or "右" in text) and not places - {"left", "right"}, text
        return
    words = set(re.findall(r"[a-z]+", text))
    assert words & set(COLORS) == {o["color"] for o in objs}, text
    assert words & set(SHAPES) == {o["shape"] for o in objs}, text
    assert words & set(SIZES) == {o["size"] for o in objs}, text
    if len(objs) == 1:
        assert words & PLACE_WORDS == set(objs[0]["position"].split()), text
    else:
        for o in objs:  # each object's size and colour bound to its shape
            assert f"{o['size']} {o['color']} {o['shape']}" in text, text
        assert words & PLACE_WORDS and words & PLACE_WORDS <= {"left", "right"}, text


def test_manifest_contract(toy):
    manifest, items, _ = toy
    assert manifest.name == "manifest.jsonl"
    assert [it.id for it in items] == [f"toy-{i:05d}" for i in range(ITEMS)]
    for it in items:
        assert set(it.fields) >= {"id", "image", "audio", "text", "label", "split", "subset"}
        assert it.fields["image"] == f"images/{it.id}.png"
        assert it.fields["audio"] == f"audio/{it.id}.wav"
        assert it.path("image").is_file() and it.path("audio").is_file()
        objs = it.fields["objects"]
        assert it.label == objs[0]["shape"]
        assert it.fields["subset"] == ("one-shape" if len(objs) == 1 else "two-shape")
        if len(objs) == 2:
            assert [o["position"] for o in objs] == ["left", "right"]
            assert all(o["size"] in PAIR_SIZES for o in objs)
            assert objs[0]["shape"] != objs[1]["shape"]
            assert objs[0]["color"] != objs[1]["color"]
        else:
            assert objs[0]["size"] in SIZES and objs[0]["position"] in POSITIONS
            assert "swap_text" not in it.fields and "swap_id" not in it.fields
    assert {f.name for f in manifest.parent.iterdir()} == {"manifest.jsonl", "images", "audio"}


def test_counts_and_splits(toy):
    _, items, _ = toy
    assert Counter(it.fields["subset"] for it in items) == {"one-shape": 60, "two-shape": 140}
    assert Counter(it.split for it in items) == {"train": 160, "val": 20, "test": 20}
    assert Counter((it.fields["subset"], it.split) for it in items) == {
        ("one-shape", "train"): 48,
        ("one-shape", "val"): 6,
        ("one-shape", "test"): 6,
        ("two-shape", "train"): 112,
        ("two-shape", "val"): 14,
        ("two-shape", "test"): 14,
    }
    # Any size stays close to 80/10/10, and the fraction is honoured (rounded to pairs).
    for n, frac in [(2000, 0.7), (333, 0.3), (57, 1.0), (810, 0.0)]:
        scenes = _plan(n, 1, frac)
        assert len(scenes) == n
        n_two = sum(s.subset == "two-shape" for s in scenes)
        assert n_two % 2 == 0 and abs(n_two - n * frac) <= 1
        share = Counter(s.split for s in scenes)
        assert abs(share["train"] / n - 0.8) < 0.03
        assert abs(share["val"] / n - 0.1) < 0.03 and abs(share["test"] / n - 0.1) < 0.03
    assert Counter(s.subset for s in _plan(2000)) == {"one-shape": 600, "two-shape": 1400}


def test_every_item_is_a_distinct_scene():
    assert (MAX_ONE_SHAPE, MAX_TWO_SHAPE) == (810, 2400)
    assert len(set(one_shape_combos())) == 810 and len(set(two_shape_layouts())) == 1200
    assert (max_items(0.0), max_items(0.7), max_items(1.0)) == (810, 2702, 2401)
    for n, seed, frac in [(2000, 0, 0.7), (2000, 5, 0.7), (810, 1, 0.0), (2400, 2, 1.0)]:
        keys = [_key(s.objects) for s in _plan(n, seed, frac)]
        assert len(set(keys)) == n
    # The whole space at the largest size, and every attribute value seen in training.
    scenes = plan(max_items(0.7), seed=4)
    assert len({_key(s.objects) for s in scenes}) == len(scenes) == 2702
    train = [s for s in _plan(2000, 0) if s.split == "train"]
    for subset in ("one-shape", "two-shape"):
        objs = [o for s in train if s.subset == subset for o in s.objects]
        assert {o.shape for o in objs} == set(SHAPES) and {o.color for o in objs} == set(COLORS)
        assert {o.size for o in objs} == set(SIZES if subset == "one-shape" else PAIR_SIZES)
    assert {s.objects[0].position for s in train if s.subset == "one-shape"} == set(POSITIONS)


def test_too_many_items(tmp_path, capsys):
    with pytest.raises(ValueError, match="the maximum is 2702 items"):
        plan(2703)
    with pytest.raises(ValueError, match="the maximum is 810 items"):
        plan(811, two_shape_fraction=0.0)
    out = tmp_path / "toy"
    assert main([str(out), "--items", "5000", "--no-audio"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: items=5000 is too many") and "maximum is 2702" in err
    assert not out.exists()  # nothing was written


def test_binding_partners(toy):
    _, items, by_id = toy
    for it in (it for it in items if it.fields["subset"] == "two-shape"):
        a, b = it.fields["objects"]
        other = by_id[it.fields["swap_id"]]
        assert other.fields["swap_id"] == it.id and other.split == it.split
        # Same shapes and sizes in the same places, colours bound the other way round.
        assert other.fields["objects"] == [{**a, "color": b["color"]}, {**b, "color": a["color"]}]
        swap = it.fields["swap_text"]
        assert swap == other.texts[0] and swap not in it.texts
        assert swap == _swap_colours(it.texts[0], a["color"], b["color"])
        # Every caption of the partner is this item's caption with the colours swapped.
        for mine, theirs in zip(it.texts, other.texts):
            if CJK.search(mine):
                za, zb = COLOR_ZH[a["color"]], COLOR_ZH[b["color"]]
                assert theirs == mine.replace(za, "\0").replace(zb, za).replace("\0", zb)
            else:
                assert theirs == _swap_colours(mine, a["color"], b["color"])
    # Larger plans: partners share split and geometry, in every seed.
    for seed in (0, 5):
        scenes = _plan(2000, seed)
        for i, s in enumerate(scenes):
            if s.partner is None:
                assert s.subset == "one-shape"
                continue
            p = scenes[s.partner]
            assert p.partner == i and p.split == s.split and p.group == s.group
            for mine, theirs in zip(s.objects, p.objects):
                assert (mine.cx, mine.cy, mine.r, mine.angle) == (
                    theirs.cx,
                    theirs.cy,
                    theirs.r,
                    theirs.angle,
                )
                assert (mine.shape, mine.size) == (theirs.shape, theirs.size)
            assert [o.color for o in p.objects] == [o.color for o in s.objects][::-1]


def test_captions(toy):
    _, items, _ = toy
    tok = ByteTokenizer()
    for it in items:
        texts = it.texts
        assert len(texts) == len(set(texts)) == 4
        assert sum(t.isascii() for t in texts) >= 2 and any(CJK.search(t) for t in texts)
        for t in texts:
            assert normalize_text(t) == t and not tok.encode(t)[1]
            _assert_complete(t, it.fields["objects"])
    # No caption describes two items.
    assert len({t for it in items for t in it.texts}) == 4 * ITEMS


def test_every_caption_template_is_complete_unique_and_fits():
    owner: dict[str, tuple] = {}
    longest = 0
    for objs in _all_scenes():
        attrs = [o.attrs() for o in objs]
        en, zh = english_captions(objs), chinese_captions(objs)
        assert len(en) >= 3 and len(zh) >= 1
        for t in en + zh:
            longest = max(longest, len(t.encode("utf-8")))
            assert " a o" not in t and not t.startswith("a o")  # "an orange"
            _assert_complete(t, attrs)
            assert owner.setdefault(t, _key(objs)) == _key(objs), t  # one scene per caption
    assert longest <= MAX_CAPTION_BYTES


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def test_audio_sonifies_the_scene(toy):
    _, items, _ = toy
    loud = defaultdict(list)
    for it in items:
        wave, sr = sf.read(it.path("audio"), dtype="float32")
        assert sr == SR and wave.ndim == 1 and len(wave) == round(SR * SECONDS)
        assert abs(wave[0]) < 0.02 and abs(wave[-1]) < 0.02  # faded in and out
        assert np.abs(wave).max() < 0.95  # never clipped
        objs = it.fields["objects"]
        parts = np.array_split(wave, len(objs))  # left object first, right object second
        for o, part in zip(objs, parts):
            assert abs(_dominant_hz(part, sr) - PITCH_HZ[o["color"]]) <= 2 * sr / len(part)
            loud[len(objs), o["size"]].append(float(np.sqrt(np.mean(part**2))))
    assert max(loud[1, "small"]) < min(loud[1, "medium"])
    assert max(loud[1, "medium"]) < min(loud[1, "large"])
    assert max(loud[2, "small"]) < min(loud[2, "large"])


def _one(shape, color, size, position, **geo) -> Scene:
    return Scene(
        [Obj(shape, color, size, position, **geo)],
        "one-shape",
        "train",
        0,
        (0,),
        (0,),
        (244, 244, 244),
    )


def test_audio_encodes_a_single_shapes_position():
    sr, hop = 8000, 80  # 10 ms frames
    for position in POSITIONS:
        for shape, color in [("circle", "red"), ("star", "purple"), ("cross", "green")]:
            wave = render_audio(
                _one(shape, color, "medium", position), 1.0, sr, np.random.default_rng(0)
            )
            frames = np.sqrt(np.mean(wave.reshape(-1, hop).astype(float) ** 2, axis=1))
            # Horizontal: where the energy sits in time (left early, right late).
            when = float(np.arange(len(frames)) @ frames**2 / (frames**2).sum() / len(frames))
            col = "left" if when < 0.4 else "right" if when > 0.6 else "center"
            # Vertical: tremolo rate of the (detrended) frame envelope.
            env = frames / frames.mean()
            env = env - np.convolve(env, np.ones(25) / 25, "same")
            spec = np.abs(np.fft.rfft(env[15:-15] * np.hanning(len(env) - 30)))
            freqs = np.fft.rfftfreq(len(env) - 30, hop / sr)
            fast, slow = (
                spec[(freqs > 9) & (freqs < 15)].max(),
                spec[(freqs > 3) & (freqs < 7)].max(),
            )
            vert = "top" if fast > 3 else "bottom" if slow > 3 else "middle"
            words = position.split()
            assert col == next((w for w in words if w in ("left", "right")), "center"), position
            assert vert == next((w for w in words if w in ("top", "bottom")), "middle"), position


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [np.linalg.norm(rgb - np.array(COLORS[n])) for n in names]
    return names[int(np.argmin(dist))]


def _unit_area(shape: str) -> float:
    if shape == "circle":
        return float(np.pi)
    x, y = _POLYGONS[shape].T  # shoelace
    return float(abs(x @ np.roll(y, 1) - y @ np.roll(x, 1)) / 2)


def _size_of(mask: np.ndarray, shape: str, short: int) -> str:
    """small/medium/large from the drawn area (radius ~ sqrt(area / unit area))."""
    r = np.sqrt(mask.sum() / _unit_area(shape)) / short
    return min(SIZES, key=lambda z: abs(np.log(r / RADIUS[z])))


def _place_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    x, y = xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]
    col = "left" if x < 0.38 else "right" if x > 0.62 else ""
    row = "top" if y < 0.38 else "bottom" if y > 0.62 else ""
    return f"{row} {col}".strip() or "center"


def test_images_show_the_scene(toy):
    _, items, _ = toy
    for it in items[:80]:
        with Image.open(it.path("image")) as im:
            assert im.format == "PNG" and im.size == (96, 96) and im.mode == "RGB"
            px = np.asarray(im).astype(float)
        ink = px.max(axis=2) - px.min(axis=2) > 100  # saturated = shape, not background
        objs = it.fields["objects"]
        halves = [slice(0, 48), slice(48, 96)] if len(objs) == 2 else [slice(0, 96)]
        for o, cols in zip(objs, halves):
            mask = ink[:, cols]
            assert mask.sum() > 30
            assert _nearest_colour(np.median(px[:, cols][mask], axis=0)) == o["color"]
            assert _size_of(mask, o["shape"], 96) == o["size"], (it.id, o)
        if len(objs) == 1:
            assert _place_of(ink) == objs[0]["position"], it.id


def test_every_position_and_size_is_visible_and_inside():
    # Drawn at the extremes of the jitter, every shape reads back as its position and size.
    x, y = {"left": 0.26, "right": 0.74}, {"top": 0.26, "bottom": 0.74}
    for shape in SHAPES:
        for position in POSITIONS:
            for size in SIZES:
                for dx, scale, angle in [(-0.02, 1.08, 10.0), (0.02, 0.92, -10.0)]:
                    words = position.split()
                    cx = next((x[w] for w in words if w in x), 0.5) + dx
                    cy = next((y[w] for w in words if w in y), 0.5) - dx
                    r = RADIUS[size] * scale
                    scene = _one(shape, "blue", size, position, cx=cx, cy=cy, r=r, angle=angle)
                    px = np.asarray(render_image(scene, (96, 96))).astype(float)
                    ink = px.max(axis=2) - px.min(axis=2) > 100
                    assert _place_of(ink) == position and _size_of(ink, shape, 96) == size
                    assert not (
                        ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()
                    )
    # Every object the planner places stays inside the image, and the two objects of a
    # pair stay on their own side of the midline, at any aspect ratio.
    # (Square images are the tightest case: radii are fractions of the short side.)
    scenes = _plan(810, 1, 0.0) + _plan(2400, 2, 1.0)
    for size, step in [((96, 96), 1), ((64, 48), 7), ((48, 80), 7)]:
        w, h = size
        for s in scenes[::step]:
            for o in s.objects:
                x0, y0, x1, y1 = object_bounds(o, size)
                assert x0 > 0.5 and y0 > 0.5 and x1 < w - 0.5 and y1 < h - 0.5, (o, size)
                if o.position == "left" and s.subset == "two-shape":
                    assert x1 < w / 2
                elif o.position == "right" and s.subset == "two-shape":
                    assert x0 > w / 2


def test_deterministic(tmp_path):
    kw = dict(items=24, audio_seconds=0.1, sample_rate=8000)
    a = generate(tmp_path / "a", seed=5, **kw).parent
    b = generate(tmp_path / "b", seed=5, **kw).parent
    c = generate(tmp_path / "c", seed=6, **kw).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 24
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "manifest.jsonl").read_bytes() != (c / "manifest.jsonl").read_bytes()
    same = [(a / r).read_bytes() == (c / r).read_bytes() for r in files if r.suffix == ".png"]
    assert not any(same)


def test_rerun_replaces_the_folder(tmp_path):
    generate(tmp_path, items=20, audio_seconds=0.1, sample_rate=8000)
    manifest = generate(tmp_path, items=6, audio=False, image_format="jpg", image_size=(64, 48))
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 and all("audio" not in r for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "manifest.jsonl"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"toy-{i:05d}.jpg" for i in range(6)
    ]
    with Image.open(tmp_path / rows[0]["image"]) as im:
        assert im.format == "JPEG" and im.size == (64, 48)


def test_cli_in_process(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main([str(out), "--items", "8", "--no-audio", "--two-shape-fraction", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "manifest.jsonl")
    assert "8 items" in captured.err
    assert all(it.fields["subset"] == "two-shape" for it in read_manifest(out / "manifest.jsonl"))
    assert main([str(out), "--items", "2", "--no-audio", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([str(out), "--items", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: items must be at least 1")
    with pytest.raises(SystemExit) as e:
        main([str(out), "--image-size", "big"])
    assert e.value.code == 2


def test_runs_as_a_script(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, str(EXAMPLES / "toydata.py"), str(out), "--items", "4", "--seed", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out / 'manifest.jsonl'}\n"
    assert len(list(read_manifest(proc.stdout.strip()))) == 4
