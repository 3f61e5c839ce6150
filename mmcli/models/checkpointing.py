"""Gradient checkpointing of encoder blocks, and running statistics that update once.

``--grad-checkpointing`` trades compute for memory: a checkpointed block keeps only its
input during the forward pass and runs again in the backward pass to rebuild what the
gradient needs. :func:`run_blocks` is what the built-in encoders use (transformer layers,
conv stages); the adapters switch on their library's own mechanism
(:meth:`mmcli.models.base.Encoder.set_grad_checkpointing`).

A block with batch norm must not update its running statistics twice when it runs again:
:func:`kept_running_stats` leaves them as they are during the second run (torch's
checkpoint itself replays the RNG, so dropout draws the same masks). The gradient cache
of ``--accum-steps`` (``mmcli.train.gradcache``) uses it the same way for the re-run of
each micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@contextlib.contextmanager
def kept_running_stats(module: nn.Module) -> Iterator[None]:
    """Run the body with the running statistics of every norm layer in ``module`` left as
    they are: momentum 0 inside (``(1 - 0) * running + 0 * batch`` is ``running`` exactly;
    the buffers are not written afterwards, since autograd holds them for the backward
    pass), and the batch counts put back."""
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [(m, m.momentum, _count(m)) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _count(m: _NormBase) -> torch.Tensor | None:
    n = m.num_batches_tracked
    return None if n is None else n.detach().clone()


def _once(block: nn.Module) -> Callable:
    """``block`` as a function whose later calls (the recomputation in backward) leave the
    running statistics as the first call left them."""
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return block(*args, **kwargs)
        with kept_running_stats(block):
            return block(*args, **kwargs)

    return run


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, enabled: bool, **kwargs):
    """``x`` through ``blocks`` in turn (each given ``kwargs``), each checkpointed when
    ``enabled``."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if enabled and block.training and torch.is_grad_enabled():
            # non-reentrant checkpoint hands the keyword arguments on to the block
            x = checkpoint(_once(block), x, use_reentrant=False, preserve_rng_state=True, **kwargs)
        else:
            x = block(x, **kwargs)
    return x
