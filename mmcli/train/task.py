"""What every recipe's task shares: a model trained into a joint space.

A task is an ``nn.Module`` that turns a :class:`~mmcli.train.sampler.Batch` into a loss
(``forward``); :func:`mmcli.train.loop.fit` does the rest. :class:`JointTask` gives a
recipe everything but ``forward``: rows gathered over ranks, the logit-scale clamp after
each step, AdamW parameter groups over the trained modules, saving the model, and the
validation metrics (:func:`mmcli.train.evaluation.evaluate_model`) with their default
best metric. Subclasses set ``self.data`` (a :class:`~mmcli.train.splits.Data`), define
:attr:`model` (the :class:`MultimodalModel` being trained) and ``forward``.

    class MyTask(JointTask):
        def __init__(self, model, data, eval_batch_size=256):
            super().__init__(data, eval_batch_size)
            self.model = model
        def forward(self, batch):
            ...
            return loss, {"loss": float(loss)}
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcli.errors import BadInput
from mmcli.models.multimodal import MultimodalModel
from mmcli.train.data import Dataset
from mmcli.train.evaluation import evaluate_model, metric_names
from mmcli.train.parallel import gather, gather_with_grad
from mmcli.train.sampler import Batch
from mmcli.train.schedule import decay_groups
from mmcli.train.splits import Data

log = logging.getLogger("mmcli")

#: the learned temperature is clamped at 1/100 (CLIP)
MAX_LOGIT_SCALE = math.log(100.0)


class JointTask(nn.Module):
    """The shared half of fuse-train's and distill's tasks (see the module doc)."""

    model: MultimodalModel
    #: whether the loss couples rows across the batch (in-batch negatives): then a task
    #: splits ``forward`` into ``represent`` / ``batch_loss`` / ``row_loss`` and
    #: ``--accum-steps`` uses the gradient cache (``mmcli.train.gradcache``)
    coupled = False

    def __init__(self, data: Data, eval_batch_size: int = 256):
        super().__init__()
        self.data = data
        self.eval_batch_size = eval_batch_size

    # -- rows ---------------------------------------------------------------------
    @staticmethod
    def gathered_rows(batch: Batch, x: torch.Tensor, m: str, *, grad: bool = True):
        """(the rows of ``x`` whose item has ``m``, their item ids), gathered over ranks.

        ``x`` holds K blocks of the batch's B rows (K captions per item for text); with
        ``grad`` the gathered rows carry gradient back to this rank's rows."""
        k = x.shape[0] // len(batch)
        items = batch.items.repeat(k)
        present = gather(batch.present[m].repeat(k))
        x = gather_with_grad(x) if grad else gather(x.contiguous())
        return x[present], gather(items)[present]

    @staticmethod
    def pooled_rows(model: MultimodalModel, batch: Batch, m: str, x: torch.Tensor, *, tokens: bool):
        """(``model``'s pooled encoding of the rows ``x`` of ``m``, and when ``tokens`` its
        (tokens, mask) of the batch's first block, for attention fusion; else None)."""
        if not tokens:
            return model.encoders[m](x), None
        pooled, tok, mask = model.encoders[m].forward_tokens(x)
        b = len(batch)
        return pooled, (tok[:b], mask[:b] & batch.present[m][:, None])

    # -- the loss in parts (the gradient cache) -----------------------------------------
    def represent(self, batch: Batch, cached: Any = None) -> Any:
        """What the encoders make of ``batch``: tensors of rows (K blocks of B), in any
        nesting of dicts and tuples. ``cached``: this batch's first-pass result (no graph),
        given when it is encoded again, for parts that carry no gradient (a teacher's)."""
        raise NotImplementedError

    def batch_loss(self, batch: Batch, reps: Any) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The weighted sum of the losses that couple rows, over all of ``batch``, and their
        values by name."""
        raise NotImplementedError

    def row_loss(self, batch: Batch, reps: Any) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The weighted sum of the per-row losses (means over rows), and their values."""
        return None, {}

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.joint_forward(batch)

    def joint_forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """``forward`` from the parts: the two losses of one batch, added."""
        reps = self.represent(batch)
        parts = [self.batch_loss(batch, reps), self.row_loss(batch, reps)]
        total = sum(loss for loss, _ in parts if loss is not None)
        logs = {"loss": float(total.detach())}
        for _, part in parts:
            logs.update(part)
        return total, {**logs, **self.state_logs()}

    def state_logs(self) -> dict[str, float]:
        """Logged with each step's losses: the learned temperature."""
        p = self.model.logit_scale
        return {} if p is None else {"logit_scale": float(p.detach().exp())}

    # -- loop hooks -----------------------------------------------------------------
    def set_grad_checkpointing(self) -> None:
        """``--grad-checkpointing``: every trained encoder that supports it checkpoints its
        blocks; one line for each that does not."""
        for m, enc in self.model.encoders.items():
            if not any(p.requires_grad for p in enc.parameters()):
                continue
            if enc.set_grad_checkpointing(True):
                log.info("--grad-checkpointing: the %s encoder checkpoints its blocks", m)
            else:
                log.warning(
                    "--grad-checkpointing: the %s encoder (%s) has no blocks to checkpoint; "
                    "it runs as before",
                    m,
                    enc.name,
                )

    def after_step(self) -> None:
        """Keep a learned temperature in range (CLIP's clamp at 100)."""
        p = self.model.logit_scale
        if p is not None and p.requires_grad:
            with torch.no_grad():
                p.clamp_(0, MAX_LOGIT_SCALE)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over the parameters of every child module (the model, and e.g.
        distill's projectors), named as inside each child."""
        named = [item for child in self.children() for item in child.named_parameters()]
        return decay_groups(named, weight_decay)

    def save_model(self, path, **meta: Any) -> None:
        self.model.to_checkpoint(path, **meta)

    def metric_names(self) -> list[str] | None:
        """The validation metrics this task reports (None: it does not validate)."""
        if not self.data.validates:
            return None
        return metric_names(self.data.eval_pairs, self.model.classifier is not None)

    def evaluate(self) -> dict[str, float]:
        if not self.data.validates:
            return {}
        return evaluate_model(
            self.model,
            self.data.val_dataset,
            self.data.val,
            self.data.eval_pairs,
            batch_size=self.eval_batch_size,
        )

    def default_best_metric(self) -> str | None:
        """Mean recall@1 of the first pair validated, else top-1 accuracy of a classifier."""
        if self.data.val is None:
            return None
        if self.data.eval_pairs:
            a, b = self.data.eval_pairs[0]
            return f"{a}-{b}/mean_recall@1"
        return "acc1" if self.model.classifier is not None else None


# ------------------------------------------------------------------ model set-up


def head_spec(kind: str, in_dim: int, out_dim: int) -> dict[str, Any]:
    """A projection head's config: ``linear`` / ``mlp`` into ``out_dim``, or ``identity``."""
    if kind == "identity":
        return {"kind": "identity", "in_dim": in_dim, "out_dim": in_dim}
    spec: dict[str, Any] = {"kind": kind, "in_dim": in_dim, "out_dim": out_dim}
    if kind == "mlp":
        spec["hidden"] = max(in_dim, out_dim)
    return spec


def token_counts(model: MultimodalModel, ds: Dataset, modalities: list[str]) -> dict[str, int]:
    """How many tokens each encoder gives for this data's rows (sizes the position tables
    of attention fusion)."""
    counts = {}
    with torch.no_grad():
        for m in modalities:
            row = ds.tables[m].fetch(np.array([0]))
            _, tokens, _ = model.encoders[m].eval().forward_tokens(row)
            counts[m] = int(tokens.shape[1])
    return counts


def parse_weights(text: str | None, *, known: tuple[str, ...] | None, what: str, example: str):
    """``a=1,b=0.5,c`` -> {name: weight} (a bare name weighs 1); None for an empty text.

    ``known``: the accepted names (checked here), or None to leave the check to the config."""
    if text is None or not text.strip():
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if known is not None and name not in known:
            plural = what + ("es" if what.endswith("s") else "s")
            raise BadInput(f"unknown {what} {name!r}", hint=f"known {plural}: {', '.join(known)}")
        try:
            out[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise BadInput(
                f"bad {what} weight in {part!r}", hint=f"for example {example}"
            ) from None
    return out
