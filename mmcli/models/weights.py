"""Loading encoder weights: local safetensors, torchvision ``.pth``/``.pt``, ``imagenet``.

    info = load_weights(encoder, "resnet18-f37072fd.pth")   # {"path": ..., "sha256": ...}
    info = load_weights(encoder, "imagenet")                 # torchvision's named weights

``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. Common wrappers (``{"state_dict": ...}``,
``{"model": ...}``) and prefixes (``module.``, ``model.``, ``_orig_mod.``, ``backbone.``, an
mmcli checkpoint's ``encoders.<modality>.``) are undone, and a torchvision classifier
head (``fc.*``, ``heads.*``, ``classifier.*``) is dropped with a note. Anything else that does
not match raises :class:`~mmcli.errors.BadInput` listing the missing, unexpected and
wrongly shaped keys.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.formats.manifest import file_sha256
from mmcli.models.registry import list_encoders, resolve

log = logging.getLogger("mmcli")

IMAGENET = "imagenet"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights", "params")
PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "net.", "encoder.", "visual.")
HEAD_PREFIXES = ("fc.", "heads.", "head.", "classifier.")
OFFLINE_ENV = "MMCLI_OFFLINE"


def load_weights(module: nn.Module, source: str | os.PathLike) -> dict[str, Any]:
    """Load ``source`` into ``module`` (strictly, after the fixes above).

    Returns where the weights came from: ``{"path", "sha256"}`` (plus ``"name"`` and ``"url"``
    for ``imagenet``), recorded in the specs of what is computed with them.
    """
    label = _label(module)
    own = getattr(module, "load_pretrained", None)
    if own is not None:  # library adapters read their library's own files and tags
        return own(source)
    if str(source).lower() == IMAGENET:
        state, info = _imagenet_state_dict(module)
        where = f"{IMAGENET} weights for {label}"
    else:
        path = Path(source)
        where = str(source)
        if not path.is_file():
            raise BadInput(
                "weights file not found" if not path.exists() else "weights path is not a file",
                where=where,
                hint="pass a .safetensors or torchvision .pth/.pt file, or imagenet",
            )
        state = read_state_dict(path, modality=getattr(module, "modality", None))
        info = {"path": str(source), "sha256": file_sha256(path)}
    apply_state_dict(module, state, where=where, label=label)
    return info


def read_state_dict(
    path: str | os.PathLike, modality: str | None = None
) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors or torch file (no arbitrary unpickling)."""
    path = Path(path)
    where = str(path)
    with open(path, "rb") as f:
        head = f.read(16)
    is_safetensors = path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{")
    if is_safetensors:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInput(f"cannot read safetensors weights ({e})", where=where) from None
        if meta.get("mmcli.kind") == "model" and modality:
            # an mmcli model checkpoint: take this modality's encoder
            prefix = f"encoders.{modality}."
            picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not picked:
                raise BadInput(f"the checkpoint has no {modality} encoder", where=where)
            state = picked
        return state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"not a readable weights file ({reason[:160]})",
            where=where,
            hint="pass a safetensors file or a torch state dict saved with torch.save(model.state_dict())",
        ) from None
    return _unwrap(obj, where)


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise BadInput(
        "the file holds no state dict (no name -> tensor mapping found)",
        where=where,
        hint="save weights with torch.save(model.state_dict()) or safetensors",
    )


def _strip_variants(keys: list[str]) -> list[dict[str, str]]:
    """Renamings old key -> new key that undo common prefixes (identity first)."""
    variants = [{k: k for k in keys}]
    frontier = [{k: k for k in keys}]
    for _ in range(3):
        nxt = []
        for mapping in frontier:
            for p in PREFIXES:
                if mapping and all(v.startswith(p) for v in mapping.values()):
                    nxt.append({k: v[len(p) :] for k, v in mapping.items()})
                elif sum(v.startswith(p) for v in mapping.values()) > len(mapping) // 2:
                    # most keys carry it (e.g. DDP + extra buffers): strip where present
                    nxt.append(
                        {k: v[len(p) :] if v.startswith(p) else v for k, v in mapping.items()}
                    )
        variants.extend(nxt)
        frontier = nxt
    return variants


