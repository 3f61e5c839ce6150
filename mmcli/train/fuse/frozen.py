"""What fuse-train trains on: frozen towers' outputs computed once, captions tokenized once.

``--freeze image`` on tensor shards (LiT: a locked image tower, a text tower that learns)
need not run the frozen tower every epoch: its outputs are the same each time. They are
computed once by :func:`mmcli.extract.extract` (before any head, float32) into
``RUN/frozen/<m>`` (``RUN/frozen-val/<m>`` for ``--val`` data; kept for ``--resume``)
and the training runs on a *view* of the model whose frozen encoders pass those rows
through; every other module, parameter and the logit scale are the model's own. The
checkpoint is written from the whole model (the frozen tower inside).

A frozen tower is cached unless its tokens are needed (attention fusion, an attention
caption decoder reading it). Pretrained text towers read their own tokens
(:mod:`mmcli.train.fuse.tokens`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import TensorSet
from mmcli.models.config import ModelConfig
from mmcli.models.multimodal import MultimodalModel
from mmcli.models.registry import create
from mmcli.progress import null_progress
from mmcli.runtime import barrier
from mmcli.train.data import Dataset, _Table
from mmcli.train.fuse.config import FuseConfig
from mmcli.train.fuse.tokens import PackedText, TokenTable
from mmcli.train.splits import Data

log = logging.getLogger("mmcli")

CACHE_DIRS = ("frozen", "frozen-val")


def cached_modalities(model: MultimodalModel, data: Data, cfg: FuseConfig) -> list[str]:
    """The frozen encoders whose outputs are computed once (see the module doc)."""
    if data.dataset.kind != "tensors" or not cfg.cache_frozen:
        return []
    fusion = model.config.fusion or {}
    attending = (
        set(fusion.get("modalities") or data.modalities)
        if fusion.get("kind") == "attention"
        else set()
    )
    cap = model.config.captioner or {}
    if cap.get("kind") == "attention":
        attending.add(cap.get("source"))
    out = []
    for m in cfg.freeze:
        enc = model.encoders[m]
        if m in data.modalities and m not in attending and next(enc.parameters(), None) is not None:
            out.append(m)
    return out


def _tower(model: MultimodalModel, m: str) -> MultimodalModel:
    """``model``'s encoder of ``m`` alone (no head): what the cache holds. Shares it."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.encoders = nn.ModuleDict({m: model.encoders[m]})
    view.heads = nn.ModuleDict()
    view.config = ModelConfig(encoders={m: model.config.encoders[m]},
                              inputs={k: v for k, v in model.config.inputs.items() if k == m})  # fmt: skip
    view.weights = {m: model.weights.get(m)}
    return view


def _cache_table(model, m: str, ds: Dataset, folder: Path, opts: dict) -> _Table:
    """The encoder outputs of every row of ``ds``'s ``m`` table, computed once into ``folder``
    and checked to line up row for row with the table."""
    from mmcli.extract import extract

    source = next(ts for ts in ds.sources if m in ts.tables)
    if opts["fresh"] and opts["is_main"] and folder.exists():
        shutil.rmtree(folder)
    barrier()
    summary = extract(source.paths, folder, model=_tower(model, m), device=str(opts["device"]),
                      precision=opts["precision"], batch_size=opts["batch_size"], dtype="float32",
                      normalize=False, resume=True, progress=opts["progress"])  # fmt: skip
    cached = TensorSet(folder)
    same = cached.ids() == source.ids() and len(cached.shards) == len(source.shards)
    same = same and all(
        np.array_equal(a.item_index(m), b.item_index(m))
        for a, b in zip(cached.shards, source.shards)
    )
    if not same:
        raise BadInput(
            f"the cached {m} outputs do not line up with the training data",
            where=str(folder),
            hint="run again with --overwrite",
        )
    log.info("frozen %s tower: %d rows computed once into %s (%.1f s)",
             m, summary["rows"].get(m, 0), folder, summary["seconds"])  # fmt: skip
    return _Table(cached, m, in_memory=True)


def _dataset_view(model, ds: Dataset, cached: list[str], texts: list[str], folder: Path, opts):
    tables = dict(ds.tables)
    for m in cached:
        tables[m] = _cache_table(model, m, ds, folder / m, opts)
    for m in texts:
        tables[m] = TokenTable(next(ts for ts in ds.sources if m in ts.tables), model.encoders[m])
    return dataclasses.replace(ds, tables=tables)


def training_view(
    model: MultimodalModel,
    data: Data,
    cfg: FuseConfig,
    run,
    *,
    device: Any,
    precision: str,
    batch_size: int,
    resume: bool,
    is_main: bool = True,
    progress=None,
) -> tuple[MultimodalModel, Data]:
    """(the model the task trains, the data it reads): ``model`` and ``data`` themselves
    when nothing is cached or tokenized, else views (see the module doc)."""
    cached = cached_modalities(model, data, cfg)
    texts = [m for m in data.modalities if getattr(model.encoders[m], "takes_text", False)]
    if not cached and not texts:
        return model, data
    if cached:
        run.create()
    opts = {"device": device, "precision": precision, "batch_size": batch_size,
            "fresh": not resume, "is_main": is_main, "progress": progress or null_progress}  # fmt: skip
    train = _dataset_view(model, data.dataset, cached, texts, run.file(CACHE_DIRS[0]), opts)
    val = data.val_dataset
    if val is data.dataset:
        val = train
    elif val is not None:
        val = _dataset_view(model, val, cached, texts, run.file(CACHE_DIRS[1]), opts)
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.encoders = nn.ModuleDict(dict(model.encoders))
    for m in cached:
        view.encoders[m] = create("features", modality=m, dim=model.encoders[m].out_dim)
    for m in texts:
        view.encoders[m] = PackedText(model.encoders[m], train.tables[m])
    return view, dataclasses.replace(data, dataset=train, val_dataset=val)
