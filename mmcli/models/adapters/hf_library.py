"""The transformers library behind the ``hf:`` adapters: folders and hub ids, loading
(``from_pretrained``, or ``from_config`` when a checkpoint's embedded files stand in for
the folder), weights provenance, tokenizer checks, gradient checkpointing."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.adapters.common import (
    check_hf_tokenizer,
    offline,
    quiet_library,
    require,
    weights_info,
)
from mmcli.models.adapters.embedded import folder_files, redirected
from mmcli.models.adapters.shared import shared_build

LIB = "hf"


def local_folder(path: str) -> Path | None:
    """The folder ``hf:path`` reads from: the checkpoint's embedded files while one is
    being rebuilt (:mod:`mmcli.models.adapters.embedded`), else ``path``; None for a hub id."""
    embedded = redirected(path)
    if embedded is not None:
        return embedded
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or p.exists():
        raise BadInput(
            "not a transformers model folder" if p.exists() else "model folder not found",
            where=path,
            hint="pass the folder model.save_pretrained() wrote (config.json, weights, tokenizer)",
        )
    return None  # a hub id


def _hub_kwargs(path: str) -> dict[str, Any]:
    """``local_files_only`` for hub ids when offline: only the local cache is used."""
    return {"local_files_only": True} if local_folder(path) is None and offline() else {}


def _hub_failure(path: str, e: Exception) -> BadInput:
    if local_folder(path) is not None:
        return BadInput(f"cannot load the transformers model ({str(e)[:200]})", where=path)
    state = "mmcli is offline" if offline() else f"it could not be fetched ({str(e)[:120]})"
    return BadInput(
        f"hf:{path} is not a local folder, not in the Hugging Face cache and {state}",
        hint=f"download it where there is internet (huggingface-cli download {path} --local-dir "
        f"DIR, or save_pretrained) and pass hf:DIR",
    )


def read_json(folder: Path | None, name: str) -> dict[str, Any]:
    if folder is None or not (folder / name).is_file():
        return {}
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"cannot read {name} ({e})", where=str(folder)) from None


def load_auto(path: str, what: str):
    """``AutoConfig`` / ``AutoModel`` / ``AutoTokenizer`` / ... ``.from_pretrained(path)``."""
    tf = require("transformers", "hf: encoders")
    cls = getattr(tf, what)
    source = str(redirected(path) or path)
    try:
        with quiet_library():
            obj = cls.from_pretrained(source, **_hub_kwargs(path))
    except (OSError, ValueError, KeyError) as e:
        raise _hub_failure(path, e) from None
    return obj.eval() if isinstance(obj, nn.Module) else obj


def hf_model_object(path: str):
    return shared_build((LIB, path), lambda: auto_model(path))


def auto_model(path: str, what: str = "AutoModel"):
    """``what.from_pretrained(path)``; on the meta device (a checkpoint's sizes checked before
    it is loaded) the architecture alone, from the folder's config, as when the folder is a
    checkpoint's embedded files (the weights are the checkpoint's)."""
    if torch.empty(0).device.type != "meta" and redirected(path) is None:
        return load_auto(path, what)
    tf = require("transformers", "hf: encoders")
    with quiet_library():
        return getattr(tf, what).from_config(load_auto(path, "AutoConfig")).eval()


def model_type(path: str) -> str:
    return str(getattr(load_auto(path, "AutoConfig"), "model_type", ""))


def folder_weights(path: str) -> dict[str, Any]:
    """Where an hf encoder's weights come from: the folder (its weights file's sha256), the
    hub id, or the checkpoint being rebuilt."""
    if redirected(path) is not None:
        return {"path": f"hf:{path}", "embedded": True}
    return _folder_weights(path)


@functools.lru_cache(maxsize=16)  # both towers of one folder: hash its weights once
def _folder_weights(path: str) -> dict[str, Any]:
    folder = local_folder(path)
    if folder is None:
        return {"path": f"hf:{path}"}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return weights_info(str(files[0])) if len(files) == 1 else {"path": str(folder)}


def model_files(path: str) -> dict[str, bytes] | None:
    """The folder's own files a checkpoint carries (config, tokenizer, processor); None for
    a hub id not in the local cache."""
    folder = local_folder(path)
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not cached (or no huggingface_hub): the hub id is recorded
            return None
    return folder_files(folder)


def load_tokenizer(path: str):
    tok = load_auto(path, "AutoTokenizer")
    check_hf_tokenizer(tok, where=f"the tokenizer of hf:{path}")
    return tok


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_grad_checkpointing(self_, enable: bool) -> bool:
    """transformers' own switch (``gradient_checkpointing_enable``, non-reentrant) where the
    model supports it."""
    model = self_.hf
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    new = hasattr(model, "activation_checkpointing_enable")  # the name since transformers 5
    if enable and new:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        getattr(
            model, "activation_checkpointing_disable" if new else "gradient_checkpointing_disable"
        )()
    self_.grad_checkpointing = enable
    return True


def weights_file(self_, source) -> dict[str, Any]:
    """``--weights FILE`` for an hf tower: a state dict with the library's own key names."""
    from mmcli.models.adapters.common import load_strict, read_library_weights

    state = read_library_weights(str(source))
    mine = self_.hf.state_dict()
    load_strict(
        self_.hf,
        {k: v for k, v in state.items() if k in mine},
        str(source),
        f"hf:{self_.config.path}",
    )
    return weights_info(str(source))
