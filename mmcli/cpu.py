"""The CPU side of the runtime: what this CPU's bfloat16 hardware is, read once per process
from ``/proc/cpuinfo`` (AMX tiles, where bf16 autocast makes training faster, and bf16
units in general, where a bfloat16 model makes inference faster; re-exported by
:mod:`mmcli.runtime`), and :func:`tune_malloc`, the allocator setting the command line
runs with."""

from __future__ import annotations

import functools
import logging
import os
import sys

log = logging.getLogger("mmcli")


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo``, read once); None where there is no such
    file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return frozenset()


@functools.cache
def cpu_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles, where bf16 autocast makes CPU training
    faster than fp32 (elsewhere, and where the flags cannot be read, training stays fp32)."""
    return "amx_bf16" in (_cpu_flags() or ())


@functools.cache
def cpu_bf16_units() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX or AVX-512 BF16). Without them torch
    emulates bf16 and a bfloat16 model is several times slower than fp32 (measured on an
    AVX2-only EPYC: ViT-B-32 1.1 vs 6.9 img/s)."""
    flags = _cpu_flags()
    if flags is not None:
        return "amx_bf16" in flags or "avx512_bf16" in flags
    import torch  # not Linux: trust torch's report

    cap = torch.backends.cpu.get_cpu_capability()
    return cap.startswith("AVX512") and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def _warn_emulated_bf16() -> None:
    """One warning line per process, however many models a command casts."""
    log.warning(
        "this CPU has no bfloat16 units (AMX / AVX-512 BF16): --precision"
        " bf16 is emulated and several times slower than fp32 here; use --precision fp32"
    )


#: glibc's mallopt() parameters (malloc.h) and the value both get: blocks up to 1 GiB come
#: from the heap, and up to 1 GiB of freed heap stays mapped for the next batch
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_LIMIT = 1 << 30
#: the environment that opts out (``MMCLI_MALLOC=system``), or sets glibc's own values
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def tune_malloc() -> bool:
    """Keep freed activation buffers for reuse instead of returning them to the kernel.

    glibc serves every block over 128 KB-32 MB with its own ``mmap`` and unmaps it on
    ``free``, so each batch's activations (a ViT-B-32 MLP output at batch 64: 39 MB) are
    fresh pages, zeroed by the kernel one page fault at a time: measured on a 2-vCPU Xeon,
    ViT-B-32 at fp32 made 0.9-1.2 million page faults per 256 images, 1.5-2.6 s of system
    time, and ran 9-17 % slower than with these settings (``benchmarks/bench_malloc.py``).
    This is what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, done with
    glibc's ``mallopt`` (no extra library). The cost: memory freed below the peak stays
    with the process until it exits, which a command that runs one job can afford.

    Called by the command line (:func:`mmcli.cli.app.main`) and its decode workers, not on
    ``import mmcli``: a library must not change its host's allocator. Nothing is changed
    where malloc is not glibc's, where ``MMCLI_MALLOC=system``, or where the user set
    glibc's own variables. Returns whether the setting took effect."""
    if sys.platform != "linux" or os.environ.get("MMCLI_MALLOC", "") == "system":
        return False
    if any(os.environ.get(k) for k in _MALLOC_ENV):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MALLOC_LIMIT) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _MALLOC_LIMIT) == 1 and ok
    log.debug("malloc tuned (mmap and trim thresholds 1 GiB): %s", ok)
    return ok
