"""The toy dataset generator (examples/toydata.py): content, contract and determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import combinations, product
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from toydata import (
    COLOR_ZH,
    COLORS,
    PITCH_HZ,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    chinese_captions,
    english_captions,
    fix_articles,
    generate,
    main,
    plan,
)

from mmcli.data.text import ByteTokenizer, normalize_text
from mmcli.formats.manifest import read_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ITEMS, SEED, SECONDS, SR = 200, 3, 0.5, 16000
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    manifest = generate(out, items=ITEMS, seed=SEED, audio_seconds=SECONDS, sample_rate=SR)
    items = list(read_manifest(manifest))
    return manifest, items, {it.id: it for it in items}


def _swap_colours(text: str, c1: str, c2: str) -> str:
    swap = {c1: c2, c2: c1, "an": "a"}
    return fix_articles(" ".join(swap.get(w, w) for w in text.split(" ")))


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
            assert objs[0]["shape"] != objs[1]["shape"]
            assert objs[0]["color"] != objs[1]["color"]
        else:
            assert "swap_text" not in it.fields and "swap_id" not in it.fields
    assert {f.name for f in manifest.parent.iterdir()} == {"manifest.jsonl", "images", "audio"}


def test_counts_and_splits(toy):
    _, items, _ = toy
    assert Counter(it.fields["subset"] for it in items) == {"one-shape": 100, "two-shape": 100}
    assert Counter(it.split for it in items) == {"train": 160, "val": 20, "test": 20}
    # Any size stays close to 80/10/10, and the fraction is honoured (rounded to pairs).
    for n, frac in [(2000, 0.5), (333, 0.3), (57, 1.0)]:
        scenes = plan(n, seed=1, two_shape_fraction=frac)
        assert len(scenes) == n
        n_two = sum(s.subset == "two-shape" for s in scenes)
        assert n_two % 2 == 0 and abs(n_two - n * frac) <= 1
        share = Counter(s.split for s in scenes)
        assert abs(share["train"] / n - 0.8) < 0.03
        assert abs(share["val"] / n - 0.1) < 0.03 and abs(share["test"] / n - 0.1) < 0.03


def test_splits_do_not_leak_combinations():
    splits = defaultdict(set)
    for s in plan(2000, seed=7):
        if s.subset == "two-shape":  # both bindings and both left/right arrangements
            key = (frozenset(o.shape for o in s.objects), frozenset(o.color for o in s.objects))
        else:
            key = tuple(s.objects[0].attrs().values())
        splits[key].add(s.split)
    assert all(len(v) == 1 for v in splits.values())


def test_both_bindings_and_swap_text(toy):
    _, items, by_id = toy
    for it in (it for it in items if it.fields["subset"] == "two-shape"):
        a, b = it.fields["objects"]
        other = by_id[it.fields["swap_id"]]
        assert other.fields["swap_id"] == it.id and other.split == it.split
        # Same shapes in the same places, colours bound the other way round.
        assert [(o["shape"], o["color"]) for o in other.fields["objects"]] == [
            (a["shape"], b["color"]),
            (b["shape"], a["color"]),
        ]
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


def test_captions(toy):
    _, items, _ = toy
    tok = ByteTokenizer()
    for it in items:
        texts = it.texts
        assert len(texts) == len(set(texts)) == 4
        assert sum(t.isascii() for t in texts) >= 2 and any(CJK.search(t) for t in texts)
        for t in texts:
            assert normalize_text(t) == t and not tok.encode(t)[1]
        objs = it.fields["objects"]
        for o in objs:  # the canonical caption names every object's colour and shape
            assert f"{o['color']} {o['shape']}" in texts[0]


def test_every_caption_template_fits_the_tokenizer():
    scenes = [[Obj(*attrs)] for attrs in product(SHAPES, COLORS, SIZES, POSITIONS)]
    for s1, s2 in combinations(SHAPES, 2):
        for c1, c2 in product(COLORS, COLORS):
            if c1 != c2:
                scenes.append([Obj(s1, c1, "medium", "left"), Obj(s2, c2, "medium", "right")])
                scenes.append([Obj(s2, c1, "medium", "left"), Obj(s1, c2, "medium", "right")])
    longest = 0
    for objs in scenes:
        for t in english_captions(objs) + chinese_captions(objs):
            longest = max(longest, len(t.encode("utf-8")))
            assert " a o" not in t and not t.startswith("a o")  # "an orange"
    assert longest <= 75


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
        objs = it.fields["objects"]
        parts = np.array_split(wave, len(objs))  # left object first, right object second
        for o, part in zip(objs, parts):
            assert abs(_dominant_hz(part, sr) - PITCH_HZ[o["color"]]) <= 2 * sr / len(part)
        if len(objs) == 1:
            loud[objs[0]["size"]].append(float(np.sqrt(np.mean(wave**2))))
    assert min(loud["large"]) > max(loud["small"])


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [np.linalg.norm(rgb - np.array(COLORS[n])) for n in names]
    return names[int(np.argmin(dist))]


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
        if len(objs) == 1:
            ys, xs = np.nonzero(ink)
            x, y = xs.mean() / 96, ys.mean() / 96
            where = {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6}
            assert where.get(objs[0]["position"], 0.4 < x < 0.6 and 0.4 < y < 0.6)


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
