"""Does a ``--model`` belong with the features it is used with? (``retrieve``, ``eval``)

Features written by ``extract --model`` record the model in each table's spec: ``model``
is ``{"path", "sha256"}`` of the checkpoint (or the ``LIBRARY:SPEC`` and the sha256 of
its weights file). Features of a backbone (``extract --encoder``) record no model but the
encoder and its weights' sha256. A query encoded by another model lands in another
space: the hits look confident and mean nothing. So:

    model = model_for(features, ["image"], cfg.model, weights=cfg.weights, device="cpu",
                      allow=False, purpose="text queries")

loads ``--model`` and refuses (one line, exit 2) a model whose sha256 differs from the
one the features record, unless ``--allow-model-mismatch`` (then a warning); without
``--model`` it loads the model the features name, when that file is still there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmcli.errors import BadInput
from mmcli.models.pretrained import is_library_spec, split_spec

log = logging.getLogger("mmcli")

FLAG = "--allow-model-mismatch"


def _short(sha: str | None) -> str:
    return f"sha256 {sha[:12]}" if sha else "no sha256: random init"


def _describe(record: dict[str, Any]) -> str:
    return f"{record.get('path') or '?'} ({_short(record.get('sha256'))})"


def recorded_model(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The model a feature table was extracted with (``{"path", "sha256", ...}``), or None
    for backbone features."""
    rec = spec.get("model")
    return rec if isinstance(rec, dict) and (rec.get("path") or rec.get("sha256")) else None


def same_model(rec: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Two model records name the same model: equal sha256 (two random-init library models,
    without one: the same spec)."""
    a, b = rec.get("sha256"), mine.get("sha256")
    if a or b:
        return a == b
    return rec.get("path") == mine.get("path")


def mismatch(model: Any, spec: dict[str, Any], table: str) -> str | None:
    """Why ``model`` did not produce the features of ``table`` (``spec``), or None."""
    mine = getattr(model, "checkpoint", None) or {}
    rec = recorded_model(spec)
    if rec is not None:
        if same_model(rec, mine):
            return None
        return (
            f"the {table} features were extracted with {_describe(rec)}, "
            f"--model {_describe(mine)} is another model"
        )
    # backbone features: the model must be that backbone (not a joint space)
    if getattr(model, "space", "backbone") == "joint" and spec.get("space") == "backbone":
        return (
            f"the {table} features are {spec.get('encoder') or 'backbone'} backbone features, "
            f"--model {_describe(mine)} encodes into its joint space"
        )
    theirs = (spec.get("weights") or {}).get("sha256")
    own = ((getattr(model, "weights", None) or {}).get(table) or {}).get("sha256")
    if theirs and own and theirs != own:
        return (
            f"the {table} features come from weights {_short(theirs)}, "
            f"--model {mine.get('path') or '?'} has weights {_short(own)}"
        )
    return None


def check_model(model: Any, features: Any, tables: list[str], *, allow: bool) -> None:
    """BadInput (one line, exit 2) when ``model`` did not extract ``tables`` of
    ``features``; with ``allow`` a warning instead."""
    for table in tables:
        _refuse(mismatch(model, features.spec(table), table), features, table, allow)


def _refuse(why: str | None, features: Any, table: str, allow: bool, hint: str = "") -> None:
    if why is None:
        return
    if allow:
        log.warning("%s (%s: going on)", why, FLAG)
        return
    raise BadInput(
        why,
        where=features.tensors(table).paths[0],
        hint=hint
        or f"pass the model the features were extracted with, re-extract them with this "
        f"model (mmcli extract --model ...), or add {FLAG}",
    )


def check_classifier(model: Any, features: Any, *, allow: bool) -> None:
    """``eval --task classify``: each table the classifier reads was extracted by it (its
    own embeddings) or is what its ``features`` encoders were trained on."""
    mine = getattr(model, "checkpoint", None) or {}
    trained_on = (model.config.extra or {}).get("features") or {}
    for table in [t for t in features.tables if t in (*model.modalities, "fused")]:
        rec = recorded_model(features.spec(table))
        if rec is None or same_model(rec, mine):
            continue
        read = recorded_model(trained_on.get(table) or {})
        if read is not None and same_model(rec, read):
            continue
        why = (
            f"the {table} features were extracted with {_describe(rec)}, the classifier "
            f"{_describe(mine)} neither wrote them nor was trained on them"
        )
        _refuse(why, features, table, allow)


def check_same_model(features: Any, tables: list[str], *, allow: bool) -> None:
    """``eval`` retrieval: the query and target tables come from the same model (when both
    record one)."""
    recs = [(t, recorded_model(features.spec(t))) for t in tables]
    recs = [(t, r) for t, r in recs if r is not None]
    for t, rec in recs[1:]:
        first, first_rec = recs[0]
        if not same_model(rec, first_rec):
            why = (
                f"the {first} features were extracted with {_describe(first_rec)}, the "
                f"{t} features with {_describe(rec)}: their spaces differ"
            )
            _refuse(why, features, t, allow, hint=f"extract both with one model, or add {FLAG}")


def _exists(path: str) -> bool:
    lib, rest = split_spec(path)
    if lib == "hf":
        return Path(rest).is_dir()
    return lib is not None or Path(path).is_file()


def named_model(features: Any, table: str, purpose: str) -> tuple[str, str | None]:
    """(the ``--model`` argument, its ``--weights``) of the model ``table`` was extracted
    with, when its files are still there; BadInput naming what is missing otherwise."""
    spec = features.spec(table)
    rec = recorded_model(spec)
    where = features.tensors(table).paths[0]
    if rec is None or not rec.get("path"):
        raise BadInput(
            f"{purpose}: the {table} features name no model "
            f"({spec.get('encoder') or 'backbone'} features)",
            where=where,
            hint="pass --model (a checkpoint, open_clip:ARCH or hf:DIR), or query by --id / --queries FEATURES",
        )
    path = str(rec["path"])
    weights = None
    if is_library_spec(path):
        weights = (spec.get("weights") or {}).get("path")
        candidates = [path]
        if weights and not Path(weights).is_file():
            raise BadInput(
                f"{purpose}: the {table} features were extracted with {path} and the weights "
                f"{weights}, which are not there",
                where=where,
                hint=f"pass --model {path} --weights FILE",
            )
    else:
        candidates = [path, *([rec["abspath"]] if rec.get("abspath") else [])]
    for candidate in candidates:
        if candidate != "-" and _exists(candidate):
            return candidate, weights
    raise BadInput(
        f"{purpose}: the {table} features were extracted with {path}, which is not there",
        where=where,
        hint="pass --model PATH of that checkpoint",
    )


def model_for(
    features: Any,
    tables: list[str],
    given: str | None,
    *,
    weights: str | None,
    device: Any,
    allow: bool,
    purpose: str,
    check: bool = True,
):
    """``--model`` loaded and (``check``) checked against ``tables`` of ``features``;
    without one, the model the first table names (said on stderr)."""
    from mmcli.models.pretrained import load_model

    named = not given
    if named:
        given, weights = named_model(features, tables[0], purpose)
    model = load_model(given, weights=weights, device=device)
    if check:
        check_model(model, features, tables, allow=allow)
    if named:
        log.info("using the model the %s features name: %s", tables[0], given)
    return model
