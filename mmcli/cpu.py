"""What this CPU's bfloat16 hardware is, read once per process from ``/proc/cpuinfo``:
AMX tiles (where bf16 autocast makes training faster) and bf16 units in general (where a
bfloat16 model makes inference faster). Re-exported by :mod:`mmcli.runtime`."""

from __future__ import annotations

import functools
import logging

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
