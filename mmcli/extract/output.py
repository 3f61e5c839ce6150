"""extract's output bookkeeping: where each shard goes, what an earlier run left there
(kept by ``resume``, replaced by ``overwrite``), the checks that an output is neither an
input nor a file extract did not write, and writing one features shard."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput, RunFailure
from mmcli.formats.atomic import is_stdio
from mmcli.formats.outputs import refuse_foreign_file, refuse_inputs_as_outputs
from mmcli.formats.tensorfile import (
    SHARD_RE,
    Shard,
    ShardFile,
    TensorSet,
    shard_name,
    write_shard,
)

log = logging.getLogger("mmcli")

OUT_NAME = "features"
FEATURES_KIND = "features"


def single_output(out) -> bool:
    return is_stdio(out) or str(out).endswith(".safetensors")


def output_paths(out, tensors: TensorSet, world_size: int) -> list[str]:
    n = len(tensors.shards)
    if single_output(out):
        if n != 1:
            raise BadInput(
                f"-o {out} holds one file but the input has {n} shards",
                hint="pass a folder to -o (one features shard per input shard)",
            )
        if world_size > 1:
            raise BadInput("under torchrun, -o must be a folder")
        return [str(out)]
    if Path(out).exists() and not Path(out).is_dir():
        raise BadInput("-o is an existing file, not a folder", where=str(out))
    return [str(Path(out) / shard_name(OUT_NAME, i, n)) for i in range(n)]


def pending(
    outputs: list[str],
    mine: list[int],
    tensors: TensorSet,
    run_id: str,
    resume: bool,
    overwrite: bool = False,
):
    """(shards to compute, shards already done) among this rank's ``mine``.

    ``overwrite`` (a folder output): the features shards of an earlier run there go first
    (every rank may try; it all happens before the barrier that precedes any write).
    """
    from mmcli.formats.locks import remove_stale_temps
    from mmcli.runtime import dist_info

    if is_stdio(outputs[0]):
        return mine, []
    folder = Path(outputs[0]).parent
    if overwrite:
        old = own_shards(folder)
        for f in old:
            f.unlink(missing_ok=True)
        if old and dist_info().is_main:
            log.info("overwrite: removed %d features shard(s) of an earlier run", len(old))
    names = {Path(outputs[i]).name for i in mine}
    remove_stale_temps(folder, names.__contains__)  # left by a killed run (OUT is locked)
    todo, done = [], []
    for i in mine:
        path = Path(outputs[i])
        if resume and path.exists() and finished(path, tensors.shards[i], run_id):
            done.append(i)
        else:
            todo.append(i)
    if done:
        log.info("resume: %d shard(s) already done, %d to go", len(done), len(todo))
    return todo, done


def own_shards(folder: Path) -> list[Path]:
    """The features shards in ``folder`` (what extract writes there; nothing else)."""
    if not folder.is_dir():
        return []
    return sorted(
        f for f in folder.iterdir() if (m := SHARD_RE.match(f.name)) and m["name"] == OUT_NAME
    )


def check_folder(folder: Path, count: int, resume: bool, overwrite: bool = False) -> None:
    if overwrite:  # replaced in _pending, once the model and the input are known to be good
        return
    existing = own_shards(folder)
    for f in existing:
        n = int(SHARD_RE.match(f.name)["count"])
        if n != count:
            raise BadInput(
                f"holds {f.name}, from a run over {n} shards (this input has {count})",
                where=str(folder),
                hint="pass --overwrite to replace that run, or use another output folder",
            )
    if existing and not resume:
        raise BadInput(
            f"already holds {len(existing)} features shard(s)",
            where=str(folder),
            hint="pass --resume to finish that run, --overwrite to replace it, or use another output folder",
        )


def finished(path: Path, source: ShardFile, run_id: str) -> bool:
    try:
        done = ShardFile(path)
    except BadInput:
        log.info("resume: %s is unreadable, recomputing it", path)
        return False
    info = done.extra("extract", {}) or {}
    if done.kind != FEATURES_KIND or info.get("run") != run_id:
        raise BadInput(
            "holds features from a different extract run (other model, weights, input or options)",
            where=str(path),
            hint="pass --overwrite to replace that run, or use another output folder",
        )
    return done.num_items == source.num_items


def output_source(tensors: TensorSet, output: str) -> dict | None:
    """The input's ``mmcli.source``, its manifest also recorded relative to the output
    folder (so a moved tree still finds it)."""
    from mmcli.formats.manifest import locate_manifest, manifest_source

    source = tensors.source
    manifest = locate_manifest(source, tensors.paths)
    if manifest is None or is_stdio(output):
        return source
    return {**(source or {}), **manifest_source(manifest, Path(output).parent)}


def write(i, feats, tensors: TensorSet, outputs, specs, run_id, modalities, model, source) -> None:
    import numpy as np
    import torch

    sf = tensors.shards[i]
    tables, items = {}, {}
    for m in modalities:
        data = feats.get(m)
        if data is None:  # a shard with no rows of this table
            data = torch.empty(0, model.out_dim(m), dtype=getattr(torch, specs[m]["dtype"]))
        if not bool(torch.isfinite(data).all()):
            raise RunFailure(
                f"non-finite {m} features (NaN or inf)",
                where=sf.path,
                hint="the features overflow float16: use --dtype float32 or --normalize"
                if specs[m]["dtype"] == "float16" and not specs[m]["normalized"]
                else "the model produced NaN; try --precision fp32",
            )
        tables[m] = data.cpu()
        items[m] = np.array(sf.item_index(m), dtype=np.int64)  # a copy: stdin data is read-only
    fused = fused_table(model, sf)
    if fused is not None:
        dtype = specs[modalities[0]]["dtype"] if modalities else "float32"
        tables["fused"], items["fused"] = fused[0].to(getattr(torch, dtype)), fused[1]
        specs = {
            **specs,
            "fused": {
                "space": "fused",
                "dim": int(fused[0].shape[1]),
                "normalized": True,
                "dtype": dtype,
                "fusion": model.config.fusion,
                "model": model.checkpoint,
                "modalities": [m for m in model.encoders if m in sf.tables],
            },
        }
    shard = Shard(
        ids=sf.ids(),
        tables=tables,
        items=items,
        labels=np.array(sf.labels(), dtype=np.int64) if sf.has_labels() else None,
    )
    write_shard(
        outputs[i],
        shard,
        kind=FEATURES_KIND,
        specs=specs,
        label_names=tensors.label_names,
        source=source,
        index=i,
        count=len(tensors.shards),
        extra={"extract": {"run": run_id, "input": Path(sf.path).name}},
    )


def fused_table(model, shard: ShardFile):
    """The ``fused`` table of a model with a fusion module (fuse-train --fusion attention/concat):
    one row per item, from the first row of each modality it has. ``None`` without fusion.
    """
    if getattr(model, "fusion", None) is None:
        return None
    import torch

    with torch.inference_mode():
        return model.fuse_shard(shard)


def is_extract_output(path: Path) -> bool:
    """Whether ``path`` is a features file extract wrote (which a rerun may replace)."""
    try:
        sf = ShardFile(path)
    except (BadInput, OSError):
        return False
    return sf.kind == FEATURES_KIND and bool(sf.extra("extract", None))


def check_output(
    out,
    outputs: list[str],
    tensors: TensorSet,
    sources,
    model: Any,
    weights: dict | None,
    overwrite: bool,
) -> None:
    """Refuse an output that is an input (with ``overwrite`` too) and, for a single file,
    an existing file that extract did not write (unless ``overwrite``)."""
    if is_stdio(out):
        return
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    inputs: Sequence[Any] = [
        *sources,
        *tensors.paths,
        model if isinstance(model, (str, os.PathLike)) else None,
        *(weights or {}).values(),
    ]
    single = single_output(out)
    refuse_inputs_as_outputs(inputs, files=outputs, folder=None if single else out)
    if single:
        refuse_foreign_file(
            out, is_extract_output, what="a features file written by extract", overwrite=overwrite
        )