def apply_state_dict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    where: str,
    label: str | None = None,
    lenient: bool = True,
) -> None:
    """Load ``state`` into ``module`` strictly; BadInput listing any mismatch.

    ``lenient`` undoes common prefixes and drops a classifier head first (for weights
    from elsewhere); mmcli checkpoints are loaded with ``lenient=False``.
    """
    label = label or _label(module)
    target = module.state_dict()
    renamed = dict(state)
    if lenient:
        best = max(_strip_variants(list(state)), key=lambda m: sum(v in target for v in m.values()))
        renamed = {new: state[old] for old, new in best.items()}
    unexpected = [k for k in renamed if k not in target]
    dropped = [k for k in unexpected if lenient and k.startswith(HEAD_PREFIXES)]
    if dropped:
        log.info("note: %s: dropped the classifier head (%s)", where, _list(dropped, 4))
        for k in dropped:
            del renamed[k]
    parts = mismatch_parts(
        {k: tuple(v.shape) for k, v in target.items()},
        {k: tuple(v.shape) for k, v in renamed.items()},
    )
    if parts:
        raise BadInput(
            f"weights do not match {label}: " + "; ".join(parts),
            where=where,
            hint="pass weights saved from the same architecture and config",
        )
    module.load_state_dict(renamed, strict=True)


def mismatch_parts(
    target: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]
) -> list[str]:
    """What differs between a module's state (name -> shape) and given weights: the
    missing, unexpected and wrongly shaped names, one phrase each (empty: they match)."""
    missing = [k for k in target if k not in given]
    unexpected = [k for k in given if k not in target]
    shapes = [
        f"{k} {list(given[k])} vs {list(v)}"
        for k, v in target.items()
        if k in given and tuple(given[k]) != tuple(v)
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({_list(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({_list(unexpected)})")
    if shapes:
        parts.append(f"wrong shape {len(shapes)} (file vs model: {_list(shapes)})")
    return parts


def _list(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def _label(module: nn.Module) -> str:
    modality, name = getattr(module, "modality", ""), getattr(module, "name", "")
    return f"{modality}/{name}" if modality and name else type(module).__name__


def _imagenet_state_dict(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    label = _label(module)
    # the config class names torchvision's weights enum entry (class attribute, not a field)
    weights_name = getattr(getattr(module, "config", None), "pretrained", None)
    if not weights_name:
        have = [n for n in list_encoders() if getattr(resolve(n)[2], "pretrained", None)]
        raise BadInput(
            f"{label} has no imagenet weights",
            hint=f"imagenet weights exist for {', '.join(have)}; pass a local file with --weights PATH",
        )
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    filename = os.path.basename(urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    fix = (
        f"download {weights.url} where there is internet and pass --weights PATH/{filename} "
        f"(or copy it to {cached})"
    )
    if cached.is_file():
        state = read_state_dict(cached)
    elif os.environ.get(OFFLINE_ENV):
        raise BadInput(
            f"imagenet weights for {label} are not cached and {OFFLINE_ENV} is set", hint=fix
        )
    else:
        # not torchvision's get_state_dict(): torch.hub prints "Downloading" on stdout
        log.info("downloading %s (%s)", weights_name, weights.url)
        match = re.search(r"-([a-f0-9]+)\.", filename)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                weights.url, str(cached), match.group(1) if match else None, progress=False
            )
        except Exception as e:  # URLError, OSError, hash mismatch, ...
            reason = str(getattr(e, "reason", e)) or type(e).__name__
            raise BadInput(
                f"cannot download imagenet weights for {label} ({reason[:120]})", hint=fix
            ) from None
        state = read_state_dict(cached)
    info: dict[str, Any] = {"path": IMAGENET, "name": weights_name, "url": weights.url}
    if cached.is_file():
        info["sha256"] = file_sha256(cached)
    return state, info


def weights_per_modality(
    weights: Mapping[str, str | os.PathLike] | None, modalities: Sequence[str]
) -> dict[str, str | os.PathLike]:
    """The weights source of each encoder in ``modalities``.

    ``weights`` maps a modality to a file (or ``imagenet``); the key ``""`` is a file
    given without a modality (``--weights PATH``), which is the only encoder's: a
    :class:`BadInput` when there are several encoders, or when the only one has a file
    already.
    """
    out = dict(weights or {})
    if "" not in out:
        return out
    source = out.pop("")
    if len(modalities) != 1:
        raise BadInput(
            f"--weights {source}: say which encoder it is for",
            hint=f"--weights MODALITY=PATH with MODALITY one of {', '.join(modalities)}",
        )
    (only,) = modalities
    if only in out:
        raise BadInput(
            f"--weights {source}: the {only} encoder has weights already ({out[only]})",
            hint="give each encoder one weights file",
        )
    out[only] = source
    return out
