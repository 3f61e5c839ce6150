"""What every command shares: option definitions, logging, progress, error handling.

Kept light: importing this module must not import torch (``mmcli --help`` is fast).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer

from mmcli.errors import BadInput, MmcliError

# ------------------------------------------------------------------ shared options

Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or log lines on stderr.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Device = Annotated[
    str,
    typer.Option(
        help="auto (CUDA when available), cpu, cuda or cuda:N.", rich_help_panel="Compute"
    ),
]
Precision = Annotated[
    Literal["fp32", "bf16", "fp16"],
    typer.Option(help="Autocast precision (bf16/fp16 apply on CUDA).", rich_help_panel="Compute"),
]
InferencePrecision = Annotated[
    Literal["fp32", "bf16", "fp16"],
    typer.Option(
        "--precision",
        help="bf16: on the CPU the model runs in bfloat16 (weights and activations), on CUDA "
        "autocast; fp16: CUDA autocast only. fp32 on the CPU runs linear layers through oneDNN "
        "where measured faster (MMCLI_CPU_LINEAR=blas to keep torch's).",
        rich_help_panel="Compute",
    ),
]
#: recommendation options shared by ``retrieve --like`` and ``eval --task recommend``
Aggregate = Annotated[
    Literal["mean", "max"],
    typer.Option(
        help="Recommend: an item's score is the mean or the max of its cosine to the liked "
        "(seen) items.",
        rich_help_panel="Recommend",
    ),
]
Diversity = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Recommend: MMR's λ (0: by score alone; higher: hits less alike).",
        rich_help_panel="Recommend",
    ),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Rows per batch.", rich_help_panel="Compute")]
Seed = Annotated[int, typer.Option(help="Random seed (makes CPU runs reproducible).")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Keep finished work in OUT and do the rest.")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an earlier run in OUT (only mmcli's own files in it)."
    ),
]
OnError = Annotated[
    Literal["skip", "fail"],
    typer.Option(
        help="On a corrupt or missing input file: skip it (counted, listed in OUT/errors.jsonl) or stop."
    ),
]
Workers = Annotated[int, typer.Option(min=0, help="Parallel worker processes (0 = in-process).")]
DecodeWorkers = Annotated[
    int,
    typer.Option(
        "--workers",
        min=0,
        help="Processes decoding encoded image shards (preprocess --store encoded) while "
        "the model computes (0 = in the loader thread); unused for pixels and features.",
        rich_help_panel="Compute",
    ),
]


# ---------------------------------------------------- training loop (fuse-train, distill)

_OPT, _RUN = "Optimisation", "Run"
Val = Annotated[
    list[str] | None,
    typer.Option(help="Validation data (default: the 'val' split of DATA's manifest)."),
]
Epochs = Annotated[
    int, typer.Option(min=1, help="Passes over the training items.", rich_help_panel=_OPT)
]
MaxSteps = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Stop after this many optimizer steps (overrides --epochs).",
        rich_help_panel=_OPT,
    ),
]
LearningRate = Annotated[
    float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=_OPT)
]
WeightDecay = Annotated[
    float,
    typer.Option(
        help="AdamW weight decay (not on biases, norms, temperature).", rich_help_panel=_OPT
    ),
]
Warmup = Annotated[
    float,
    typer.Option(
        help="Warmup: a fraction of all steps (< 1) or a number of steps.", rich_help_panel=_OPT
    ),
]
GradClip = Annotated[
    float, typer.Option(help="Clip the gradient norm (0 = off).", rich_help_panel=_OPT)
]
AccumSteps = Annotated[
    int,
    typer.Option(
        min=1,
        help="Micro-batches per optimizer step; losses with in-batch negatives (contrastive, "
        "sigmoid, match) get the exact gradient of one N x batch-size batch (gradient cache).",
        rich_help_panel=_OPT,
    ),
]
GradCheckpointing = Annotated[
    bool,
    typer.Option(
        "--grad-checkpointing",
        help="Recompute the trained encoders' blocks in backward: less memory, more compute.",
        rich_help_panel=_OPT,
    ),
]
TrainSplit = Annotated[str, typer.Option(help="Manifest split to train on.", rich_help_panel=_RUN)]
ValSplit = Annotated[
    str | None,
    typer.Option(
        help="Manifest split to validate on \\[default: val, when the data has one; "
        "a split named here must exist; none: no validation].",
        rich_help_panel=_RUN,
        show_default=False,
    ),
]
BestMetric = Annotated[
    str | None,
    typer.Option(help="Validation metric that picks model.safetensors.", rich_help_panel=_RUN),
]
EarlyStop = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Stop when the best metric has not improved for N evaluations (default: never).",
        rich_help_panel=_RUN,
    ),
]
SaveEvery = Annotated[
    int | None,
    typer.Option(
        min=1, help="Also checkpoint every N steps (always every epoch).", rich_help_panel=_RUN
    ),
]
LogEvery = Annotated[
    int, typer.Option(min=1, help="Log metrics every N steps.", rich_help_panel=_RUN)
]
ResumeRun = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue the run in OUT from its last checkpoint.", rich_help_panel=_RUN
    ),
]
OverwriteRun = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the run in OUT (only mmcli's files).", rich_help_panel=_RUN
    ),
]


def loop_config(**options: Any):
    """A :class:`mmcli.train.loop.LoopConfig` from the shared training options."""
    from mmcli.train.loop import LoopConfig

    options["grad_clip"] = options.get("grad_clip") or None
    return LoopConfig(**options)


# ------------------------------------------------------------------ output helpers


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"warning: {msg}"
        try:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        except (BrokenPipeError, ValueError):
            pass


def setup_logging(quiet: bool, debug: bool) -> None:
    log = logging.getLogger("mmcli")
    for h in list(log.handlers):
        if isinstance(h, _StderrHandler):
            log.removeHandler(h)
    log.addHandler(_StderrHandler())
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class _RichBar:
    def __init__(self, progress: Any, task: Any):
        self._progress, self._task = progress, task

    def update(self, n: int = 1, **fields: Any) -> None:
        info = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        self._progress.update(self._task, advance=n, info=info)


@contextlib.contextmanager
def _rich_progress(
    description: str = "", total: int | None = None, unit: str = "it"
) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RateColumn(TextColumn):
        def render(self, task):  # type: ignore[override]
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:,.0f} {unit}/s"

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(description, total=total, info="")
        yield _RichBar(p, task)


@dataclass
class Context:
    quiet: bool
    debug: bool
    started: float

    @property
    def progress(self):
        from mmcli.progress import null_progress

        return null_progress if self.quiet or not stderr_is_tty() else _rich_progress

    def info(self, message: str) -> None:
        logging.getLogger("mmcli").info(message)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def error_line(message: str) -> None:
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run (as for Ctrl-C)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def command(quiet: bool = False, debug: bool = False) -> Iterator[Context]:
    """Run a command body: set up stderr logging, turn errors into one line + exit code."""
    setup_logging(quiet, debug)
    try:
        with _sigterm_raises():
            yield Context(quiet=quiet, debug=debug, started=time.perf_counter())
    except typer.Exit:
        raise
    except _Terminated:
        error_line("terminated; finished work is kept (rerun with --resume where supported)")
        raise typer.Exit(143) from None
    except MmcliError as e:
        if debug:
            raise
        error_line(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted; finished work is kept (rerun with --resume where supported)")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); stop quietly like other Unix tools
        with contextlib.suppress(Exception):
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - avoid a second EPIPE at exit
        raise typer.Exit(0) from None
    except MemoryError:
        error_line("out of memory; lower --batch-size or --shard-size")
        raise typer.Exit(1) from None
    except Exception as e:  # an mmcli bug or an environment failure
        if debug:
            raise
        msg = _known_runtime_error(e)
        error_line(
            msg or f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)"
        )
        raise typer.Exit(1) from None


def _known_runtime_error(e: Exception) -> str | None:
    text = str(e)
    if "CUDA out of memory" in text or type(e).__name__ == "OutOfMemoryError":
        return "CUDA out of memory; lower --batch-size or use --precision bf16"
    return None


def parse_key_values(
    values: list[str] | None, option: str, *, split_commas: bool = True
) -> dict[str, str]:
    """Parse repeated ``--opt key=value`` (and ``key=value,key=value``) into a dict.

    With ``split_commas=False`` each value is one pair whose value may hold commas
    (``--encoder image=convnet:width=32,depth=3``).
    """
    out: dict[str, str] = {}
    for value in values or []:
        for part in value.split(",") if split_commas else [value]:
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise BadInput(
                    f"{option} expects key=value, got {part!r}",
                    hint=f"for example {option} image=resnet18",
                )
            key, val = part.split("=", 1)
            out[key.strip()] = val.strip()
    return out
