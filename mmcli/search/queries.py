"""Raw queries (text, image or audio files) turned into embeddings with a model.

Queries are preprocessed exactly as ``mmcli preprocess`` prepared the model's training
data, from the table specs stored in the checkpoint (``model.config.inputs``): the text
tokenizer and context length, the image size, the audio sample rate and length.

JSONL query lines (``retrieve`` on stdin) are objects with exactly one of
``{"text": "..."}``, ``{"image": "path"}``, ``{"audio": "path"}`` or ``{"id": "item"}``
(other keys are kept and echoed back). Relative paths resolve against the current folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput

QUERY_KEYS = ("text", "image", "audio", "id")


@dataclass
class Query:
    """One query: ``kind`` is text / image / audio / id / vector; ``raw`` is echoed."""

    kind: str
    value: Any
    raw: dict[str, Any]


def query_from_obj(obj: Any, where: str = "query") -> Query:
    if not isinstance(obj, dict):
        raise BadInput(
            f"a query must be a JSON object, got {type(obj).__name__}",
            where=where,
            hint='e.g. {"text": "a red circle"}',
        )
    keys = [k for k in QUERY_KEYS if k in obj]
    if len(keys) != 1:
        raise BadInput(
            "a query needs exactly one of text, image, audio or id"
            + (f" (got {', '.join(keys)})" if keys else ""),
            where=where,
            hint='e.g. {"text": "a red circle"} or {"image": "photo.jpg"}',
        )
    kind = keys[0]
    value = obj[kind]
    if kind == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise BadInput(f'"{kind}" must be a non-empty string', where=where)
    return Query(kind=kind, value=value, raw=obj)


def parse_query_line(line: str, where: str) -> Query:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(
            f"bad JSON ({e.msg} at column {e.colno})",
            where=where,
            hint='one query object per line, e.g. {"text": "a red circle"}',
        ) from None
    return query_from_obj(obj, where)


class QueryEncoder:
    """Encodes raw text / image / audio queries with a :class:`MultimodalModel`."""

    def __init__(self, model: Any, device: Any = "cpu", precision: str = "fp32"):
        """``precision`` bf16 on the CPU casts ``model`` to bfloat16 (in place); on CUDA
        bf16 / fp16 autocast."""
        from mmcli import runtime

        self.device = device
        dev = runtime.resolve_device(str(device))
        self.precision = runtime.inference_precision(precision, dev)
        self.model = runtime.cast_for_inference(model, self.precision, dev)
        self._autocast = lambda: runtime.autocast(dev, self.precision)
        self._transforms: dict[str, Any] = {}

    def _spec(self, modality: str) -> dict[str, Any]:
        modalities = getattr(self.model, "modalities", None) or list(self.model.config.encoders)
        if modality not in modalities:
            raise BadInput(
                f"the model has no {modality} encoder (it has: {', '.join(modalities)})",
                hint="use a checkpoint trained with that modality",
            )
        encoder = self.model.config.encoders.get(modality) or {}
        if encoder.get("name") == "features":
            spec = ((self.model.config.extra or {}).get("features") or {}).get(modality) or {}
            backbone = spec.get("encoder")
            raise BadInput(
                f"the model's {modality} encoder takes precomputed features"
                + (f" (of {backbone})" if backbone else "")
                + f", not raw {modality} queries",
                hint="extract the queries with that backbone and pass them with --queries, "
                "or use a model trained end to end",
            )
        return dict((self.model.config.inputs or {}).get(modality) or {})

    def transform(self, modality: str):
        if modality not in self._transforms:
            spec = self._spec(modality)
            if modality == "text":
                from mmcli.data.text import tokenizer_from_spec

                self._transforms[modality] = tokenizer_from_spec(spec)
            elif modality == "image":
                from mmcli.data.image import image_transform_from_spec

                self._transforms[modality] = image_transform_from_spec(spec)
            elif modality == "audio":
                from mmcli.data.audio import audio_transform_from_spec

                self._transforms[modality] = audio_transform_from_spec(spec)
            else:
                raise BadInput(f"cannot encode raw {modality} queries")
        return self._transforms[modality]

    def inputs(self, modality: str, values: list[str]):
        """The model's input rows for raw values (captions or file paths)."""
        import numpy as np
        import torch

        encoders = dict(getattr(self.model, "encoders", {}))
        encoder = encoders.get(modality)
        if getattr(encoder, "takes_text", False):  # a pretrained model's own tokenizer
            return encoder.tokenize(list(values))
        t = self.transform(modality)
        if modality == "text":
            tokens, _ = t.encode_batch(values)
            return torch.from_numpy(tokens)
        rows = []
        for v in values:
            rows.append(self._load(modality, t, v))
        return torch.from_numpy(np.stack(rows))

    @staticmethod
    def _load(modality: str, transform, value: str):
        from mmcli.data.audio import AudioDecodeError
        from mmcli.data.image import ImageDecodeError

        path = Path(value).expanduser()
        try:
            return transform(path)
        except (ImageDecodeError, AudioDecodeError) as e:
            raise BadInput(str(e), where=str(value)) from None

    def encode(self, modality: str, values: list[str], batch_size: int = 64):
        """float32 [len(values), D] normalised embeddings."""
        import torch

        out = []
        with torch.inference_mode():
            for b0 in range(0, len(values), batch_size):
                x = self.inputs(modality, values[b0 : b0 + batch_size]).to(self.device)
                with self._autocast():
                    out.append(self.model.encode(modality, x, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def load_model(path: str, device: Any = "cpu", weights: str | None = None):
    """A :class:`MultimodalModel` from a checkpoint, ``open_clip:ARCH`` or ``hf:DIR``
    (:func:`mmcli.models.load_model`)."""
    from mmcli.models.pretrained import load_model as load

    return load(path, weights=weights, device=device)
