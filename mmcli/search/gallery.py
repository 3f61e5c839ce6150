"""``retrieve --html`` and ``--copy-to``: what a person looks at after a search.

    from mmcli.search.gallery import write_gallery, copy_hits
    write_gallery(lines, "hits.html", target="image", title="retrieve out/joint")
    copy_hits(lines, "hits/")   # the hit files themselves, like clip-retrieval filter

The page is one self-contained HTML file: every thumbnail is a PNG/JPEG ``data:`` URI and
every audio hit an embedded ``<audio>`` player, so it opens anywhere (mailed, copied off a
server) with nothing next to it. Every string that comes from data (ids, captions, labels,
paths, the query) is HTML-escaped. Each hit is a ``<figure class="hit">``; a small inline
script fills ``<pre id="checks">`` on load with ``{"images", "loaded", "hits"}`` (images on
the page, images decoded, hit cards) so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import mimetypes
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_path, atomic_write_bytes

THUMB = 160  # longest side of a thumbnail, in pixels
AUDIO_EMBED_MAX = 4 << 20  # audio files larger than this are linked, not embedded

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em} h2{font-size:1.05em;margin:1.6em 0 .4em}
.hits{display:flex;flex-wrap:wrap;gap:10px}
figure.hit{box-sizing:border-box;margin:0;padding:6px;width:172px;background:#fff;border:1px solid #ddd;border-radius:6px}
figure.hit img{display:block;width:160px;height:128px;object-fit:contain;margin:auto;image-rendering:pixelated}
figure.hit audio{width:160px}
figcaption{font-size:.8em;margin-top:4px;overflow-wrap:anywhere}
.rank{font-weight:bold} .score{color:#555;float:right} .label{color:#06c}
.text{font-size:.9em;padding:6px 2px} .query img{max-height:120px;image-rendering:pixelated}
.error{color:#b00} #checks{color:#999;font-size:.7em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.getElementById('checks').textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    hits: document.querySelectorAll('figure.hit').length
  });
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def thumbnail_uri(path: str | os.PathLike, size: int = THUMB) -> str | None:
    """A ``data:`` URI of a thumbnail of the image at ``path`` (None when unreadable)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            small = im.width * im.height <= 96 * 96  # small pictures: lossless
            im.save(buf, format="PNG" if small else "JPEG", quality=85)
    except (OSError, ValueError):
        return None
    kind = "png" if small else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def video_uri(path: str | os.PathLike, size: int = THUMB, frames: int = 6) -> str | None:
    """A ``data:`` URI of an animated GIF of ``frames`` frames sampled over the video at
    ``path`` (None when unreadable): motion shows, and any browser plays it."""
    from mmcli.data.video import VideoDecodeError, sampled_frames

    try:
        images = sampled_frames(path, frames)
    except (VideoDecodeError, OSError, ValueError):
        return None
    for im in images:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def audio_uri(path: str | os.PathLike) -> str | None:
    p = Path(path)
    try:
        if p.stat().st_size > AUDIO_EMBED_MAX:
            return None
        data = p.read_bytes()
    except OSError:
        return None
    mime = mimetypes.guess_type(p.name)[0] or "audio/wav"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def hit_text(hit: dict[str, Any]) -> str | None:
    """The caption a hit stands for: its row's caption, else the item's first."""
    texts = (hit.get("item") or {}).get("text")
    if not texts:
        return None
    texts = [texts] if isinstance(texts, str) else list(texts)
    row = int(hit.get("row", 0))
    return str(texts[row] if 0 <= row < len(texts) else texts[0])


def _media(item: dict[str, Any], target: str, hit: dict[str, Any]) -> str:
    if target == "text":
        text = hit_text(hit)
        return f'<div class="text">{esc(text)}</div>' if text is not None else ""
    if target == "audio" and item.get("audio"):
        uri = audio_uri(item["audio"])
        src = uri or Path(item["audio"]).resolve().as_uri()
        return f'<audio controls preload="none" src="{esc(src)}"></audio>'
    for key, make in (("image", thumbnail_uri), ("video", video_uri)):
        if item.get(key):
            uri = make(item[key])
            if uri is None:
                return f'<div class="error">unreadable {key} {esc(item[key])}</div>'
            return f'<img src="{uri}" alt="{esc(hit["id"])}">'
    text = hit_text(hit)
    return f'<div class="text">{esc(text)}</div>' if text is not None else ""


