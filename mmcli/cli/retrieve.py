from __future__ import annotations

import json
import sys
from typing import Annotated, Literal

import typer

from mmcli.cli.common import (
    Aggregate,
    BatchSize,
    Debug,
    Device,
    Diversity,
    InferencePrecision,
    Quiet,
    command,
)

Many = list[str] | None


def retrieve(
    index: Annotated[
        list[str],
        typer.Option(
            "--index",
            help="Feature files, shard folders or globs to search (repeat --index to add files).",
            show_default=False,
        ),
    ],
    target: Annotated[
        str | None,
        typer.Option(help="The table to search (default: image, else video, audio, text, fused)."),
    ] = None,
    text: Annotated[
        Many,
        typer.Option(
            "--text",
            help="A text query (repeatable). Encoded by --model.",
            rich_help_panel="Queries",
        ),
    ] = None,
    image: Annotated[
        Many,
        typer.Option(
            "--image",
            help="An image file query (repeatable). Encoded by --model.",
            rich_help_panel="Queries",
        ),
    ] = None,
    audio: Annotated[
        Many,
        typer.Option(
            "--audio",
            help="An audio file query (repeatable). Encoded by --model.",
            rich_help_panel="Queries",
        ),
    ] = None,
    video: Annotated[
        Many,
        typer.Option(
            "--video",
            help="A video file query (repeatable). Encoded by --model.",
            rich_help_panel="Queries",
        ),
    ] = None,
    item_id: Annotated[
        Many,
        typer.Option(
            "--id",
            help="Query with an item's own features (repeatable).",
            rich_help_panel="Queries",
        ),
    ] = None,
    queries: Annotated[
        Many,
        typer.Option(
            "--queries",
            help="A feature file of query vectors (every row is a query).",
            rich_help_panel="Queries",
        ),
    ] = None,
    like: Annotated[
        Many,
        typer.Option(
            "--like",
            help="Recommend items like this one (repeatable: one query, more like these).",
            rich_help_panel="Recommend",
        ),
    ] = None,
    exclude: Annotated[
        Many,
        typer.Option(
            "--exclude",
            help="With --like: never recommend this item (repeatable).",
            rich_help_panel="Recommend",
        ),
    ] = None,
    histories: Annotated[
        str | None,
        typer.Option(
            "--histories",
            help='A file of {"user": ..., "history": \\[ids]} lines: one line of hits per user.',
            rich_help_panel="Recommend",
        ),
    ] = None,
    aggregate: Aggregate = "mean",
    diversity: Diversity = 0.0,
    include_seen: Annotated[
        bool,
        typer.Option(
            "--include-seen",
            help="Like queries: the liked items may be recommended too (default: left out).",
            rich_help_panel="Recommend",
        ),
    ] = False,
    query_table: Annotated[
        str | None,
        typer.Option(
            help="Table of --id / --queries rows (default: the target, or the only table).",
            rich_help_panel="Queries",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Search only the items of this split (the manifest's split field)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Encodes raw queries: the model the index was extracted with (a checkpoint, "
            "open_clip:ARCH or hf:DIR; default: the one the index names, if it is there)."
        ),
    ] = None,
    allow_model_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-model-mismatch",
            help="Encode queries with a --model other than the one the index records "
            "(a warning instead of exit 2).",
        ),
    ] = False,
    weights: Annotated[
        str | None,
        typer.Option("--weights", "-w", help="The weights file of --model open_clip:ARCH."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Hits per query.")] = 10,
    threshold: Annotated[float | None, typer.Option(help="Drop hits scoring below this.")] = None,
    backend: Annotated[
        Literal["exact", "faiss"],
        typer.Option(
            help="exact (default) or faiss (approximate, pip install 'mmcli\\[faiss]').",
            rich_help_panel="Search",
        ),
    ] = "exact",
    scoring: Annotated[
        Literal["auto", "fp32", "bf16"],
        typer.Option(
            help="Exact backend's first scoring pass (results are identical; bf16 is faster on AMX/AVX-512 BF16 CPUs).",
            rich_help_panel="Search",
        ),
    ] = "auto",
    faiss_index: Annotated[
        str,
        typer.Option(
            help="faiss: ivf, hnsw, ivfpq (compressed) or a faiss factory string (IVF4096,SQ8).",
            rich_help_panel="Search",
        ),
    ] = "ivf",
    faiss_dir: Annotated[
        str | None,
        typer.Option(
            help="faiss: folder of the saved index (default: next to the features).",
            rich_help_panel="Search",
        ),
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(min=1, help="faiss ivf: lists searched per query.", rich_help_panel="Search"),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(min=1, help="faiss hnsw: search breadth.", rich_help_panel="Search"),
    ] = None,
    rescore: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="faiss: candidates re-scored exactly per hit (default 2; ivfpq 10): raise it "
            "for recall, the codes' ranking is coarse.",
            rich_help_panel="Search",
        ),
    ] = None,
    rebuild_index: Annotated[
        bool,
        typer.Option(
            "--rebuild-index", help="faiss: rebuild the saved index.", rich_help_panel="Search"
        ),
    ] = False,
    fields: Annotated[
        bool, typer.Option("--fields/--no-fields", help="Attach each hit's manifest fields.")
    ] = True,
    table: Annotated[
        bool, typer.Option("--table", help="Also print hits as tables on stderr.")
    ] = False,
    exclude_self: Annotated[
        bool,
        typer.Option(
            "--exclude-self/--no-exclude-self",
            help="Leave an --id query's own item out of its hits (default on).",
            rich_help_panel="Queries",
        ),
    ] = True,
    html_out: Annotated[
        str | None,
        typer.Option(
            "--html",
            help="Also write a self-contained page of every query and its hits "
            "(thumbnails, audio players and captions embedded).",
            rich_help_panel="Output",
        ),
    ] = None,
    copy_to: Annotated[
        str | None,
        typer.Option(
            "--copy-to",
            help="Copy every hit's file into this folder as q<query>-<rank>-<id>.<ext>.",
            rich_help_panel="Output",
        ),
    ] = None,
    on_error: Annotated[
        Literal["skip", "fail"],
        typer.Option(
            help='A bad stdin query line: answer it with {"query": ..., "error": ...} and go on, '
            "or stop (exit 2). Queries given as arguments always stop."
        ),
    ] = "skip",
    device: Device = "auto",
    precision: InferencePrecision = "fp32",
    batch_size: BatchSize = 256,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Search a feature index: one JSON line per query with ranked hits.

    Queries: --text/--image/--audio/--video (encoded with --model: the model
    the index was extracted with, checked by sha256), --id, --queries
    FEATURES, or JSON lines on stdin ({"text": ...}, {"image": path},
    {"audio": path}, {"video": path}, {"id": ...}), answered as they arrive.
    Recommendations: --like ID (repeatable) or {"like": \\[ids], "exclude":
    \\[ids]} lines, --histories FILE (one line per user); liked items are left
    out. Each output line
    is {"query": ..., "hits": [{"rank", "id", "score", "item": {manifest
    fields, paths resolved}}]}. Exact search by default (float64 scores,
    ties to the lower row). See docs/retrieve.md.

    Examples:

        mmcli retrieve --index out/joint --model out/run/model.safetensors \\
            --text "a red circle" -k 5

        echo '{"text": "a red circle"}' | mmcli retrieve --index out/joint \\
            --model out/run/model.safetensors | jq -r '.hits[0].item.image'

        mmcli retrieve --index out/joint --id toy-00042 --target text

        mmcli retrieve --index big/ --queries q.safetensors --backend faiss

        mmcli retrieve --index out/joint --like toy-00003 --like toy-00010 --diversity 0.3

        mmcli retrieve --index out/joint --histories histories.jsonl -k 10
    """
    with command(quiet=quiet, debug=debug) as ctx:
        from mmcli.errors import BadInput
        from mmcli.runtime import resolve_device  # not evaluate's: it imports every task
        from mmcli.search.queries import (
            feature_query_batches,
            line_query_batches,
            value_queries,
        )
        from mmcli.search.recommend import check_like_options, like_batches
        from mmcli.search.retrieve import RetrieveConfig, Retriever

        given = [bool(text), bool(image), bool(audio), bool(video), bool(item_id), bool(queries)]
        if sum(given) > 1 and queries:
            raise BadInput("--queries cannot be combined with other queries")
        check_like_options(any(given), like, exclude, histories)
        cfg = RetrieveConfig(
            index=index,
            target=target,
            query_table=query_table,
            k=k,
            threshold=threshold,
            backend=backend,
            scoring=scoring,
            faiss_index=faiss_index,
            faiss_dir=faiss_dir,
            nprobe=nprobe,
            ef_search=ef_search,
            rescore=rescore,
            rebuild=rebuild_index,
            model=model,
            weights=weights,
            allow_model_mismatch=allow_model_mismatch,
            precision=precision,
            device=str(resolve_device(device)),
            batch_size=batch_size,
            with_fields=fields,
            split=split,
            exclude_self=exclude_self,
            aggregate=aggregate,
            diversity=diversity,
            include_seen=include_seen,
        )
        if html_out == "-" or copy_to == "-":
            raise BadInput("--html and --copy-to take a path", hint="stdout carries the JSON lines")
        if html_out or copy_to:
            from mmcli.formats.outputs import refuse_inputs_as_outputs

            inputs = [*index, model, *(queries or []), *(image or []), *(audio or []),
                      *(video or [])]  # fmt: skip
            refuse_inputs_as_outputs(inputs, files=[html_out] if html_out else [], option="--html")
            if copy_to:
                refuse_inputs_as_outputs(inputs, folder=copy_to, option="--copy-to")
        retriever = Retriever(cfg, progress=ctx.progress)
        if like or histories:
            batches = like_batches(retriever.recommender, like, exclude, histories)
        elif queries:
            batches = feature_query_batches(queries, retriever, table=query_table)
        elif any(given):
            batches = iter(
                [value_queries(text=text, image=image, audio=audio, video=video, ids=item_id)]
            )
        else:
            if _stdin_is_tty():
                raise BadInput(
                    "no queries",
                    hint='give --text/--image/--audio/--video/--id/--queries, or JSON lines on stdin ({"text": "..."})',
                )
            batches = line_query_batches(sys.stdin, max_batch=256)
        # queries given as arguments are usage: a bad one stops with exit 2
        policy = on_error if not (any(given[:5]) or like or histories) else "fail"
        out = sys.stdout
        kept: list[dict] = []
        for line in retriever.run(batches, on_error=policy):
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            if html_out or copy_to:
                kept.append(line)
            if table:
                _render(line, retriever.target)
        _pictures(kept, retriever.target, html_out, copy_to, " ".join(index))


def _pictures(lines: list, target: str, html_out, copy_to, title: str) -> None:
    import logging

    log = logging.getLogger("mmcli")
    if html_out:
        from mmcli.search.gallery import write_gallery

        n = write_gallery(lines, html_out, target=target, title=f"mmcli retrieve {title}")
        log.info("wrote %s (%d queries, %d hits)", html_out, len(lines), n)
    if copy_to:
        from mmcli.search.gallery import copy_hits

        files = copy_hits(lines, copy_to)
        log.info("copied %d hit files to %s", len(files), copy_to)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _render(line: dict, target: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False)
    if "error" in line:
        return
    t = Table(
        title=json.dumps(line["query"], ensure_ascii=False), show_edge=False, title_justify="left"
    )
    for col, justify in (("rank", "right"), ("id", "left"), ("score", "right"), ("item", "left")):
        t.add_column(col, justify=justify)
    for hit in line["hits"]:
        item = hit.get("item") or {}
        what = item.get("image") or item.get("video") or item.get("audio") or ""
        texts = item.get("text")
        if texts and (target == "text" or not what):  # a caption hit: show the caption
            texts = [texts] if isinstance(texts, str) else texts
            what = texts[hit.get("row", 0)] if hit.get("row", 0) < len(texts) else texts[0]
        t.add_row(str(hit["rank"]), str(hit["id"]), f"{hit['score']:.4f}", str(what))
    console.print(t)
