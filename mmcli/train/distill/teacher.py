"""The teacher: loaded frozen, its temperature, sub-models, and its outputs cached once."""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.extract import extract
from mmcli.formats.manifest import file_sha256
from mmcli.models.multimodal import ModelConfig, MultimodalModel
from mmcli.models.pretrained import is_library_spec, load_model
from mmcli.progress import null_progress
from mmcli.train.data import Dataset, load_dataset
from mmcli.train.sampler import Batch, BatchSampler

log = logging.getLogger("mmcli")


def load_teacher(spec: str, device: torch.device, weights: str | None = None) -> MultimodalModel:
    """The frozen teacher: an mmcli checkpoint, or a whole pretrained CLIP / SigLIP
    (``open_clip:ARCH`` with ``weights``, ``hf:DIR``) through
    :func:`mmcli.models.pretrained.load_model`, as ``--model`` loads it everywhere."""
    if not is_library_spec(spec):
        check_teacher_file(spec, weights)
    teacher = load_model(spec, weights=weights, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_teacher_file(spec: str, weights: str | None) -> None:
    """A teacher checkpoint: it exists, and takes no --weights."""
    if weights:
        raise BadInput(
            "--weights is the weights file of --teacher open_clip:ARCH; a teacher checkpoint "
            "has its weights",
            where=spec,
            hint="drop --weights",
        )
    if not Path(spec).is_file():
        raise BadInput(
            "teacher checkpoint not found",
            where=spec,
            hint="check --teacher (an mmcli checkpoint, open_clip:ARCH --weights FILE or hf:DIR)",
        )


def teacher_sha256(spec: str, teacher: MultimodalModel | None) -> str:
    """What identifies the teacher for ``--resume``: a checkpoint's file hash; for a
    pretrained model the hash of its weights file when it has one, else of its weights
    themselves (an ``hf:DIR`` folder, a random init)."""
    if not is_library_spec(spec):
        return file_sha256(spec)
    known = (teacher.checkpoint or {}).get("sha256")
    if known:
        return known
    h = hashlib.sha256()
    for name, value in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_scale(teacher: MultimodalModel) -> float:
    """The teacher's logit scale (1 / its learned temperature; 1/0.07 without one)."""
    if teacher.logit_scale is None:
        return 1 / 0.07
    return float(teacher.logit_scale.detach().exp())


def submodel(model: MultimodalModel, modalities: list[str]) -> MultimodalModel:
    """The encoders + heads of ``modalities`` of ``model`` as a model of their own (sharing
    no storage), e.g. to extract or time one modality."""
    c = model.config
    config = ModelConfig(
        encoders={m: copy.deepcopy(c.encoders[m]) for m in modalities},
        heads={m: copy.deepcopy(c.heads[m]) for m in modalities if m in c.heads},
        embed_dim=c.embed_dim,
        inputs={m: c.inputs[m] for m in modalities if m in c.inputs},
        extra={k: v for k, v in c.extra.items() if k == "features"},
    )
    sub = MultimodalModel(config)
    prefixes = tuple(f"{part}.{m}." for m in modalities for part in ("encoders", "heads"))
    sub.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)})
    sub.weights.update({m: model.weights.get(m) for m in modalities})
    sub.checkpoint = model.checkpoint
    param = next(model.parameters(), None)
    return sub.to(param.device if param is not None else "cpu").eval()


class CachedTeacherSampler(BatchSampler):
    """Batches that carry the teacher's cached outputs for exactly the rows sampled: the
    cache is one row per dataset row, read by ``Batch.rows`` into ``data["teacher.M"]``
    (on the sampler's background thread)."""

    def __init__(self, *args, cache: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def make_batch(self, epoch: int, step: int) -> Batch:
        batch = super().make_batch(epoch, step)
        for m, table in self.cache.items():
            rows = batch.rows[m].numpy()
            ok = rows >= 0
            out = torch.zeros(len(rows), table.row_shape[0], dtype=torch.float32)
            if ok.any():
                out[torch.from_numpy(ok)] = table.fetch(rows[ok]).float()
            batch.data[f"teacher.{m}"] = out
        return batch


def build_teacher_cache(
    teacher: MultimodalModel,
    modalities: list[str],
    sources: list[str],
    ds: Dataset,
    folder: Path,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    progress=None,
) -> dict[str, Any]:
    """The teacher's outputs (projected, not normalized, float32) for every row of ``sources``,
    written once by :func:`mmcli.extract.extract` into ``folder`` (kept between resumes), and
    checked to line up row for row with the training dataset."""
    # the whole teacher when every modality is cached (a pretrained model is not rebuilt)
    whole = teacher.config.extra.get("pretrained") and set(modalities) == set(teacher.modalities)
    sub = teacher if whole else submodel(teacher, modalities)
    try:
        summary = extract(
            sources,
            folder,
            model=sub,
            device=str(device),
            precision=precision,
            batch_size=batch_size,
            dtype="float32",
            normalize=False,
            resume=True,
            progress=progress or null_progress,
        )
    except BadInput as e:
        raise BadInput(f"--cache-teacher: {e}") from None
    cached = load_dataset([str(folder)], modalities=modalities, in_memory=False)  # memory-mapped
    for m in modalities:
        same = cached.ids == ds.ids and all(
            np.array_equal(x, y) for x, y in zip(cached.rows_of[m], ds.rows_of[m])
        )
        if not same:
            raise BadInput(
                "--cache-teacher: the cached rows do not line up with the training data",
                where=str(folder),
                hint="pass DATA as one set of tensor shards, or drop --cache-teacher",
            )
    log.info(
        "teacher cache: %s rows in %s (%.1f s)",
        "+".join(str(v) for v in summary["rows"].values()) or "all",
        folder,
        summary["seconds"],
    )
    return {m: cached.tables[m] for m in modalities}
