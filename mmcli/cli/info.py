from __future__ import annotations

import json
from typing import Annotated

import typer

from mmcli.cli.common import Debug, Quiet, command


def info(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Tensor/feature files, shard folders, globs, checkpoints, run folders, raw "
            "inputs (manifest, Karpathy / COCO JSON, CSV, ImageFolder), or - for stdin."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="For a run folder: draw RUN/curves.png from its metrics.jsonl "
            "(needs pip install 'mmcli\\[plot]').",
        ),
    ] = False,
    quiet: Quiet = False,  # accepted like every command's; info logs nothing anyway
    debug: Debug = False,
) -> None:
    """Summarise any mmcli file: tables, rows, shapes, dtypes, items, labels, metadata; a
    training run folder (its configuration, steps, best metrics); or a raw input before
    preprocessing (items, captions, splits, modalities present).

    Examples:

        mmcli info out/tensors/

        mmcli info out/run/ --plot

        mmcli info data/dataset_flickr8k.json

        mmcli preprocess data/manifest.jsonl -o - | mmcli info - --json
    """
    with command(quiet=True, debug=debug):
        from mmcli.overview import summarize

        summaries = summarize(paths, plot=plot)
        if as_json:
            obj = summaries[0] if len(summaries) == 1 else {"sets": summaries}
            typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))
        else:
            for s in summaries:
                _render(s)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_SPEC_KEYS = (
    "encoder",
    "dim",
    "normalized",
    "space",
    "image_size",
    "tokenizer",
    "context_length",
    "sample_rate",
    "seconds",
    "frames",
    "fps",
)


def _short_spec(spec: dict) -> str:
    """The few spec entries a person looks for (--json shows them all)."""
    return ", ".join(f"{k}={spec[k]}" for k in _SPEC_KEYS if k in spec and spec[k] is not None)


def _render_run(console, s: dict) -> None:
    console.print(f"[bold]{s['path']}[/]  {s['command']} run (mmcli {s['mmcli']})")
    state = s.get("state") or {}
    if "step" in state:
        console.print(f"progress: step {state['step']}, epoch {state['epoch']}")
    elif s.get("last"):
        console.print(f"progress: step {s['last']['step']} (no state.safetensors)")
    if s.get("last"):
        last = s["last"]
        console.print(f"last logged: loss {last.get('loss')}, lr {last.get('lr')}")
    best = s.get("best_metrics") or {}
    if best:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in list(best.items())[:6])
        console.print(f"best: {shown}")
    if s.get("report_headline"):
        h = s["report_headline"]
        console.print(f"report: {h.get('meaning')}: student {h.get('student')}")
    args = s.get("args") or {}
    for key, value in args.items():
        console.print(f"{key}: {json.dumps(value, ensure_ascii=False, default=str)}")
    files = ", ".join(f"{k} ({_fmt_bytes(v)})" for k, v in s["files"].items())
    console.print(f"files: {files}")
    if s.get("curves"):
        console.print(f"curves: {s['curves']}")


def _render_raw(console, s: dict) -> None:
    console.print(f"[bold]{s['path']}[/]  raw input, format {s['format']}, {s['items']:,} items")
    cpi = s.get("captions_per_item")
    if s["captions"]:
        line = f"captions: {s['captions']:,}"
        if cpi:
            line += f" ({cpi['min']}-{cpi['max']} per item, mean {cpi['mean']})"
        console.print(line)
    console.print(
        "modalities: " + (", ".join(f"{m} {n:,}" for m, n in s["modalities"].items()) or "none")
    )
    console.print("splits: " + ", ".join(f"{k} {v:,}" for k, v in s["splits"].items()))
    if s.get("labels"):
        console.print(f"labels: {s['labels']} ({', '.join(s['label_counts'])})")
    if s.get("missing_files"):
        console.print(
            "missing files: " + ", ".join(f"{m} {n:,}" for m, n in s["missing_files"].items())
        )
    if s.get("rejected_lines"):
        console.print(f"rejected lines: {s['rejected_lines']}")


def _render(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if s["kind"] == "run":
        return _render_run(console, s)
    if s["kind"] == "raw":
        return _render_raw(console, s)
    if s["kind"] == "train-state":
        console.print(
            f"[bold]{s['path']}[/]  training state, step {s['step']}, epoch {s['epoch']}, "
            f"{s['tensors']} tensors, {_fmt_bytes(s['bytes'])}"
        )
        if s.get("best_metrics"):
            console.print(f"best: {json.dumps(s['best_metrics'])}")
        return None
    if s["kind"] == "model":
        console.print(f"[bold]{s['path']}[/]  model checkpoint, {s['parameters']:,} parameters")
        if s.get("embedded_files"):
            files = s["embedded_files"]
            console.print(
                f"[bold]embedded files[/]: {len(files)} ({_fmt_bytes(sum(files.values()))}: "
                f"{', '.join(sorted(files))[:160]})"
            )
        for key in ("model", "state", "metrics", "train"):
            if s.get(key):
                # a long string (a caption decoder's embedded tokenizer) as its length
                shown = json.dumps(_elide(s[key]), ensure_ascii=False)
                console.print(f"[bold]{key}[/]: {shown}")
        return
    first = s["paths"][0]
    where = first if s["shards"] == 1 else f"{first} (+{s['shards'] - 1} shards)"
    console.print(f"[bold]{where}[/]  kind {s['kind']}, format {s['format']}, {s['items']:,} items")
    if s.get("source"):
        src = s["source"]
        if src.get("input"):
            sha = (src.get("input_sha256") or "")[:12]
            extra = ", ".join(x for x in (src.get("format"), sha and f"sha256 {sha}...") if x)
            console.print(f"input: {src['input']}" + (f" ({extra})" if extra else ""))
        if src.get("manifest") and src.get("manifest") != src.get("input"):
            console.print(f"manifest: {src['manifest']}")
    if s.get("labels"):
        labels = s["labels"]
        shown = ", ".join(f"{k} {v}" for k, v in list(labels.items())[:12])
        more = f", ... ({len(labels)} labels)" if len(labels) > 12 else ""
        console.print(f"labels: {shown}{more}")
    table = Table(show_edge=False, pad_edge=False)
    for col in ("table", "rows", "dtype", "shape", "size", "spec"):
        table.add_column(col, justify="right" if col in ("rows", "size") else "left")
    for name, t in s["tables"].items():
        spec = _short_spec(t["spec"])
        table.add_row(
            name,
            f"{t['rows']:,}",
            t["dtype"],
            "×".join(map(str, t["shape"])) or "-",
            _fmt_bytes(t["bytes"]),
            spec,
        )
    console.print(table)
    for name, t in s["tables"].items():
        if t.get("store") == "encoded":
            console.print(
                f"{name}: stored encoded (the compressed files, decoded when read), "
                f"{_fmt_bytes(t['bytes_per_image'])} per image on average"
            )
        elif t.get("store") == "pixels":
            console.print(f"{name}: stored as pixels")
    if s.get("stats"):
        console.print("stats: " + ", ".join(f"{k} {v:,}" for k, v in s["stats"].items()))
    for k, v in s.get("metadata", {}).items():
        console.print(f"{k}: {json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}")


def _elide(v, most: int = 400):
    """Strings longer than ``most`` shown as their length (``--json`` keeps them whole)."""
    if isinstance(v, str) and len(v) > most:
        return f"<{len(v):,} characters>"
    if isinstance(v, dict):
        return {k: _elide(x, most) for k, x in v.items()}
    if isinstance(v, list):
        return [_elide(x, most) for x in v]
    return v
