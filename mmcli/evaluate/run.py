"""``mmcli eval`` as one library call: pick the task, open the inputs, compute, report.

    result = run_eval(EvalConfig(features=["feats/"], task="retrieval"))
    result["metrics"]["image_retrieval_recall@5"]

The result is one JSON-ready dict: ``task``, ``dataset``, ``model``, ``features``,
``metrics`` (flat: metric key -> number), ``info`` (counts and choices behind the
metrics), ``mmcli`` (version) and ``elapsed_s``.

``task="auto"``: ``linear-probe`` when ``--train``/``--test`` are given; else
``retrieval`` when the features hold two or more of image / text / audio; else
``zeroshot`` when a model is given and the items have labels; else ``linear-probe``
when they have labels.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli import __version__, runtime
from mmcli.errors import BadInput
from mmcli.evaluate.classification import evaluate_classifier
from mmcli.evaluate.linear_probe import evaluate_linear_probe, probe_table
from mmcli.evaluate.retrieval import DEFAULT_KS, evaluate_retrieval
from mmcli.evaluate.zeroshot import evaluate_zeroshot, load_templates
from mmcli.formats.features import FeatureSet
from mmcli.modalities import MODALITIES
from mmcli.progress import ProgressFactory, null_progress
from mmcli.search.model_check import check_classifier, check_same_model, model_for
from mmcli.search.queries import QueryEncoder

TASKS = ("auto", "retrieval", "zeroshot", "linear-probe", "classify", "captioning", "recommend")


@dataclass
class EvalConfig:
    features: list[str] = field(default_factory=list)
    task: str = "auto"
    query: str | None = None
    target: str | None = None
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    model: str | None = None
    weights: str | None = None  # the weights file of --model open_clip:ARCH
    #: a --model other than the one the features record: a warning, not exit 2
    allow_model_mismatch: bool = False
    precision: str = "fp32"  # the model's inference: bf16 on the CPU casts it to bfloat16
    templates: str | None = None
    table: str | None = None  # zeroshot / linear-probe: the table to classify
    train: list[str] | None = None
    val: list[str] | None = None
    test: list[str] | None = None
    split: str | None = None  # evaluate only the items of this manifest split
    captions: str | None = None  # captioning: mmcli caption's JSON lines (else --model writes them)
    histories: str | None = None  # recommend: {"user", "history"} lines
    aggregate: str = "mean"  # recommend: mean | max of the similarities to the seen items
    diversity: float = 0.0  # recommend: MMR's lambda
    device: str = "cpu"
    batch_size: int = 256
    seed: int = 0


def resolve_device(device: str) -> str:
    """``auto|cpu|cuda|cuda:N``, checked as every command checks it, as a string."""
    return str(runtime.resolve_device(device))


def _pick_task(cfg: EvalConfig, features) -> str:
    if cfg.task != "auto":
        return cfg.task
    if cfg.histories:
        return "recommend"
    if cfg.train or cfg.test:
        return "linear-probe"
    modal = [t for t in features.tables if t in MODALITIES]
    if cfg.query or cfg.target or len(modal) >= 2:
        return "retrieval"
    has_labels = bool(features.label_names) and bool((features.labels() >= 0).any())
    if has_labels and cfg.model:
        return "zeroshot"
    if has_labels:
        return "linear-probe"
    raise BadInput(
        f"cannot tell which evaluation to run: the features hold {', '.join(features.tables)} and no labels",
        where=features.paths[0],
        hint="pass --task, or features of two modalities for retrieval",
    )


def retrieval_pairs(
    tables: list[str], query: str | None, target: str | None
) -> list[tuple[str, str]]:
    """(query, target) pairs to evaluate: the one asked for, else every pair of modality
    tables (text as the query side when it is in the pair)."""
    if query and target:
        return [(query, target)]
    modal = [t for t in tables if t in MODALITIES]
    if query or target:
        given = query or target
        others = [t for t in modal if t != given]
        if not others:
            raise BadInput(f"no other modality to pair with {given} (tables: {', '.join(tables)})")
        return [(given, others[0])] if query else [(others[0], given)]
    if len(modal) < 2:
        raise BadInput(
            f"retrieval needs two modalities, the features hold {', '.join(tables) or 'none'}",
            hint="extract features of both (or join two files: eval A.safetensors B.safetensors)",
        )
    pairs = []
    for i, a in enumerate(modal):
        for b in modal[i + 1 :]:
            pairs.append((b, a) if b == "text" else (a, b))
    return pairs


def run_eval(
    cfg: EvalConfig, progress: ProgressFactory = null_progress, details: dict | None = None
) -> dict[str, Any]:
    """The result (see the module docstring). ``details``, when given, receives what
    ``eval --plot`` draws: per retrieval direction the first hits' ranks, per
    classification task the labels, predictions and class names."""
    started = time.perf_counter()
    if cfg.task not in TASKS:
        raise BadInput(f"unknown task {cfg.task!r}", hint=f"use one of {', '.join(TASKS)}")
    device = resolve_device(cfg.device)
    if cfg.task == "captioning":
        return _captioning(cfg, device, started)
    split_sets = {
        k: FeatureSet.open(v) if v else None
        for k, v in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test))
    }
    features = FeatureSet.open(cfg.features) if cfg.features else None
    if features is None and split_sets["train"] is None:
        raise BadInput("no feature files given", hint="mmcli eval FEATURES... (or --train/--test)")
    task = _pick_task(cfg, features if features is not None else split_sets["train"])
    _check_task_inputs(cfg, task, features)
    model = _task_model(cfg, task, device, features)
    query = target = None
    if task == "retrieval":
        metrics, info, query, target = _retrieval(cfg, features, device, progress, details)
    elif task == "zeroshot":
        metrics, info, target = _zeroshot(cfg, features, model, device, details)
    elif task == "recommend":
        metrics, info, target = _recommend(cfg, device)
    elif task == "linear-probe":
        metrics, info = _linear_probe(cfg, features, split_sets, device, details)
        target = info.get("table")
    else:  # classify
        metrics, info = evaluate_classifier(
            features, model, device=device, batch_size=cfg.batch_size, details=details
        )
    any_set = features if features is not None else split_sets["train"]
    all_paths = [p for fs in (features, *split_sets.values()) if fs is not None for p in fs.paths]
    return {
        "task": task,
        "dataset": dataset_name(any_set),
        "model": model_name(
            cfg.model or (getattr(model, "checkpoint", None) or {}).get("path"), any_set
        ),  # fmt: skip
        "query": query,
        "target": target,
        "split": cfg.split,
        "features": all_paths,
        "metrics": metrics,
        "info": info,
        "mmcli": __version__,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def _check_task_inputs(cfg: EvalConfig, task: str, features) -> None:
    """The inputs ``task`` needs are there; ``--split`` applied."""
    if features is None and task != "linear-probe":
        raise BadInput(
            f"--task {task} needs FEATURES", hint="--train/--val/--test are for the linear probe"
        )
    if cfg.split:
        if task == "linear-probe":
            raise BadInput(
                "--split does not apply to the linear probe",
                hint="it trains on train, picks the weight decay on val and reports test",
            )
        features.select_split(cfg.split)


def _captioning(cfg: EvalConfig, device: str, started: float) -> dict[str, Any]:
    """``--task captioning``: tensor shards (the references) and captions (see
    :mod:`mmcli.evaluate.captioning`)."""
    from mmcli.evaluate.captioning import evaluate_captioning

    if not cfg.features:
        raise BadInput("--task captioning needs the tensor shards that hold the references")
    metrics, info, refs = evaluate_captioning(
        cfg.features,
        captions=cfg.captions,
        model=cfg.model,
        split=cfg.split,
        device=device,
        batch_size=cfg.batch_size,
    )
    name = cfg.model or (cfg.captions if cfg.captions != "-" else "captions")
    return {
        "task": "captioning",
        "dataset": dataset_name(refs),
        "model": Path(name).stem,
        "query": info.get("source"),
        "target": "text",
        "split": cfg.split,
        "features": refs.paths,
        "metrics": metrics,
        "info": info,
        "mmcli": __version__,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def _task_model(cfg: EvalConfig, task: str, device: str, features):
    """The model zero-shot and classify need (None for the other tasks): ``--model``, or the
    one the features name; checked against the features it reads (sha256)."""
    if task not in ("zeroshot", "classify"):
        return None
    opts = {"weights": cfg.weights, "device": device, "allow": cfg.allow_model_mismatch}
    if task == "zeroshot":
        table = cfg.table or probe_table(features, None)
        return model_for(features, [table], cfg.model, purpose="--task zeroshot needs --model",
                         **opts)  # fmt: skip
    model = model_for(features, [probe_table(features, None)], cfg.model,
                      purpose="--task classify needs --model (a classifier checkpoint)",
                      check=False, **opts)  # fmt: skip
    check_classifier(model, features, allow=cfg.allow_model_mismatch)
    return model


def _retrieval(cfg: EvalConfig, features, device: str, progress: ProgressFactory, details=None):
    """(metrics, info, query, target): every pair asked for, prefixed when several."""
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    pairs = retrieval_pairs(features.tables, cfg.query, cfg.target)
    for q, t in pairs:
        check_same_model(features, [q, t], allow=cfg.allow_model_mismatch)
        prefix = f"{q}_{t}/" if len(pairs) > 1 else ""
        d = {} if details is not None else None
        m, i = evaluate_retrieval(
            features, q, t, ks=cfg.ks, device=device, progress=progress, details=d
        )
        if details is not None:
            details.update({prefix + k: v for k, v in d.items()})
        metrics.update({prefix + k: v for k, v in m.items()})
        info.update({prefix + k: v for k, v in i.items()})
    query, target = pairs[0] if len(pairs) == 1 else (None, None)  # several: in the keys
    if len(pairs) > 1:
        info["pairs"] = [f"{q}_{t}" for q, t in pairs]
    return metrics, info, query, target


def _recommend(cfg: EvalConfig, device: str):
    from mmcli.evaluate.recommend import evaluate_recommend

    if not cfg.histories:
        raise BadInput("--task recommend needs --histories FILE", hint='{"user", "history"} lines')
    return evaluate_recommend(
        cfg.features, cfg.histories, target=cfg.target, ks=cfg.ks, split=cfg.split,
        aggregate=cfg.aggregate, diversity=cfg.diversity, seed=cfg.seed, device=device,
    )  # fmt: skip


def _zeroshot(cfg: EvalConfig, features, model, device: str, details=None):
    """(metrics, info, the table classified)."""
    table = cfg.table or probe_table(features, None)
    templates = load_templates(cfg.templates) if cfg.templates else None
    metrics, info = evaluate_zeroshot(
        features,
        table,
        QueryEncoder(model, device, precision=cfg.precision),
        templates=templates,
        batch_size=cfg.batch_size,
        details=details,
    )
    return metrics, info, table


def _linear_probe(cfg: EvalConfig, features, split_sets: dict, device: str, details=None):
    opts = {"device": device, "seed": cfg.seed, "details": details}
    if split_sets["train"] is not None or split_sets["test"] is not None:
        return evaluate_linear_probe(table=cfg.table, **opts, **split_sets)
    return evaluate_linear_probe(features, cfg.table, **opts)


#: folder and file names that say nothing about which data or model it is: the folder
#: above is named with them (``coco/train`` -> ``coco-train``, ``runs/a/model`` -> ``a``)
GENERIC_DATA = {"train", "training", "val", "valid", "validation", "dev", "test", "testing",
                "data", "dataset", "raw", "images", "tensors", "features", "feats", "joint"}  # fmt: skip
GENERIC_MODEL = {"model", "best", "last", "final", "checkpoint", "state", "weights"}


def safe_name(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (other runs of characters become ``_``; no
    leading or trailing dots or underscores, so ``..`` cannot climb out of a folder), so
    that it can fill an ``-o`` file-name template without making a path."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return out or "unnamed"


def _folder_name(folder: Path) -> str:
    name = folder.name
    if name.lower() in GENERIC_DATA and folder.parent.name:
        return f"{folder.parent.name}-{name}"
    return name


def dataset_name(features) -> str:
    """The folder of the original input (``data/coco/manifest.jsonl`` -> ``coco``), else
    that of the manifest, else that of the feature files; a generic folder name (``train``,
    ``data``...) is prefixed with the one above it (``coco/train`` -> ``coco-train``)."""
    source = features.source or {}
    for key in ("input", "manifest"):
        value = source.get(key)
        if value and value != "-" and Path(value).parent.name:
            p = Path(os.path.abspath(value))
            return safe_name(_folder_name(p.parent if p.suffix else p))
    first = Path(os.path.abspath(features.paths[0]))
    return safe_name(_folder_name(first.parent) or first.stem)


def checkpoint_name(path: str) -> str:
    """``runs/a/model.safetensors`` -> ``a``; ``students/tiny.safetensors`` -> ``tiny``."""
    p = Path(os.path.abspath(path))
    stem = p.name.split(".")[0]
    if stem.lower() in GENERIC_MODEL and p.parent.name:
        return p.parent.name
    return stem


def model_name(checkpoint: str | None, features) -> str:
    """The checkpoint's name (its folder for ``model.safetensors``), else the model or
    encoders the features were extracted with."""
    if checkpoint:
        return safe_name(checkpoint_name(checkpoint))
    names = []
    for t in features.tables:
        spec = features.spec(t)
        model = spec.get("model")
        if isinstance(model, dict) and model.get("path"):
            name = checkpoint_name(str(model["path"]))
        else:
            name = spec.get("encoder")
        if name and str(name) not in names:
            names.append(str(name))
    return safe_name("+".join(names)) if names else "features"


def output_path(template: str, result: dict[str, Any]) -> str:
    """Fill ``{model}``, ``{task}``, ``{dataset}``, ``{query}``, ``{target}`` in ``--output``.

    The values come from the inputs' metadata (an encoder name, a folder name), so each is
    reduced to safe file-name characters (:func:`safe_name`): a feature file whose
    encoder is ``../../x`` cannot make ``-o 'results/{model}.json'`` write elsewhere.
    """
    values = {
        k: safe_name(str(result.get(k) or ""))
        for k in ("model", "task", "dataset", "query", "target")
    }
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise BadInput(
            f"bad --output template {template!r} ({e})",
            hint="placeholders: {model} {task} {dataset} {query} {target}",
        ) from None
