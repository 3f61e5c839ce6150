from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

import typer

from mmcli.cli.common import BatchSize, Debug, Device, Quiet, command

_DECODE = "Decoding"


def caption(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Tensor shards (files, folders, globs; - for stdin) or image / audio files. "
            "None: JSON lines on stdin.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Checkpoint with a caption decoder (fuse-train --objective caption)."
        ),
    ] = ...,  # type: ignore[assignment]
    beam: Annotated[
        int, typer.Option(min=1, help="Beam width (1: greedy).", rich_help_panel=_DECODE)
    ] = 1,
    length_penalty: Annotated[
        float,
        typer.Option(
            help="Beam search: rank by log-prob / length ** this (0: the most probable).",
            rich_help_panel=_DECODE,
        ),
    ] = 0.0,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most tokens per caption, the end token included \\[default: the model's "
            "context length - 1].",
            rich_help_panel=_DECODE,
            show_default=False,
        ),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Keep attention keys and values (--no-cache recomputes every step; same tokens).",
            rich_help_panel=_DECODE,
        ),
    ] = True,
    split: Annotated[
        str | None,
        typer.Option(help="Tensor shards: caption only the items of this split (e.g. test)."),
    ] = None,
    on_error: Annotated[
        Literal["skip", "fail"],
        typer.Option(
            help='A bad stdin line: answer it with {"query": ..., "error": ...} and go on, or '
            "stop (exit 2). Files given as arguments always stop."
        ),
    ] = "skip",
    device: Device = "auto",
    batch_size: BatchSize = 64,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Caption images (or transcribe audio) with a model's caption decoder.

    One JSON line per item on stdout: {"id", "caption", "score"} (score: the
    caption's log-probability). Inputs: tensor shards (every item, or --split),
    image / audio files as arguments, or JSON lines on stdin ({"image": path}
    or {"audio": path}, optional "id"), answered as they arrive. Greedy by
    default; --beam N for beam search. See docs/caption.md.

    Examples:

        mmcli caption out/tensors --model out/cap/model.safetensors --split test

        mmcli caption photo.jpg --model out/cap/model.safetensors --beam 3

        echo '{"image": "photo.jpg"}' | mmcli caption --model out/cap/model.safetensors
    """
    with command(quiet=quiet, debug=debug):
        from mmcli.errors import BadInput
        from mmcli.evaluate.run import resolve_device
        from mmcli.generate import Captioner, DecodeOptions

        opts = DecodeOptions(
            beam=beam, max_tokens=max_tokens, length_penalty=length_penalty, cache=cache
        )
        kind = _input_kind(list(sources or []))
        if kind == "stdin" and _stdin_is_tty():
            raise BadInput(
                "nothing to caption",
                hint='give tensor shards or files, or JSON lines on stdin ({"image": "path"})',
            )
        if split and kind != "tensors":
            raise BadInput("--split applies to tensor shards")
        captioner = Captioner.load(
            model, opts, device=resolve_device(device), batch_size=batch_size
        )
        if kind == "tensors":
            lines = captioner.caption_tensors(list(sources or []), split=split)
        elif kind == "files":
            lines = iter(captioner.caption_files(list(sources or [])))
        else:
            lines = _stdin_lines(captioner, on_error, batch_size)
        for line in lines:
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
            sys.stdout.flush()


def _input_kind(sources: list[str]) -> str:
    """``tensors`` (shards, folders, globs, -), ``files`` (media files) or ``stdin``."""
    from pathlib import Path

    from mmcli.errors import BadInput

    if not sources:
        return "stdin"
    shards = [
        s
        for s in sources
        if s == "-" or s.endswith(".safetensors") or Path(s).is_dir() or any(c in s for c in "*?[")
    ]
    if shards and len(shards) != len(sources):
        raise BadInput(
            "give tensor shards or image / audio files, not both",
            hint=f"{shards[0]} is a shard set, {next(s for s in sources if s not in shards)} a file",
        )
    return "tensors" if shards else "files"


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _bad_line(e: Exception, where: str):
    from mmcli.errors import BadInput

    if isinstance(e, json.JSONDecodeError):
        return BadInput(f"bad JSON ({e.msg} at column {e.colno})", where=where)
    return BadInput("not valid UTF-8", where=where)


def _stdin_lines(captioner, on_error: str, batch_size: int):
    """Answer stdin JSON lines batch by batch, as they arrive (bad lines: an error line)."""
    import logging

    from mmcli.errors import BadInput
    from mmcli.generate import parse_source_line
    from mmcli.search.queries import read_line_batches

    log = logging.getLogger("mmcli")
    lineno = 0
    for raw_lines in read_line_batches(sys.stdin, batch_size):
        answers: list[dict[str, Any] | None] = []
        good: list[tuple[int, str, Any]] = []
        for raw in raw_lines:
            lineno += 1
            if not raw.strip():
                continue
            where = f"line {lineno} of <stdin>"
            obj: Any = {"line": lineno}
            try:
                obj = json.loads(raw.decode("utf-8"))
                item_id, path = parse_source_line(obj, captioner.source, where)
                row = captioner.load_file(path, where=f"{path} (line {lineno} of <stdin>)")
                good.append((len(answers), item_id, row))
                answers.append(None)
            except (UnicodeDecodeError, json.JSONDecodeError, BadInput) as e:
                error = e if isinstance(e, BadInput) else _bad_line(e, where)
                if on_error == "fail":
                    raise error from None
                log.warning("%s", error)
                answers.append({"query": obj, "error": str(error)})
        if good:
            import numpy as np
            import torch

            x = torch.from_numpy(np.stack([row for _, _, row in good]))
            for (slot, _, _), line in zip(good, captioner.lines([g[1] for g in good], x)):
                answers[slot] = line
        yield from (a for a in answers if a is not None)
