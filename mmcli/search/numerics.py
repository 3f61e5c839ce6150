"""Numerical context for exact scoring: IEEE float32 products, thread counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SMALL_WORK = 1 << 27  # multiply-adds below which one CPU thread is faster than several


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Inside: float32 products in IEEE float32 (no TF32 / bf16 shortcuts), bf16 products
    accumulate in float32 (no reduced-precision reductions on CUDA). Settings are only
    touched when they differ from that (torch's defaults), and restored after."""
    import torch

    changed: list[tuple[object, str, object]] = []

    def ensure(obj: object, name: str, value: object) -> None:
        try:
            old = getattr(obj, name)
            if old != value:
                setattr(obj, name, value)
                changed.append((obj, name, old))
        except (AttributeError, RuntimeError, ValueError):
            pass

    cuda = torch.backends.cuda.matmul
    ensure(cuda, "allow_bf16_reduced_precision_reduction", False)
    for backend in (getattr(torch.backends.mkldnn, "matmul", None), cuda):
        if getattr(backend, "fp32_precision", "none") not in ("none", "ieee"):  # newer torch API
            ensure(backend, "fp32_precision", "ieee")
    legacy = None
    with contextlib.suppress(RuntimeError):  # raised when the newer API is in use (above)
        legacy = torch.get_float32_matmul_precision()
    if legacy not in (None, "highest"):
        torch.set_float32_matmul_precision("highest")
        ensure(cuda, "allow_tf32", False)
    try:
        yield
    finally:
        if legacy not in (None, "highest"):
            torch.set_float32_matmul_precision(legacy)
        for obj, name, old in reversed(changed):
            setattr(obj, name, old)


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
