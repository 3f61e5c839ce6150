"""Model checkpoints in and out, without trusting the file's config.

    save_model(model, "run/model.safetensors", state={"step": 100})
    model = load_model("run/model.safetensors", device="cuda")

The config in a checkpoint says how big the model is; the weights beside it say how big
it really is. :func:`load_model` never allocates more than the stored tensors (plus
bounded constants), whatever the config claims (``width = 10**9``, ``depth = 10**9``):

1. the header is read and validated (:mod:`mmcli.formats.safetensors_io`): shapes, dtypes
   and byte ranges of every stored tensor, before any is loaded;
2. the config is type-checked (:meth:`ModelConfig.from_dict`);
3. the model is built on the meta device (shapes only, no memory) under a budget of
   :data:`CALLS_PER_TENSOR` torch operations per stored tensor: building far more
   modules than the file holds tensors (10**9 fusion layers) stops at once;
4. every parameter and persistent buffer is compared with the stored tensor of its name
   (missing, unexpected, wrong shape or kind: one line), and the constants the model
   computes itself (non-persistent buffers: mel filterbanks, normalisation) must fit in
   :data:`MAX_CONSTANT_BYTES`;
5. only then is it built for real, loaded and moved to the device (see
   :func:`materialize` for why a real build rather than ``to_empty``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mmcli.errors import BadInput
from mmcli.formats.safetensors_io import FLOAT_CODES, TensorInfo

#: torch operations allowed per stored tensor while building on the meta device
#: (mmcli's own models need fewer than 8), plus a fixed allowance
CALLS_PER_TENSOR = 32
BASE_CALLS = 2000
#: most bytes of constants (non-persistent buffers) a model may compute for itself
MAX_CONSTANT_BYTES = 256 * 2**20


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    train: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write weights + config (+ training args, step, metrics) atomically."""
    from mmcli.formats.checkpoint import Checkpoint, save_checkpoint
    from mmcli.models.adapters import embedded

    config, tensors = model.config_dict(), model.state_dict()
    files = library_files(model)  # hf:DIR's config and tokenizer travel with the weights
    config["extra"] = {k: v for k, v in config["extra"].items() if k != embedded.EXTRA_KEY}
    if files:
        digests = {path: embedded.digest(f) for path, f in files.items()}
        config["extra"][embedded.EXTRA_KEY] = digests
        tensors = {**tensors, **embedded.as_tensors({digests[p]: f for p, f in files.items()})}
    save_checkpoint(
        path,
        Checkpoint(
            config=config,
            state_dict=tensors,
            train=train or {},
            state=state or {},
            metrics=metrics or {},
        ),
    )


def library_files(model: nn.Module) -> dict[str, dict[str, bytes]]:
    """``{hf path: its folder's files}`` of the model's transformers encoders."""
    return {
        m.config.path: m.hf_files
        for m in model.modules()
        if getattr(m, "hf_files", None) is not None
    }


def load_model(path: str | os.PathLike, cls: Any, device: str | torch.device = "cpu"):
    """Rebuild a ``cls`` (:class:`MultimodalModel`, which calls this from
    ``from_checkpoint``) from an mmcli checkpoint (see the module docstring). BadInput, one
    line, for anything that does not fit."""
    from mmcli.formats.atomic import is_stdio
    from mmcli.formats.manifest import file_sha256
    from mmcli.models.adapters import embedded
    from mmcli.models.config import ModelConfig

    where = str(path)
    stored, ckpt, read_tensors = _open(path)
    config = ModelConfig.from_dict(ckpt.config, where=where)
    weights = {n: info for n, info in stored.items() if not n.startswith(embedded.PREFIX)}
    state = None
    with contextlib.ExitStack() as stack:
        if len(weights) < len(stored) or config.extra.get(embedded.EXTRA_KEY):
            # files the build reads (hf:DIR's config, tokenizer): read first (a read is
            # bounded by the file's size; building is what the meta device guards)
            state = read_tensors()
            stack.enter_context(embedded.from_checkpoint(config.extra, state, where))
        model = build_on_meta(cls, config, len(weights), where)
        check_against_stored(model, weights, where)
        model = materialize(
            lambda: cls(config), read_tensors() if state is None else state, device, where
        )
    model.weights.update(config.extra.get("encoder_weights", {}) or {})
    model.checkpoint = {"path": where, "sha256": None if is_stdio(path) else file_sha256(path)}
    if not is_stdio(path):  # found again from another folder (retrieve / eval without --model)
        model.checkpoint["abspath"] = os.path.abspath(path)
    model.checkpoint_meta = {"train": ckpt.train, "state": ckpt.state, "metrics": ckpt.metrics}
    return model.eval()


