from __future__ import annotations

import json
from typing import Annotated

import typer

from mmcli.cli.common import Debug, Quiet, command


def info(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Tensor/feature files, shard folders, globs, checkpoints, or - for stdin."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    quiet: Quiet = False,  # accepted like every command's; info logs nothing anyway
    debug: Debug = False,
) -> None:
    """Summarise any mmcli file: tables, rows, shapes, dtypes, items, labels, metadata.

    Examples:

        mmcli info out/tensors/

        mmcli preprocess data/manifest.jsonl -o - | mmcli info - --json
    """
    with command(quiet=True, debug=debug):
        from mmcli.formats.describe import describe

        summaries = describe(paths)
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
)


def _short_spec(spec: dict) -> str:
    """The few spec entries a person looks for (--json shows them all)."""
    return ", ".join(f"{k}={spec[k]}" for k in _SPEC_KEYS if k in spec and spec[k] is not None)


def _render(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if s["kind"] == "model":
        console.print(f"[bold]{s['path']}[/]  model checkpoint, {s['parameters']:,} parameters")
        for key in ("model", "state", "metrics", "train"):
            if s.get(key):
                console.print(f"[bold]{key}[/]: {json.dumps(s[key], ensure_ascii=False)}")
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
    if s.get("stats"):
        console.print("stats: " + ", ".join(f"{k} {v:,}" for k, v in s["stats"].items()))
    for k, v in s.get("metadata", {}).items():
        console.print(f"{k}: {json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}")
