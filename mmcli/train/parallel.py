"""Cross-process helpers for losses under torchrun (identity in a single process)."""

from __future__ import annotations

import torch


def _enabled() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [N, ...] from every rank (rank order), keeping the gradient path.

    The backward pass sums the gradients of every rank's copy into the local slice, so a
    loss computed on the gathered batch on each rank and averaged by DDP equals the loss
    of one process holding the whole batch.
    """
    if not _enabled():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank, no gradient (for ids, masks)."""
    if not _enabled():
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