def _open(path: str | os.PathLike):
    """(stored tensor infos, checkpoint metadata, a function that loads the tensors)."""
    from mmcli.formats.atomic import is_stdio
    from mmcli.formats.checkpoint import checkpoint_from_metadata, read_checkpoint_bytes
    from mmcli.formats.safetensors_io import parse_header, read_header

    where = str(path)
    if is_stdio(path) or os.path.isdir(path):
        data = read_checkpoint_bytes(path)  # stdin, or the one-line refusal of a folder
        tensors, metadata, _ = parse_header(data, where)
    else:
        data = None
        tensors, metadata, _ = read_header(path, "checkpoint")
    ckpt = checkpoint_from_metadata(metadata, where)

    def read() -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:  # one read into memory: copying from a memory map page-faults (3x slower)
            return load(data if data is not None else read_checkpoint_bytes(path))
        except (SafetensorError, OSError) as e:
            raise BadInput(f"corrupt checkpoint ({e})", where=where) from None

    return tensors, ckpt, read


class _OverBudget(Exception):
    pass


class _Budget(TorchFunctionMode):
    """Counts torch operations; raises once there are more than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.calls > self.limit:
            raise _OverBudget
        return func(*args, **(kwargs or {}))


_BUILD_ERRORS = (
    RuntimeError,
    ValueError,
    TypeError,
    OverflowError,
    IndexError,
    KeyError,
    ZeroDivisionError,
)


def build_on_meta(cls: Any, config: Any, stored_tensors: int, where: str) -> nn.Module:
    """``cls(config)`` on the meta device, stopped when building takes more than
    :data:`CALLS_PER_TENSOR` torch operations per stored tensor."""
    budget = _Budget(BASE_CALLS + CALLS_PER_TENSOR * stored_tensors)
    try:
        with torch.device("meta"), budget, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "initializing zero-element tensors"
            return cls(config)
    except _OverBudget:
        raise BadInput(
            f"the model config describes a far bigger model than the {stored_tensors} tensors "
            f"the checkpoint holds (building stopped after {budget.limit:,} operations)",
            where=where,
            hint="the checkpoint is corrupt or its config was edited; recreate it",
        ) from None
    except BadInput as e:
        raise BadInput(f"cannot rebuild the model: {e}", where=where) from None
    except _BUILD_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(
            f"cannot rebuild the model from its config ({type(e).__name__}: {reason})",
            where=where,
            hint="the checkpoint is corrupt or its config was edited; recreate it",
        ) from None


def check_against_stored(model: nn.Module, stored: dict[str, TensorInfo], where: str) -> None:
    """Every parameter / persistent buffer of the (meta) model against the stored tensor
    of its name; the model's own constants against :data:`MAX_CONSTANT_BYTES`."""
    from mmcli.models.weights import mismatch_parts

    target = model.state_dict(keep_vars=True)
    kinds = [
        f"{k} ({stored[k].torch_dtype_name} in the file)"
        for k, t in target.items()
        if k in stored
        and tuple(stored[k].shape) == tuple(t.shape)
        and (stored[k].dtype in FLOAT_CODES) != t.is_floating_point()
    ]
    parts = mismatch_parts(
        {k: tuple(t.shape) for k, t in target.items()},
        {k: tuple(v.shape) for k, v in stored.items()},
    )
    if kinds:
        parts.append(f"wrong kind of number {len(kinds)} ({', '.join(kinds[:3])})")
    if parts:
        raise BadInput(
            "weights do not match its model config: " + "; ".join(parts),
            where=where,
            hint="pass weights saved from the same architecture and config",
        )
    constants = sum(
        math.prod(b.shape) * b.element_size()
        for name, b in model.named_buffers()
        if name not in target
    )
    if constants > MAX_CONSTANT_BYTES:
        raise BadInput(
            f"the model config asks for {constants / 2**20:,.0f} MB of computed constants "
            f"(buffers not stored in the file; the limit is {MAX_CONSTANT_BYTES / 2**20:.0f} MB)",
            where=where,
            hint="the checkpoint is corrupt or its config was edited; recreate it",
        )


def materialize(
    rebuild, state: dict[str, torch.Tensor], device, where: str | None = None
) -> nn.Module:
    """Allocate the checked model: ``rebuild()`` builds it for real, ``state`` is loaded
    and the result moved to ``device``.

    Its sizes were checked on the meta device, so this allocates no more than the stored
    tensors plus bounded constants. It is built for real (not ``to_empty``) so that the
    random initialisation draws the same numbers as it always did: a seeded run that loads
    a checkpoint (distill's teacher) then initialises another model gets the same numbers
    as with earlier versions of mmcli.
    """
    try:
        model = rebuild()
    except BadInput as e:
        raise BadInput(f"cannot rebuild the model: {e}", where=where) from None
    except _BUILD_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(
            f"cannot rebuild the model from its config ({reason})", where=where
        ) from None
    model.load_state_dict(state, strict=True)
    return model.to(device)