def _hit_card(hit: dict[str, Any], target: str) -> str:
    item = hit.get("item") or {}
    parts = [
        f'<span class="rank">{esc(hit["rank"])}.</span> '
        f'<span class="score" title="{esc(hit["score"])}">{_score(hit["score"])}</span>',
        f'<br><span class="id">{esc(hit["id"])}</span>',
    ]
    if item.get("label") is not None:
        parts.append(f' <span class="label">{esc(item["label"])}</span>')
    if target != "text":
        caption = hit_text(hit)
        if caption:
            parts.append(f'<br><span class="caption">{esc(caption)}</span>')
    return (
        f'<figure class="hit">{_media(item, target, hit)}<figcaption>{"".join(parts)}'
        "</figcaption></figure>"
    )


def _score(score: Any) -> str:
    try:
        return f"{float(score):.4f}"
    except (TypeError, ValueError):
        return esc(score)


def _query_head(n: int, query: Any) -> str:
    shown = esc(json.dumps(query, ensure_ascii=False))
    extra = ""
    for key, make in (("image", thumbnail_uri), ("video", video_uri)):
        if isinstance(query, dict) and isinstance(query.get(key), str):
            uri = make(query[key])
            if uri:
                extra = f'<div class="query"><img src="{uri}" alt="query {n}"></div>'
    return f'<h2 class="query">{n}. {shown}</h2>{extra}'


def gallery_html(lines: Iterable[dict[str, Any]], *, target: str, title: str = "") -> str:
    """The page for result lines of ``Retriever.run`` (the JSON lines ``retrieve`` prints)."""
    body = []
    for n, line in enumerate(lines, 1):
        body.append(f'<section class="result">{_query_head(n, line.get("query"))}')
        if "error" in line:
            body.append(f'<p class="error">{esc(line["error"])}</p>')
        else:
            cards = "".join(_hit_card(h, target) for h in line.get("hits", []))
            body.append(f'<div class="hits">{cards or "<p>no hits</p>"}</div>')
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title or 'mmcli retrieve')}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head><body><h1>{esc(title or 'mmcli retrieve')}</h1>"
        f'{"".join(body)}<pre id="checks"></pre></body></html>\n'
    )


def write_gallery(
    lines: Iterable[dict[str, Any]], path: str | os.PathLike, *, target: str, title: str = ""
) -> int:
    """Write the page atomically; returns the number of hit cards."""
    lines = list(lines)
    atomic_write_bytes(path, gallery_html(lines, target=target, title=title).encode("utf-8"))
    return sum(len(line.get("hits", [])) for line in lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "item"


def copy_hits(lines: Iterable[dict[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """Copy every hit's file (image, video or audio, from its manifest fields) into ``folder`` as
    ``q<query>-<rank>-<id><ext>`` (each copy written atomically). Text hits are written as
    ``.txt``. A name that already exists and is a source file is refused."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for n, line in enumerate(lines, 1):
        for hit in line.get("hits", []):
            item = hit.get("item") or {}
            src = item.get("image") or item.get("video") or item.get("audio")
            stem = f"q{n:03d}-{int(hit['rank']):03d}-{_safe(str(hit['id']))}"
            if src:
                dest = out / (stem + Path(src).suffix.lower())
                if not Path(src).is_file():
                    raise BadInput(f"hit {hit['id']}: file not found", where=str(src))
                if dest.exists() and os.path.samefile(src, dest):
                    raise BadInput(
                        "--copy-to would replace a hit's own file",
                        where=str(dest),
                        hint="copy to another folder",
                    )
                with atomic_path(dest) as tmp:
                    shutil.copyfile(src, tmp)
            elif hit_text(hit) is not None:
                dest = out / (stem + ".txt")
                atomic_write_bytes(dest, (hit_text(hit) + "\n").encode("utf-8"))
            else:
                continue
            written.append(dest)
    return written
