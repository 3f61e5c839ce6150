"""What the library adapters share: lazy imports, quiet library calls, offline rules,
tokenizer checks, the text batch a pretrained tokenizer produces, module views.

Nothing here imports open_clip, transformers or timm at import time.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mmcli.errors import BadInput, MissingDependency

log = logging.getLogger("mmcli")

OFFLINE_ENV = "MMCLI_OFFLINE"
#: module name -> (pip package, mmcli extra)
LIBRARIES = {
    "open_clip": ("open-clip-torch", "open_clip"),
    "transformers": ("transformers", "hf"),
    "timm": ("timm", "timm"),
}
PROBE = "a photo of a dog"  # tokenizer round trip


def require(module: str, purpose: str = ""):
    """Import an optional library, or raise the one-line install hint (exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = LIBRARIES[module]
        raise MissingDependency(package, extra, purpose) from None


def library_version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except (ImportError, AttributeError):
        return None


def offline() -> bool:
    """True when mmcli must not try the network (``MMCLI_OFFLINE`` or the hub's own flag)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def quiet_library() -> Iterator[None]:
    """Library calls without their log lines and progress bars (mmcli reports itself)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    hf = None
    if "transformers" in sys.modules:  # only a library already in use is quietened
        hf = importlib.import_module("transformers.utils.logging")
        verbosity = hf.get_verbosity()
        hf.set_verbosity_error()
        hf.disable_progress_bar()
    try:
        yield
    finally:
        logging.disable(previous)
        if hf is not None:
            hf.set_verbosity(verbosity)
            hf.enable_progress_bar()


def view_without(module: nn.Module, *names: str) -> nn.Module:
    """A shallow copy of ``module`` that no longer owns the children / parameters ``names``
    (e.g. a CLIP model without its image tower): the rest is shared, not copied."""
    clone = copy.copy(module)
    clone._modules = {k: v for k, v in module._modules.items() if k not in names}
    clone._parameters = {k: v for k, v in module._parameters.items() if k not in names}
    clone._buffers = {k: v for k, v in module._buffers.items() if k not in names}
    return clone


def read_library_weights(source: str, where: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local safetensors or torch file (``torch.load(weights_only=True)``)."""
    from pathlib import Path

    from mmcli.models.weights import read_state_dict

    path = Path(source)
    if not path.is_file():
        raise BadInput(
            "weights file not found" if not path.exists() else "weights path is not a file",
            where=where or str(source),
            hint="pass a .safetensors (or .bin/.pt/.pth) file",
        )
    state = read_state_dict(path)
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, label: str) -> None:
    """``module.load_state_dict(state)`` with mmcli's one-line listing of any mismatch."""
    from mmcli.models.weights import apply_state_dict

    apply_state_dict(module, state, where=where, label=label, lenient=False)


# ------------------------------------------------------------------------ text


class TextBatch:
    """Captions tokenized by a pretrained model's own tokenizer: named int tensors (``ids``,
    optional ``mask``), the number of captions cut at the context length, moved as one."""

    def __init__(self, tensors: dict[str, torch.Tensor], truncated: int = 0):
        self.tensors = tensors
        self.truncated = int(truncated)

    def to(self, device: Any, non_blocking: bool = False) -> TextBatch:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return TextBatch(moved, self.truncated)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.tensors.get(key, default)

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),)

    def pin_memory(self) -> TextBatch:
        return TextBatch({k: v.pin_memory() for k, v in self.tensors.items()}, self.truncated)


def as_text_batch(encoder: Any, x: Any) -> TextBatch:
    """What an adapter's forward gets: raw caption strings (tokenized here) or a TextBatch."""
    if isinstance(x, TextBatch):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
        return encoder.tokenize(list(x))
    raise ValueError(
        f"{encoder.modality}/{encoder.name} takes caption strings (it has its own tokenizer), "
        f"got {type(x).__name__}"
    )


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def check_hf_tokenizer(tokenizer: Any, where: str) -> None:
    """Fail loudly on a tokenizer that loaded without its vocabulary.

    A transformers tokenizer whose files are missing can come back with a handful of
    special tokens only (seen with ``CLIPTokenizer.from_pretrained(<hub id>)`` offline):
    every caption would then be the same few ids. Checks the vocabulary size and a round
    trip of a plain English phrase.
    """
    size = len(tokenizer)
    hint = "the folder needs the tokenizer's files (tokenizer.json, or vocab.json + merges.txt / vocab.txt / *.model)"
    if size < 100:
        raise BadInput(
            f"the tokenizer has only {size} tokens (its vocabulary did not load)",
            where=where,
            hint=hint,
        )
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if not ids or (unk is not None and unk in ids) or _squash(back) != _squash(PROBE):
        raise BadInput(
            f"the tokenizer does not round-trip {PROBE!r} (got {back!r}): its vocabulary is broken",
            where=where,
            hint=hint,
        )


def count_over(lengths: Sequence[int], limit: int) -> int:
    """How many token sequences are longer than ``limit`` (truncated by the tokenizer)."""
    return sum(1 for n in lengths if n > limit)


# ----------------------------------------------------------------------- misc


def weights_info(source: str) -> dict[str, Any]:
    from mmcli.formats.manifest import file_sha256

    return {"path": str(source), "sha256": file_sha256(source)}


#: image settings that change the pixels (besides the size)
LIKE_KEYS = ("resize_mode", "interpolation", "resize_size", "backend")


def check_image_size(
    encoder, spec: dict[str, Any], where: str, like: str, fixed_size: bool = True
) -> None:
    """Images of another size than a fixed-size model takes: one line naming the fix. Images
    resized otherwise than the model's own transform: a warning (the features differ a little)."""
    have = spec.get("image_size")
    if have is None:  # not a table preprocess wrote
        return
    want = encoder.image_size
    if fixed_size and (int(have), int(have)) != tuple(want):
        raise BadInput(
            f"the images are {have} px, {like} takes {want[0]}x{want[1]}",
            where=where,
            hint=f"preprocess them with: mmcli preprocess ... --like {like}",
        )
    own = getattr(encoder, "like", None)
    given = {k: spec.get(k, "mmcli" if k == "backend" else None) for k in LIKE_KEYS}
    differ = [k for k in LIKE_KEYS if own and own.get(k) != given[k]]
    if differ:
        log.warning(
            "the images were not resized as %s's own transform resizes them (%s): its features "
            "differ a little; preprocess with --like %s for the same pixels",
            like,
            ", ".join(f"{k} {given[k]} vs {own.get(k)}" for k in differ),
            like,
        )


def ones_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
