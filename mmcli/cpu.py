"""What this CPU's bfloat16 hardware is, read once per process from ``/proc/cpuinfo``:
AMX tiles (where bf16 autocast makes training faster) and bf16 units in general (where a
bfloat16 model makes inference faster). Re-exported by :mod:`mmcli.runtime`."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("mmcli")


def _cpu_flags() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


@functools.cache
def cpu_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (read once per process), where bf16 autocast
    makes CPU training faster than fp32."""
    flags = _cpu_flags()
    return flags is not None and " amx_bf16" in flags  # elsewhere: no check, training fp32


@functools.cache
def cpu_bf16_units() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX or AVX-512 BF16), read once per
    process. Without them torch emulates bf16 and a bfloat16 model is several times slower
    than fp32 (measured on an AVX2-only EPYC: ViT-B-32 1.1 vs 6.9 img/s)."""
    flags = _cpu_flags()
    if flags is not None:
        return " amx_bf16" in flags or " avx512_bf16" in flags
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
