"""retrieve --html / --copy-to: a self-contained page of queries and hits (every string
escaped, thumbnails embedded), opened in a real headless browser; the hit files copied."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import page_checks, screenshot  # noqa: E402
from feature_files import make_pipeline  # noqa: E402

from mmcli.search.gallery import gallery_html  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return make_pipeline(tmp_path_factory.mktemp("gallery"), cli)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_html_page_of_image_hits_is_self_contained_and_loads(cli, pipe, tmp_path):
    page = tmp_path / "hits.html"
    r = cli("retrieve", "--index", pipe["features"], "--model", pipe["model"],
            "--text", "a red circle", "--text", "<b>blue</b> & 'square'", "--id", "x3",
            "-k", "4", "--html", page)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = _lines(r.stdout)
    assert len(out) == 3 and all(len(o["hits"]) == 4 for o in out)
    doc = page.read_text()
    # self-contained: every image is a data: URI, nothing refers to a file or the network
    srcs = re.findall(r'<img src="([^"]*)"', doc)
    assert len(srcs) == 12 and all(s.startswith("data:image/") for s in srcs)
    assert "file:" not in doc and "http" not in doc
    # strings from data are escaped: the query text appears only escaped
    assert "<b>blue</b>" not in doc and "&lt;b&gt;blue&lt;/b&gt;" in doc
    for o in out:
        for h in o["hits"]:
            assert f'<span class="id">{h["id"]}</span>' in doc
    assert doc.count('<figure class="hit">') == 12
    # a real browser decodes every thumbnail and counts the hit cards
    checks = page_checks(page)
    assert checks == {"images": 12, "loaded": 12, "hits": 12}
    png = screenshot(page, tmp_path / "hits.png")
    assert png.stat().st_size > 5000


def test_text_hits_are_shown_as_text_and_markup_in_captions_is_escaped(pipe, tmp_path):
    lines = [{"query": {"id": "a"}, "hits": [
        {"rank": 1, "id": "<i>x</i>", "score": 0.5, "row": 1,
         "item": {"text": ["first", "<script>alert(1)</script>"], "image": "/nope.png"}}]},
        {"query": {"line": 2, "text": "<oops"}, "error": "bad JSON: <oops"}]  # fmt: skip
    doc = gallery_html(lines, target="text")
    assert '<p class="error">bad JSON: &lt;oops</p>' in doc
    assert "<script>alert(1)</script>" not in doc
    assert '<div class="text">&lt;script&gt;alert(1)&lt;/script&gt;</div>' in doc
    assert "&lt;i&gt;x&lt;/i&gt;" in doc and "<img" not in doc
    page = tmp_path / "t.html"
    page.write_text(doc)
    assert page_checks(page) == {"images": 0, "loaded": 0, "hits": 1}


def test_audio_hits_get_an_embedded_player(tmp_path):
    import wave

    wav = tmp_path / "a.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    lines = [{"query": {"text": "t"}, "hits": [
        {"rank": 1, "id": "a", "score": 0.9, "item": {"audio": str(wav), "label": "hum"}}]}]  # fmt: skip
    doc = gallery_html(lines, target="audio")
    assert re.search(r'<audio controls preload="none" src="data:audio/[a-z-]+;base64,', doc)
    assert str(wav) not in doc and '<span class="label">hum</span>' in doc


def test_copy_to_copies_the_hit_files_and_never_an_input(cli, pipe, tmp_path):
    dest = tmp_path / "hits"
    r = cli("retrieve", "--index", pipe["features"], "--model", pipe["model"],
            "--text", "a green square", "-k", "3", "--copy-to", dest)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    hits = _lines(r.stdout)[0]["hits"]
    files = sorted(p.name for p in dest.iterdir())
    assert files == [f"q001-{h['rank']:03d}-{h['id']}.png" for h in hits]
    for h in hits:
        copied = dest / f"q001-{h['rank']:03d}-{h['id']}.png"
        assert copied.read_bytes() == Path(h["item"]["image"]).read_bytes()
    # the page may not replace an input, nor the copies land in the index folder
    feat = next(Path(pipe["features"]).glob("*.safetensors"))
    before = feat.read_bytes()
    r = cli("retrieve", "--index", pipe["features"], "--id", "x1", "--html", feat)
    assert r.exit_code == 2 and "would replace an input file" in r.stderr
    r = cli("retrieve", "--index", pipe["features"], "--id", "x1", "--copy-to", pipe["features"])
    assert r.exit_code == 2 and "is where the input is read from" in r.stderr
    assert feat.read_bytes() == before
    r = cli("retrieve", "--index", pipe["features"], "--id", "x1", "--html", "-")
    assert r.exit_code == 2 and "--html and --copy-to take a path" in r.stderr
