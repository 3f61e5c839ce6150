from __future__ import annotations

import contextlib
import json
from typing import Annotated

import typer

from mmcli.cli.common import (
    Aggregate,
    BatchSize,
    Debug,
    Device,
    Diversity,
    InferencePrecision,
    Quiet,
    Seed,
    command,
)

Task = Annotated[
    str,
    typer.Option(
        "--task",
        help="retrieval | zeroshot | linear-probe | classify | captioning | recommend | auto "
        "(recommend with --histories, retrieval for 2+ modalities, zeroshot with --model and "
        "labels, else linear-probe).",
    ),
]


def eval_command(
    features: Annotated[
        list[str] | None,
        typer.Argument(
            help="Feature files, shard folders or globs (joined by item id when they hold different "
            "tables). With --summarize: result JSON files.",
            show_default=False,
        ),
    ] = None,
    task: Task = "auto",
    query: Annotated[
        str | None,
        typer.Option(help="Retrieval: the query table (e.g. text).", rich_help_panel="Retrieval"),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Retrieval, recommend: the candidate table (e.g. image).",
            rich_help_panel="Retrieval",
        ),
    ] = None,
    k: Annotated[
        str,
        typer.Option(
            "--k",
            "-k",
            help="Retrieval, recommend: the k of recall@k.",
            rich_help_panel="Retrieval",
        ),
    ] = "1,5,10",
    model: Annotated[
        str | None,
        typer.Option(
            help="Encodes class prompts (zeroshot; a checkpoint, open_clip:ARCH or hf:DIR) or "
            "classifies (classify); default: the model the features name, if it is there."
        ),
    ] = None,
    allow_model_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-model-mismatch",
            help="Use a --model other than the one the features record (a warning instead of "
            "exit 2); also lets retrieval pair tables of two models.",
        ),
    ] = False,
    weights: Annotated[
        str | None,
        typer.Option("--weights", "-w", help="The weights file of --model open_clip:ARCH."),
    ] = None,
    captions: Annotated[
        str | None,
        typer.Option(
            help="Captioning: mmcli caption's JSON lines (file or -); FEATURES are the tensor "
            "shards with the reference captions (or give --model to caption them now).",
            rich_help_panel="Captioning",
        ),
    ] = None,
    histories: Annotated[
        str | None,
        typer.Option(
            help='Recommend: {"user": ..., "history": \\[ids]} lines; the last item of each is '
            "held out (FEATURES: the item embeddings; --target picks the table).",
            rich_help_panel="Recommend",
        ),
    ] = None,
    aggregate: Aggregate = "mean",
    diversity: Diversity = 0.0,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Zero-shot prompt templates: one per line with {} for the class name.",
            rich_help_panel="Classification",
        ),
    ] = None,
    modality: Annotated[
        str | None,
        typer.Option(
            help="Zero-shot / linear probe: the table to classify (default: fused, image, video, audio, text).",
            rich_help_panel="Classification",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Evaluate only the items of this split (the manifest's split field), e.g. test."
        ),
    ] = None,
    train: Annotated[
        list[str] | None,
        typer.Option(
            help="Linear probe: training features (instead of manifest splits).",
            rich_help_panel="Classification",
        ),
    ] = None,
    val: Annotated[
        list[str] | None,
        typer.Option(
            help="Linear probe: validation features (weight decay choice).",
            rich_help_panel="Classification",
        ),
    ] = None,
    test: Annotated[
        list[str] | None,
        typer.Option(help="Linear probe: test features.", rich_help_panel="Classification"),
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "--out",
            "-o",
            help="Where the JSON goes: - (stdout) or a path; {model} {task} {dataset} {query} {target} are filled in.",
        ),
    ] = "-",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing -o file that is not an mmcli eval result (or summary).",
        ),
    ] = False,
    table: Annotated[
        bool, typer.Option("--table", help="Also print the metrics as a table on stderr.")
    ] = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="Also draw PNGs into this folder: recall@k curves (retrieval), confusion "
            "matrix and per-class recall (zeroshot, linear-probe, classify). Needs matplotlib.",
        ),
    ] = None,
    summarize: Annotated[
        bool,
        typer.Option(
            "--summarize",
            help="Merge result JSON files (the arguments) into one table.",
            rich_help_panel="Summaries",
        ),
    ] = False,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="--summarize output: csv, markdown or json (default: from -o's extension, else csv).",
            rich_help_panel="Summaries",
        ),
    ] = None,
    device: Device = "auto",
    precision: InferencePrecision = "fp32",
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Evaluate features: retrieval, zero-shot, linear probe, a classifier or captions.

    Prints one JSON object (metrics under "metrics", CLIP_benchmark key
    names). Retrieval runs both directions with ground truth from the
    items: text -> image is image_retrieval_*, image -> text is
    text_retrieval_* (an image is a hit when any of its captions is in its
    top k). Ranks are exact; ties go to the lower candidate index. Files
    holding different tables of the same items are joined by item id.
    See docs/eval.md.

    Examples:

        mmcli eval out/joint --k 1,5,10 --table

        mmcli eval images.safetensors texts.safetensors --query text --target image

        mmcli eval out/joint --task zeroshot --model out/run/model.safetensors

        mmcli eval --train tr/ --val va/ --test te/ -o '{model}_{task}.json'

        mmcli eval --summarize 'results/*.json' --format markdown

        mmcli eval out/tensors --task captioning --captions captions.jsonl --split test

        mmcli eval out/joint --task recommend --histories histories.jsonl --k 1,5,10
    """
    with command(quiet=quiet, debug=debug) as ctx:
        from mmcli.errors import BadInput

        if summarize:
            from mmcli.evaluate.summarize import (
                format_for,
                is_summary_file,
                load_results,
                render_summary,
            )
            from mmcli.formats.atomic import atomic_open

            with _writing(output, features or [], is_summary_file, overwrite):
                text = render_summary(load_results(features or []), format_for(output, fmt))
                with atomic_open(output) as f:
                    f.write(text)
            return
        from mmcli.evaluate.retrieval import parse_ks
        from mmcli.evaluate.run import EvalConfig, output_path, run_eval
        from mmcli.evaluate.summarize import is_result_file
        from mmcli.formats.atomic import atomic_open, is_stdio

        if not features and not (train or test):
            raise BadInput(
                "no feature files given", hint="mmcli eval FEATURES... (see mmcli eval --help)"
            )
        cfg = EvalConfig(
            features=list(features or []),
            task=task,
            query=query,
            target=target,
            ks=parse_ks(k),
            model=model,
            weights=weights,
            allow_model_mismatch=allow_model_mismatch,
            precision=precision,
            templates=templates,
            table=modality,
            split=split,
            captions=captions,
            histories=histories,
            aggregate=aggregate,
            diversity=diversity,
            train=train,
            val=val,
            test=test,
            device=device,
            batch_size=batch_size,
            seed=seed,
        )
        inputs = [*(features or []), *(train or []), *(val or []), *(test or []), model, templates,
                  histories]  # fmt: skip
        templated = "{" in output
        with contextlib.ExitStack() as stack:
            if not templated:  # locked for the whole run: a second eval -o F is refused early
                stack.enter_context(_writing(output, inputs, is_result_file, overwrite))
            if plot:
                from mmcli.formats.outputs import refuse_inputs_as_outputs
                from mmcli.plots import pyplot

                refuse_inputs_as_outputs(inputs, folder=plot, option="--plot")
                pyplot()  # matplotlib missing: say so before the evaluation runs
            details: dict | None = {} if plot else None
            result = run_eval(cfg, progress=ctx.progress, details=details)
            path = output if is_stdio(output) else output_path(output, result)
            if templated:
                stack.enter_context(_writing(path, inputs, is_result_file, overwrite))
            with atomic_open(path) as f:
                f.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        if not is_stdio(path):
            ctx.info(f"wrote {path}")
        if plot:
            from mmcli.plots.evaluation import eval_pictures

            for png in eval_pictures(result, details, plot):
                ctx.info(f"wrote {png}")
        if table:
            _render(result)


@contextlib.contextmanager
def _writing(path: str, inputs: list, ours, overwrite: bool):
    """Hold ``path`` for writing: never an input, never a file eval did not write (without
    --overwrite), one writer at a time, a killed writer's temporary files removed."""
    from pathlib import Path

    from mmcli.formats.atomic import is_stdio
    from mmcli.formats.locks import OutputLock, remove_stale_temps
    from mmcli.formats.outputs import refuse_foreign_file, refuse_inputs_as_outputs

    if is_stdio(path):
        yield
        return
    refuse_inputs_as_outputs(inputs, files=[path])
    refuse_foreign_file(path, ours, what="an mmcli eval result", overwrite=overwrite)
    with OutputLock(path, "eval"):
        remove_stale_temps(Path(path).parent, Path(path).name.__eq__)
        yield


def _render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['task']}: {result['dataset']} / {result['model']}", show_edge=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        t.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(stderr=True, highlight=False).print(t)
