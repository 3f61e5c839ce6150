"""Feature extraction: tensor shards in, feature shards out.

    from mmcli.extract import extract
    summary = extract("out/tensors/", "out/features/", encoders={"image": "resnet18"},
                      weights={"image": "resnet18.pth"}, device="auto", batch_size=128)
    summary = extract("out/tensors/", "out/joint/", model="run/model.safetensors")

One output shard ``features-i-of-N.safetensors`` per input shard, each written atomically
when all its tables are done (the unit of ``resume`` and of torchrun: rank r of W takes
shards r, r + W, ...). Every modality the model encodes and the input holds becomes one
table (float16 or float32 ``[rows, D]``), with ``<m>.item``, the item ids and labels copied
unchanged. Memory stays flat: shards are memory-mapped and read batch by batch by a
background thread, so reading, host-to-device copies and compute overlap.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.data.captions import caption_rows
from mmcli.errors import BadInput, RunFailure
from mmcli.formats.atomic import is_stdio
from mmcli.formats.tensorfile import (
    SHARD_RE,
    Shard,
    ShardFile,
    TensorSet,
    shard_name,
    where_paths,
    write_shard,
)
from mmcli.modalities import EXTRACT_ENCODERS
from mmcli.progress import ProgressFactory, null_progress
from mmcli.runtime import Prefetch

log = logging.getLogger("mmcli")

OUT_NAME = "features"
FEATURES_KIND = "features"
OUT_DTYPES = ("float16", "float32")
#: table-spec keys that must agree between a model's training data and the input
INPUT_KEYS = ("image_size", "tokenizer", "context_length", "lowercase", "sample_rate")


@dataclass
class _Batch:
    shard: int  # position in the input set
    table: str
    start: int
    data: Any  # a CPU tensor (pinned on CUDA)


@dataclass
class _EndOfShard:
    shard: int


# ------------------------------------------------------------------------- entry


def extract(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model: Any = None,
    *,
    encoders: Mapping[str, str] | None = None,
    weights: Mapping[str, str | os.PathLike] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 128,
    dtype: str = "float16",
    normalize: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    channels_last: bool | None = None,
    prefetch: int = 3,
    progress: ProgressFactory = null_progress,
) -> dict[str, Any]:
    """Encode every row of the tensor shards ``sources`` and write feature shards to ``out``.

    ``model``: a :class:`~mmcli.models.MultimodalModel`, or the path of an mmcli checkpoint
    (joint-space embeddings); else ``encoders`` (``{"image": "resnet50", "text":
    "transformer:depth=2"}``, default: one per modality in the input) with optional
    ``weights`` per modality (a file or ``imagenet``) give backbone features.
    ``out``: a folder (one shard per input shard), or ``-`` / a ``.safetensors`` file
    when the input is one shard. ``resume`` keeps the finished shards of the same run in
    ``out``; ``overwrite`` replaces the features shards of any earlier run there (as in
    ``preprocess``, only mmcli's own files; it wins over ``resume``). ``seed`` fixes the
    random init of encoders without weights (so every torchrun rank, and a resumed run,
    builds the same model).
    ``channels_last``: run the image encoder and its input in channels_last (None: the layout
    measured faster for that encoder and precision, ``Encoder.prefers_channels_last``).
    Returns a summary (rows per modality, rows/s, shards written and skipped, ...).
    """
    import torch

    from mmcli import runtime

    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    if dtype not in OUT_DTYPES:
        raise BadInput(f"bad --dtype {dtype!r}", hint=f"use one of {', '.join(OUT_DTYPES)}")
    tensors = TensorSet(sources)
    if tensors.kind not in ("tensors", FEATURES_KIND) or (
        tensors.kind != "tensors" and model is None
    ):
        raise BadInput(
            f"the input is a {tensors.kind} file, extract reads tensor shards",
            where=tensors.paths[0],
            hint="pass the output of mmcli preprocess (or features with a --model trained on them)",
        )
    dev = runtime.resolve_device(device)
    outputs = _output_paths(out, tensors, runtime.dist_info().world_size)
    resume = resume and not overwrite
    if not _single_output(out):
        _check_folder(Path(out), len(outputs), resume, overwrite)
    precision = runtime.inference_precision(precision, dev)  # bf16 on the CPU: a bf16 model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        given = model is not None and not isinstance(model, (str, os.PathLike))
        model, modalities = _setup_model(model, encoders, weights, tensors)
    if given and runtime.cpu_cast(precision, dev) and not runtime.is_cast(model, precision):
        model = copy.deepcopy(model)  # cast a copy, not the caller's model
    for m in modalities:
        model.check_input(tensors, m)
    if channels_last is None:  # the layout measured faster for this encoder and precision
        channels_last = "image" in modalities and model.encoders["image"].prefers_channels_last(
            precision
        )
    out_dtype = getattr(torch, dtype)

    started = time.perf_counter()
    with runtime.distributed(dev) as dist:
        run_id = _run_id(model, modalities, tensors, dtype, normalize, seed)
        mine = dist.my_shards(len(tensors.shards))
        folder_out = overwrite and not _single_output(out)
        todo, skipped = _pending(outputs, mine, tensors, run_id, resume, folder_out)
        runtime.barrier()  # every rank has checked OUT before any writes to it

        if dist.is_main:
            _note_random_weights(model, modalities)
        model = runtime.cast_for_inference(model.to(dev).eval(), precision, dev)
        if channels_last and "image" in modalities:
            model.encoders["image"].to(memory_format=torch.channels_last)
        specs = _specs(model, modalities, tensors, dtype, normalize, seed)
        source = _output_source(tensors, outputs[0])
        rows = dict.fromkeys(modalities, 0)
        total = sum(tensors.shards[i].rows(m) for i in todo for m in modalities)
        cl_tables = {"image"} if channels_last and "image" in modalities else set()
        tokenize = text_tokenizers(model, modalities)  # pretrained text: its own tokenizer
        loader = _Loader(tensors, todo, modalities, batch_size, dev, prefetch, cl_tables, tokenize)
        truncated = dict.fromkeys(tokenize, 0)
        feats: dict[str, Any] = {}
        with progress("extract", total=total, unit="rows") as bar, torch.inference_mode():
            try:
                for msg in loader:
                    if isinstance(msg, _EndOfShard):
                        _write(msg.shard, feats, tensors, outputs, specs, run_id, modalities, model,
                               source)  # fmt: skip
                        feats = {}
                        continue
                    if msg.table not in feats:
                        n, d = tensors.shards[msg.shard].rows(msg.table), model.out_dim(msg.table)
                        feats[msg.table] = torch.empty(n, d, dtype=out_dtype, device=dev)
                    x = msg.data.to(dev, non_blocking=True)  # keeps the loader's channels_last
                    with runtime.autocast(dev, precision):
                        z = model.encode(msg.table, x, normalize=normalize)  # (B, D)
                    feats[msg.table][msg.start : msg.start + z.shape[0]] = z
                    rows[msg.table] += z.shape[0]
                    if msg.table in truncated:  # captions cut by a pretrained tokenizer
                        truncated[msg.table] += msg.data.truncated
                    bar.update(z.shape[0])
            finally:
                loader.close()
        counts = runtime.all_reduce_sum(
            [len(todo), len(skipped), *rows.values(), *truncated.values()], dev
        )
        runtime.barrier()
        seconds = time.perf_counter() - started
        rows = {m: int(c) for m, c in zip(modalities, counts[2:])}
        truncated = {m: int(c) for m, c in zip(truncated, counts[2 + len(modalities) :])}
        computed = sum(rows.values())
        return {
            "out": str(out),
            "shards": len(tensors.shards),
            "written": int(counts[0]),
            "skipped": int(counts[1]),
            "rows": rows,
            "dims": {m: model.out_dim(m) for m in modalities},
            "encoders": {m: model.config.encoders[m]["name"] for m in modalities},
            "space": model.space,
            "seconds": seconds,
            "rows_per_s": computed / seconds if seconds > 0 else 0.0,
            "device": str(dev),
            "precision": precision,
            "dtype": dtype,
            "world_size": dist.world_size,
            "rank": dist.rank,
            "truncated": truncated,  # captions cut at a pretrained tokenizer's context length
            "context_length": {m: model.encoders[m].context_length for m in truncated},
        }


# ------------------------------------------------------------------------- model


def _setup_model(model, encoders, weights, tensors: TensorSet):
    """(MultimodalModel, modalities to extract) from the arguments."""
    from mmcli.models import MultimodalModel, build_model, load_model
    from mmcli.models.pretrained import is_library_spec, one_weights

    if model is not None and encoders:
        raise BadInput("pass either --model or --encoder, not both")
    if model is not None and weights and not is_library_spec(model):
        raise BadInput(
            "--weights applies to --encoder backbones; a --model checkpoint has its weights",
            hint="drop --weights",
        )
    if model is not None:
        if not isinstance(model, MultimodalModel):  # a checkpoint, open_clip:ARCH or hf:DIR
            model = load_model(model, weights=one_weights(weights))
        modalities = [m for m in model.modalities if m in tensors.tables]
        if not modalities:
            raise BadInput(
                f"the model encodes {', '.join(model.modalities)} but the input has "
                f"{', '.join(tensors.tables) or 'no tables'}",
                where=where_paths(tensors.paths),
            )
        for m in model.modalities:
            if m not in modalities:
                log.info("note: the input has no %s table; extracting %s", m, ", ".join(modalities))
        _check_inputs(model, modalities, tensors)
        return model, modalities
    if encoders:
        for m in encoders:
            tensors.require(m, hint=f"drop --encoder {m}=..., or pass shards that hold {m}")
    else:
        encoders = {m: EXTRACT_ENCODERS[m] for m in tensors.tables if m in EXTRACT_ENCODERS}
        if not encoders:
            raise BadInput(
                f"no image, text or audio table in the input (it has: {', '.join(tensors.tables) or 'none'})",
                where=where_paths(tensors.paths),
            )
    weights = dict(weights or {})
    if "" in weights:  # weights without a modality: for the only encoder
        if len(encoders) != 1:
            raise BadInput(
                f"--weights {weights['']}: say which encoder it is for",
                hint=f"--weights MODALITY=PATH with MODALITY one of {', '.join(encoders)}",
            )
        weights[next(iter(encoders))] = weights.pop("")
    model = build_model(encoders, weights=weights, inputs=tensors.specs)
    return model, list(model.modalities)


def text_tokenizers(model, modalities) -> dict[str, Any]:
    """``tokenize(captions)`` of each encoder with its own tokenizer (pretrained text towers)."""
    return {m: model.encoders[m].tokenize for m in modalities if model.encoders[m].takes_text}


def _note_random_weights(model, modalities) -> None:
    if model.checkpoint is not None:
        return
    for m in modalities:
        if model.weights.get(m) is None:
            log.info(
                "note: the %s encoder %s has random weights (pass --weights %s=FILE%s)",
                m,
                model.config.encoders[m]["name"],
                m,
                " or imagenet" if m == "image" else "",
            )


def _check_inputs(model, modalities: list[str], tensors: TensorSet) -> None:
    """Warn when the input was preprocessed differently from the model's training data."""
    for m in modalities:
        want, have = model.config.inputs.get(m) or {}, tensors.spec(m)
        diff = [
            f"{k} {have[k]} (model: {want[k]})"
            for k in INPUT_KEYS
            if k in want and k in have and want[k] != have[k]
        ]
        if diff:
            log.warning(
                "the %s input differs from the model's training data: %s", m, "; ".join(diff)
            )


# ------------------------------------------------------------------------ output


def _single_output(out) -> bool:
    return is_stdio(out) or str(out).endswith(".safetensors")


def _output_paths(out, tensors: TensorSet, world_size: int) -> list[str]:
    n = len(tensors.shards)
    if _single_output(out):
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


def _run_id(model, modalities, tensors: TensorSet, dtype: str, normalize: bool, seed: int) -> str:
    """What makes two runs' shards interchangeable (for --resume)."""
    key = {
        "seed": seed
        if model.checkpoint is None and any(model.weights.get(m) is None for m in modalities)
        else None,
        "model": model.config_dict(),
        "weights": model.weights,
        "checkpoint": (model.checkpoint or {}).get("sha256"),
        "modalities": modalities,
        "dtype": dtype,
        "normalize": normalize,
        "input": {"specs": tensors.specs, "source": tensors.source, "shards": len(tensors.shards)},
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _pending(
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
    from mmcli.runtime import dist_info

    if is_stdio(outputs[0]):
        return mine, []
    folder = Path(outputs[0]).parent
    if overwrite:
        old = _own_shards(folder)
        for f in old:
            f.unlink(missing_ok=True)
        if old and dist_info().is_main:
            log.info("overwrite: removed %d features shard(s) of an earlier run", len(old))
    todo, done = [], []
    for i in mine:
        path = Path(outputs[i])
        for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        if resume and path.exists() and _finished(path, tensors.shards[i], run_id):
            done.append(i)
        else:
            todo.append(i)
    if done:
        log.info("resume: %d shard(s) already done, %d to go", len(done), len(todo))
    return todo, done


def _own_shards(folder: Path) -> list[Path]:
    """The features shards in ``folder`` (what extract writes there; nothing else)."""
    if not folder.is_dir():
        return []
    return sorted(
        f for f in folder.iterdir() if (m := SHARD_RE.match(f.name)) and m["name"] == OUT_NAME
    )


def _check_folder(folder: Path, count: int, resume: bool, overwrite: bool = False) -> None:
    if overwrite:  # replaced in _pending, once the model and the input are known to be good
        return
    existing = _own_shards(folder)
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


def _finished(path: Path, source: ShardFile, run_id: str) -> bool:
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


def _specs(
    model, modalities, tensors: TensorSet, dtype: str, normalize: bool, seed: int
) -> dict[str, dict]:
    specs = {}
    for m in modalities:
        enc = model.config.encoders[m]
        specs[m] = {
            "encoder": enc["name"],
            "encoder_config": enc["config"],
            "head": model.config.heads.get(m),
            "dim": model.out_dim(m),
            "normalized": bool(normalize),
            "dtype": dtype,
            "weights": model.weights.get(m),
            # random init is reproducible from the seed (backbones without weights)
            "seed": seed if model.weights.get(m) is None and model.checkpoint is None else None,
            "space": model.space,
            "model": model.checkpoint,
            "input": tensors.spec(m),
        }
        if hasattr(model.encoders[m], "tokenizer_spec"):  # a pretrained model's own tokenizer
            specs[m]["tokenizer"] = model.encoders[m].tokenizer_spec()
    return specs


def _output_source(tensors: TensorSet, output: str) -> dict | None:
    """The input's ``mmcli.source``, its manifest also recorded relative to the output
    folder (so a moved tree still finds it)."""
    from mmcli.formats.manifest import locate_manifest, manifest_source

    source = tensors.source
    manifest = locate_manifest(source, tensors.paths)
    if manifest is None or is_stdio(output):
        return source
    return {**(source or {}), **manifest_source(manifest, Path(output).parent)}


def _write(i, feats, tensors: TensorSet, outputs, specs, run_id, modalities, model, source) -> None:
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
    fused = _fused_table(model, sf)
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


def _fused_table(model, shard: ShardFile):
    """The ``fused`` table of a model with a fusion module (fuse-train --fusion attention/concat):
    one row per item, from the first row of each modality it has. ``None`` without fusion.
    """
    if getattr(model, "fusion", None) is None:
        return None
    import torch

    with torch.inference_mode():
        return model.fuse_shard(shard)


# ------------------------------------------------------------------------ loader


class _Loader:
    """A background thread reading batches from the memory-mapped shards, in order.

    It copies each batch out of the memory map (into pinned memory on CUDA, so the copy
    to the device can be non-blocking; in channels_last layout for ``channels_last``
    tables), so page faults, disk reads and the layout change happen off the compute
    thread. Yields :class:`_Batch` and, after the last batch of a shard,
    :class:`_EndOfShard`. The copies are torch's (``contiguous(channels_last)``,
    ``clone``): measured faster than numpy's strided transpose.
    """

    def __init__(
        self,
        tensors: TensorSet,
        shards,
        tables,
        batch_size: int,
        device,
        prefetch: int,
        channels_last=(),
        tokenize=None,
    ):
        self.tensors, self.shards, self.tables = tensors, list(shards), list(tables)
        self.batch_size = batch_size
        self.pin = device.type == "cuda"
        self.channels_last = set(channels_last)
        #: table -> a pretrained encoder's tokenize(captions): those tables are read as strings
        self.tokenize: dict[str, Any] = dict(tokenize or {})
        self.feed = Prefetch(self._batches, depth=prefetch, name="mmcli-extract-loader")

    def _copy(self, data, table: str):
        """The batch in RAM (from the memory-mapped shard), image batches already in
        channels_last (torch's copy: measured faster here than numpy's strided one)."""
        import torch

        if table in self.tokenize:  # caption strings -> the model's own tokens
            return self.tokenize[table](data)
        if table in self.channels_last and data.dim() == 4:
            out = data.contiguous(memory_format=torch.channels_last)
            if out.data_ptr() == data.data_ptr():  # already channels_last: still copy
                out = out.clone(memory_format=torch.channels_last)
        else:
            out = data.clone()
        return out.pin_memory() if self.pin else out

    def _batches(self) -> Iterator[_Batch | _EndOfShard]:
        for i in self.shards:
            sf = self.tensors.shards[i]
            for table in self.tables:
                # memory-mapped (rows, ...), or the captions as given for a pretrained tokenizer
                data = caption_rows(sf, table) if table in self.tokenize else sf.tensor(table)
                for start in range(0, len(data), self.batch_size):
                    yield _Batch(
                        i, table, start, self._copy(data[start : start + self.batch_size], table)
                    )
                del data
            yield _EndOfShard(i)

    def __iter__(self) -> Iterator[_Batch | _EndOfShard]:
        return iter(self.feed)

    def close(self) -> None:
        self.feed.close()
