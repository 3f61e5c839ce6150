"""Numerical context for exact scoring: IEEE float32 products, thread counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SMALL_WORK = 1 << 27  # multiply-adds below which one CPU thread is faster than several


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Inside: float32 products in IEEE float32 (no TF32 / bf16 shortcuts), bf16 products
    accumulate in float32 (no reduced-precision reductions on CUDA)."""
    import torch

    cuda = torch.backends.cuda.matmul
    old = (
        torch.get_float32_matmul_precision(),
        cuda.allow_tf32,
        cuda.allow_bf16_reduced_precision_reduction,
    )
    torch.set_float32_matmul_precision("highest")
    cuda.allow_tf32 = False
    cuda.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        cuda.allow_tf32 = old[1]
        cuda.allow_bf16_reduced_precision_reduction = old[2]


@contextlib.contextmanager
def few_threads(on: bool) -> Iterator[None]:
    """One intra-op CPU thread while inside (when ``on``): for small work, handing it to
    several threads costs more than it saves, and much more on a busy machine."""
    import torch

    if not on:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
