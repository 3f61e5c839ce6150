"""Exact large-batch training with ``--accum-steps N``: the gradient cache.

Plain gradient accumulation sums the gradients of N micro-batches of B rows. For a loss
that is a mean over rows (classification, captioning) that is the gradient of one batch
of N×B rows. A contrastive or sigmoid loss, or matching with in-batch negatives, couples
the rows: each micro-batch would see only its own B-1 negatives. The gradient cache (Gao
et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup")
gives the N×B batch's gradient with one micro-batch's activations in memory:

1. every micro-batch is encoded without a graph (``task.represent``), its RNG state saved
   first;
2. the coupled loss (``task.batch_loss``) runs once over all N×B rows with the
   representations as leaves: its backward gives the gradient of every representation
   (and of the parameters after the encoders: temperature, fusion, match head);
3. each micro-batch is encoded again with a graph, from the same RNG state (dropout draws
   the same masks) and with the norm layers' running statistics put back afterwards (they
   update once per micro-batch, as in the first pass), and backpropagates its slice of the
   cached gradient, plus its per-row losses (``task.row_loss``) divided by N: plain
   accumulation, exact for them.

Batch norm normalises each micro-batch with its own statistics in both passes: with BN
encoders the result is the N×B batch's gradient with per-micro-batch statistics (as DDP
without SyncBatchNorm gives per-GPU statistics); without BN it is the full batch's.

Under torchrun the representations are gathered across ranks inside ``batch_loss`` as
they are in one step; the parameters' gradients are then averaged across ranks here (the
task runs outside DDP's wrapper for these steps).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from mmcli.models.checkpointing import kept_running_stats
from mmcli.runtime import autocast
from mmcli.train.sampler import Batch, cat_blocks, split_blocks

log = logging.getLogger("mmcli")


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _merge(reps: list, sizes: Sequence[int]):
    """The micro-batches' representations as one batch's: tensors joined block-wise and,
    when floating point, made leaves that collect the loss's gradient."""
    flat = [tree_flatten(r) for r in reps]
    spec = flat[0][1]
    merged = []
    for parts in zip(*(leaves for leaves, _ in flat), strict=True):
        if not isinstance(parts[0], torch.Tensor):
            merged.append(parts[0])
            continue
        x = cat_blocks([p.detach() for p in parts], sizes)
        merged.append(x.requires_grad_() if x.is_floating_point() else x)
    return merged, tree_unflatten(merged, spec)


class GradCache:
    """The optimizer step's backward over N micro-batches as one batch (see the module doc).

    ``scale``: the loop's grad scaler (fp16); ``dist``: the run's :class:`DistInfo`."""

    def __init__(self, task, n: int, scaler, device: torch.device, precision: str, dist):
        self.task, self.n, self.scaler = task, n, scaler
        self.device, self.precision, self.dist = device, precision, dist
        self.pending: list[Batch] = []
        log.info(
            "--accum-steps %d: gradient cache (the losses with in-batch negatives see the rows "
            "of all %d micro-batches)",
            n,
            n,
        )

    def add(self, batch: Batch, last_micro: bool, accum: dict[str, float]) -> None:
        """Keep ``batch``; at the step's last micro-batch run the whole backward."""
        self.pending.append(batch)
        if last_micro:
            batches, self.pending = self.pending, []
            accum.update(self.backward(batches))

    def backward(self, batches: list[Batch]) -> dict[str, float]:
        """Gradients of the N×B batch into the parameters' ``.grad``; returns the step's logs."""
        task, dev = self.task, self.device
        sizes = [len(b) for b in batches]
        states, reps = [], []
        for b in batches:
            states.append(_rng_state(dev))
            with torch.no_grad(), autocast(dev, self.precision, training=True):
                reps.append(task.represent(b))
        after = _rng_state(dev)
        leaves, whole = _merge(reps, sizes)
        with autocast(dev, self.precision, training=True):
            loss, logs = task.batch_loss(Batch.cat(batches), whole)
        total = 0.0
        if loss is not None:
            total = float(loss.detach())
            if loss.requires_grad:
                self.scaler.scale(loss).backward()
        grads = [
            split_blocks(x.grad, sizes)
            if isinstance(x, torch.Tensor) and x.grad is not None
            else None
            for x in leaves
        ]
        row_logs: dict[str, float] = {}
        for i, b in enumerate(batches):
            _set_rng_state(states[i], dev)
            row_logs_i, row_total = self._rerun(b, reps[i], [g and g[i] for g in grads])
            total += row_total / self.n
            for k, v in row_logs_i.items():
                row_logs[k] = row_logs.get(k, 0.0) + v / self.n
        _set_rng_state(after, dev)
        if self.dist.enabled:
            self._average_across_ranks()
        return {"loss": total, **logs, **row_logs, **task.state_logs()}

    def _rerun(self, batch: Batch, cached, grads: list) -> tuple[dict[str, float], float]:
        """One micro-batch encoded again with its graph; backward of its slice of the cached
        gradient and of its per-row losses / N."""
        task = self.task
        with kept_running_stats(task), autocast(self.device, self.precision, training=True):
            rep = task.represent(batch, cached=cached)
            row, logs = task.row_loss(batch, rep)
        terms: list[torch.Tensor] = []
        for x, g in zip(tree_flatten(rep)[0], grads, strict=True):
            if g is not None and isinstance(x, torch.Tensor) and x.requires_grad:
                terms.append((x.float() * g.float()).sum())  # g is already scaled (fp16)
        row_total = 0.0
        if row is not None:
            row_total = float(row.detach())
            if row.requires_grad:
                terms.append(self.scaler.scale(row / self.n))
        if terms:
            torch.stack([t.reshape(()) for t in terms]).sum().backward()
        return logs, row_total

    def _average_across_ranks(self) -> None:
        """What DDP does in a step: the mean of every parameter's gradient over the ranks
        (rank 0's buffers, e.g. running statistics, broadcast as DDP does)."""
        import torch.distributed as tdist

        world = self.dist.world_size
        for p in self.task.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tdist.all_reduce(p.grad)
            p.grad /= world
        for buf in self.task.buffers():
            tdist.broadcast(buf, 0)


def uses_cache(task: Any, accum_steps: int) -> bool:
    """Whether a step of ``accum_steps`` micro-batches needs the gradient cache: the task
    couples rows across the batch (and says how to split its loss)."""
    return accum_steps > 1 and bool(getattr(task, "coupled", False))
