"""Zero-shot classification: class names -> text prompts -> a classifier, no training.

Each class name (the features' label names, ``_`` read as a space) is put into every
prompt template (``"a photo of a {}."``), the prompts are encoded by the model's text
encoder, and the class embedding is the normalised mean of its prompt embeddings. The
features of the evaluated table (images, audio...) are scored against every class
embedding; metrics as in :mod:`mmcli.evaluate.classification` (``acc1``, ``acc5`` with 5
classes or more, ``mean_per_class_recall``).

Templates: a default set per modality (:data:`DEFAULT_TEMPLATES`), or ``--templates
FILE``: one template per line (``{}`` marks the class name; blank lines and lines
starting with ``#`` are skipped), or a JSON list of templates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mmcli.errors import BadInput
from mmcli.evaluate.classification import classification_metrics, labelled_rows
from mmcli.formats import safejson
from mmcli.formats.userfiles import read_file

DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "image": [
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "a cropped photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of a {}.",
        "a drawing of a {}.",
    ],
    "audio": ["the sound of a {}.", "a recording of a {}.", "the sound of {}.", "{}"],
    "video": ["a video of a {}.", "a video of {}.", "a clip of {}.", "{}"],
    "text": ["{}"],
    "fused": ["{}"],
}


def load_templates(path: str | os.PathLike) -> list[str]:
    """Templates from a text file (one per line) or a JSON list; each must contain ``{}``."""
    try:
        text = read_file(path, "templates file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"cannot read templates ({e})", where=str(path)) from None
    except OSError as e:
        raise BadInput(f"cannot read templates ({e.strerror or e})", where=str(path)) from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            templates = safejson.loads(stripped)
        except safejson.JSONError as e:
            raise BadInput(str(e), where=str(path)) from None
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise BadInput("expected a JSON list of strings", where=str(path))
    else:
        templates = [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
    if not templates:
        raise BadInput("no templates in the file", where=str(path))
    for i, t in enumerate(templates, 1):
        if "{}" not in t:
            raise BadInput(
                f"template {i} has no {{}} for the class name: {t!r}",
                where=str(path),
                hint='e.g. "a photo of a {}."',
            )
    return templates


def class_prompt_name(name: str) -> str:
    return name.replace("_", " ").strip()


def class_embeddings(
    encoder, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
):
    """float32 [C, D]: the normalised mean prompt embedding of each class.

    ``encoder`` is a :class:`~mmcli.search.queries.QueryEncoder` (or anything with
    ``encode("text", list_of_strings)``).
    """
    prompts = [t.format(class_prompt_name(c)) for c in class_names for t in templates]
    z = encoder.encode("text", prompts, batch_size=batch_size)  # (C * T, D)
    z = z.view(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(z, dim=-1)


def evaluate_zeroshot(
    features,
    table: str,
    encoder,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    details: dict | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot metrics of ``features``' ``table`` with the classes of its labels."""
    x, y = labelled_rows(features, table)
    names = features.label_names
    templates = list(templates or DEFAULT_TEMPLATES.get(table, DEFAULT_TEMPLATES["text"]))
    w = class_embeddings(encoder, names, templates, batch_size=batch_size)
    if w.shape[1] != x.shape[1]:
        raise BadInput(
            f"the model's text embeddings have {w.shape[1]} dimensions, the {table} features {x.shape[1]}",
            where=features.paths[0],
            hint="zero-shot needs features in the model's joint space (mmcli extract --model CKPT)",
        )
    logits = x.float() @ w.T  # (N, C)
    metrics = classification_metrics(logits, y, len(names), details=details)
    if details is not None:
        details["classes"] = list(names)
    info = {
        "table": table,
        "samples": int(len(y)),
        "classes": len(names),
        "templates": len(templates),
    }
    return metrics, info
