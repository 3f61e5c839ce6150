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
background thread (:mod:`~mmcli.extract.loader`), so reading, host-to-device copies and
compute overlap. The output is locked for the run (by rank 0 under torchrun, before any
rank touches it), is never one of the inputs, and a single output file replaces only an
earlier extract output without ``overwrite`` (:mod:`~mmcli.extract.output`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.extract.loader import EndOfShard, Loader, close_decoders, start_decoders
from mmcli.extract.model import note_random_weights, run_id, setup_model, specs, text_tokenizers
from mmcli.extract.output import (
    FEATURES_KIND,
    OUT_NAME,
    check_folder,
    check_output,
    output_paths,
    output_source,
    pending,
    single_output,
    write,
)
from mmcli.formats.atomic import is_stdio
from mmcli.formats.locks import OutputLock
from mmcli.formats.tensorfile import TensorSet
from mmcli.progress import ProgressFactory, null_progress

log = logging.getLogger("mmcli")

OUT_DTYPES = ("float16", "float32")

__all__ = ["FEATURES_KIND", "OUT_NAME", "extract"]


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
    workers: int = 2,
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
    ``workers``: processes decoding encoded image shards (``preprocess --store encoded``;
    on CUDA, JPEG rows are decoded on the GPU).
    Returns a summary (rows per modality, rows/s, shards written and skipped, ...).
    """
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
    dist = runtime.dist_info()
    outputs = output_paths(out, tensors, dist.world_size)
    check_output(out, outputs, tensors, sources, model, dict(weights or {}), overwrite)
    # rank 0 locks OUT before it joins the process group: no other rank gets past that
    # (and touches OUT) unless rank 0 holds the lock
    locked = dist.is_main and not is_stdio(out)
    dev = runtime.resolve_device(device)
    with (
        OutputLock(out, "extract") if locked else contextlib.nullcontext() as lock,
        _decoders(tensors, workers, dev) as decoders,
    ):
        return _extract(
            tensors, out, outputs, model, encoders, weights, dev, precision, batch_size,
            dtype, normalize, resume, overwrite, seed, channels_last, (prefetch, decoders),
            progress, lock,
        )  # fmt: skip


@contextlib.contextmanager
def _decoders(tensors: TensorSet, workers: int, dev):
    """The decode workers of encoded image tables, started before the model is built (they
    start up meanwhile), stopped at the end."""
    decoders = start_decoders(tensors, workers, dev)
    try:
        yield decoders
    finally:
        close_decoders(decoders)


def _extract(
    tensors, out, outputs, model, encoders, weights, dev, precision, batch_size, dtype,
    normalize, resume, overwrite, seed, channels_last, prefetch, progress, lock,
) -> dict[str, Any]:  # fmt: skip
    import torch

    from mmcli import runtime

    resume = resume and not overwrite
    folder_out = not single_output(out)
    if folder_out:
        check_folder(Path(out), len(outputs), resume, overwrite)
    precision = runtime.inference_precision(precision, dev)  # bf16 on the CPU: a bf16 model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        given = model is not None and not isinstance(model, (str, os.PathLike))
        model, modalities = setup_model(model, encoders, weights, tensors)
    if given and runtime.cpu_cast(precision, dev) and not runtime.is_cast(model, precision):
        model = copy.deepcopy(model)  # cast a copy, not the caller's model
    for m in modalities:
        model.check_input(tensors, m)
    if channels_last is None:  # the layout measured faster for this encoder and precision
        channels_last = "image" in modalities and model.encoders["image"].prefers_channels_last(
            precision
        )

    started = time.perf_counter()
    with runtime.distributed(dev) as dist:
        runtime.barrier()  # (a caller's own process group: rank 0 holds the lock first)
        rid = run_id(model, modalities, tensors, dtype, normalize, seed)
        mine = dist.my_shards(len(tensors.shards))
        todo, skipped = pending(outputs, mine, tensors, rid, resume, overwrite and folder_out)
        runtime.barrier()  # every rank has checked OUT before any writes to it

        if dist.is_main:
            note_random_weights(model, modalities)
        model = runtime.cast_for_inference(model.to(dev).eval(), precision, dev)
        if channels_last and "image" in modalities:
            model.encoders["image"].to(memory_format=torch.channels_last)
        shard_specs = specs(model, modalities, tensors, dtype, normalize, seed)
        source = output_source(tensors, outputs[0])
        run = _Run(tensors, outputs, shard_specs, rid, modalities, model, dev, dtype, precision)
        run.source = source
        cl_tables = {"image"} if channels_last and "image" in modalities else set()
        tokenize = text_tokenizers(model, modalities)  # pretrained text: its own tokenizer
        prefetch, decoders = prefetch
        loader = Loader(tensors, todo, modalities, batch_size, dev, prefetch, cl_tables, tokenize,
                        decoders=decoders)  # fmt: skip
        rows, truncated = run.compute(loader, todo, normalize, progress, tokenize)
        counts = runtime.all_reduce_sum(
            [len(todo), len(skipped), *rows.values(), *truncated.values()], dev
        )
        if lock is not None:  # every rank is done writing: free OUT before any rank reads it
            lock.release()
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


class _Run:
    """The compute loop: batches from the loader through the model into one features
    buffer per table, written out as a shard at the end of each input shard."""

    def __init__(self, tensors, outputs, specs, run_id, modalities, model, dev, dtype, precision):
        self.tensors, self.outputs, self.specs = tensors, outputs, specs
        self.run_id, self.modalities, self.model = run_id, modalities, model
        self.dev, self.precision = dev, precision
        self.dtype_name = dtype
        self.source: dict | None = None

    def compute(self, loader: Loader, todo, normalize: bool, progress, tokenize=()):
        """(rows per table, captions cut by a pretrained tokenizer per table)."""
        import torch

        from mmcli import runtime

        model, tensors = self.model, self.tensors
        out_dtype = getattr(torch, self.dtype_name)
        rows = dict.fromkeys(self.modalities, 0)
        truncated = dict.fromkeys(tokenize, 0)
        total = sum(tensors.shards[i].rows(m) for i in todo for m in self.modalities)
        feats: dict[str, Any] = {}
        with progress("extract", total=total, unit="rows") as bar, torch.inference_mode():
            try:
                for msg in loader:
                    if isinstance(msg, EndOfShard):
                        write(msg.shard, feats, tensors, self.outputs, self.specs, self.run_id,
                              self.modalities, model, self.source)  # fmt: skip
                        feats = {}
                        continue
                    if msg.table not in feats:
                        n, d = tensors.shards[msg.shard].rows(msg.table), model.out_dim(msg.table)
                        feats[msg.table] = torch.empty(n, d, dtype=out_dtype, device=self.dev)
                    x = msg.data.to(self.dev, non_blocking=True)  # keeps the loader's channels_last
                    with runtime.autocast(self.dev, self.precision):
                        z = model.encode(msg.table, x, normalize=normalize)  # (B, D)
                    feats[msg.table][msg.start : msg.start + z.shape[0]] = z
                    rows[msg.table] += z.shape[0]
                    if msg.table in truncated:  # captions cut by a pretrained tokenizer
                        truncated[msg.table] += msg.data.truncated
                    bar.update(z.shape[0])
            finally:
                loader.close()
        return rows, truncated
