"""Bounds and hostile inputs through the commands: k capped at the candidates, output
templates that cannot climb out of their folder, decompression bombs and named pipes as
counted skips in preprocess and one line in retrieve (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest
from feature_files import make_pipeline, toy_pairs, write_features
from hostile import DEEP, edit_json_meta, fifo, no_hang, rewrite
from PIL import Image


@pytest.fixture(scope="module")
def index300(tmp_path_factory):
    img, ii, txt, ti = toy_pairs(300, 16, captions=(1, 1))
    return write_features(
        tmp_path_factory.mktemp("k") / "f.safetensors",
        [f"it{i}" for i in range(300)],
        {"image": (img, ii), "text": (txt, ti)},
    )


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return make_pipeline(
        tmp_path_factory.mktemp("bounds"),
        lambda *a: runner.invoke(app, [str(x) for x in a], catch_exceptions=False),
    )


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 12000 x 12000 PNG (144 megapixels; a few kB on disk)."""
    path = tmp_path_factory.mktemp("bomb") / "big.png"
    Image.new("1", (12000, 12000)).save(path)
    return path


@pytest.mark.parametrize("k", [300, 10**9, 10**30])
def test_retrieve_k_is_capped_at_the_candidates(cli, index300, k):
    r = cli(
        "retrieve", "--index", index300, "--id", "it1", "-k", k, "--no-fields", "--no-exclude-self"
    )
    assert r.exit_code == 0, r.stderr
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(line["hits"]) == 300 and [h["rank"] for h in line["hits"]] == list(range(1, 301))
    assert line["hits"][0]["id"] == "it1"


@pytest.mark.parametrize("k", ["0", "-5"])
def test_retrieve_k_below_one_is_usage(cli, index300, k):
    r = cli("retrieve", "--index", index300, "--id", "it1", "-k", k)
    assert r.exit_code == 2 and r.stdout == ""


def test_output_template_fields_cannot_leave_the_folder(cli, index300, tmp_path):
    hostile = rewrite(
        index300,
        tmp_path / "f.safetensors",
        edit_json_meta(
            "mmcli.tables", lambda t: {k: {**v, "encoder": "../../escaped"} for k, v in t.items()}
        ),
    )
    results = tmp_path / "deep" / "er" / "results"
    r = cli("eval", hostile, "-o", f"{results}/{{model}}_{{task}}.json", "-q")
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in results.iterdir()] == ["escaped_retrieval.json"]
    assert list(tmp_path.rglob("escaped_retrieval.json")) == [results / "escaped_retrieval.json"]


def _manifest(folder, rows, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (200, 30, 30)).save(folder / "ok.png")
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _errors(out):
    return [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]


def test_preprocess_skips_a_bomb_a_fifo_and_a_deep_line(cli, bomb, tmp_path):
    """Each is a counted skip with its reason; no raw Pillow warning on stderr."""
    pipe_png = fifo(tmp_path / "pipe.png")
    pipe_wav = fifo(tmp_path / "pipe.wav")
    rows = [
        {"id": "bomb", "image": str(bomb)},
        {"id": "fifo", "image": str(pipe_png)},
        {"id": "fifo-audio", "audio": str(pipe_wav), "image": "ok.png"},
        {"id": "ok", "image": "ok.png", "text": "a red square"},
    ]
    manifest = _manifest(tmp_path / "raw", rows, [DEEP])
    out = tmp_path / "out"
    with no_hang(120):
        r = cli("preprocess", manifest, "-o", out, "--image-size", 16, "--max-skip", "100%")
    assert r.exit_code == 0, r.stderr
    assert "DecompressionBomb" not in r.stderr and "Traceback" not in r.stderr
    assert "preprocessed 1 of 5 items" in r.stderr and "skipped 4" in r.stderr
    reasons = {e.get("id") or e.get("stage"): e["reason"] for e in _errors(out)}
    assert reasons["bomb"].startswith("image too large (12000x12000 = 144.0 megapixels")
    assert "named pipe" in reasons["fifo"] and "named pipe" in reasons["fifo-audio"]
    assert reasons["manifest"] == "JSON nested deeper than 100 levels"


def test_max_image_pixels_is_the_one_limit(cli, tmp_path):
    manifest = _manifest(tmp_path / "raw", [{"id": "ok", "image": "ok.png"}])  # 20 x 20
    r = cli("preprocess", manifest, "-o", tmp_path / "a", "--max-image-pixels", 399, "-q")
    assert r.exit_code == 2 and "image too large (20x20" in r.stderr  # every item skipped
    r = cli("preprocess", manifest, "-o", tmp_path / "b", "--max-image-pixels", 400, "-q")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--image-size", 10**6, "--image-size must be an integer from 1 to 4,096"),
        ("--context-length", 10**9, "--context-length must be an integer from 3 to 65,536"),
        ("--sample-rate", 10**9, "--sample-rate must be an integer from 1 to 384,000"),
    ],
)
def test_preprocess_sizes_are_bounded(cli, tmp_path, option, value, message):
    manifest = _manifest(tmp_path / "raw", [{"id": "ok", "image": "ok.png"}])
    r = cli("preprocess", manifest, "-o", tmp_path / "out", option, value)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1


def test_retrieve_image_queries_bomb_and_fifo_are_one_line(cli, pipe, bomb, tmp_path):
    base = ["retrieve", "--index", pipe["features"], "--model", pipe["model"]]
    with no_hang(120):
        r = cli(*base, "--image", bomb)
        assert (
            r.exit_code == 2 and r.stderr.count("\n") == 1 and "DecompressionBomb" not in r.stderr
        )
        assert "image too large (12000x12000" in r.stderr
        r = cli(*base, "--image", fifo(tmp_path / "q.png"))
        assert r.exit_code == 2 and "named pipe" in r.stderr and r.stderr.count("\n") == 1
        r = cli(*base, "--model", fifo(tmp_path / "m.safetensors"), "--text", "a")
        assert r.exit_code == 2 and "named pipe" in r.stderr


def test_eval_a_folder_holding_a_fifo_is_one_line(cli, index300, tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    (folder / "f.safetensors").write_bytes(index300.read_bytes())
    fifo(folder / "g.safetensors")
    with no_hang(60):
        r = cli("eval", folder)
    assert r.exit_code == 2 and "g.safetensors: the file is a named pipe" in r.stderr


def test_retrieve_checkpoint_with_a_huge_image_size_is_one_line(cli, pipe, tmp_path):
    bad = rewrite(
        pipe["model"],
        tmp_path / "m.safetensors",
        edit_json_meta(
            "mmcli.model", lambda c: (c["inputs"]["image"].update(image_size=10**6), c)[1]
        ),
    )
    img = next((pipe["root"] / "raw" / "imgs").glob("*.png"))
    r = cli("retrieve", "--index", pipe["features"], "--model", bad, "--image", img)
    assert r.exit_code == 2 and "image_size must be an integer from 1 to 4,096" in r.stderr
