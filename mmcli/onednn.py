"""float32 linear layers through oneDNN on the CPU, where oneDNN is faster than the BLAS
torch calls for them.

torch multiplies float32 matrices on x86 with MKL's sgemm. It sends only bf16 and fp16
products, and reduced-precision fp32 ones when asked, to oneDNN. On AMD CPUs MKL's sgemm
runs far below the core's AVX-512 peak. On a 2-core AMD EPYC (family 26) it ran the
shapes of ViT-B-32 at 175-230 GFLOP/s, where oneDNN's fp32 inner product ran them at
310-530 GFLOP/s, with the same float32 arithmetic (oneDNN's default "strict" math mode:
no bf16 or tf32 inside). Measure it with ``python benchmarks/bench_cpu_linear.py``.

:func:`linear` is a context for inference. Inside it, ``F.linear`` runs through oneDNN
for float32 CPU tensors that need no gradient: that covers every ``nn.Linear`` and the
projections of ``nn.MultiheadAttention`` (open_clip's towers, Hugging Face and timm
models, mmcli's own). It uses ``torch.ops.mkldnn._linear_pointwise``, the op that torch's
inductor emits for CPU linear layers, on the weights as they are (no packed copy). A
``torch.overrides.TorchFunctionMode`` routes the calls; its cost is a few microseconds per
torch call, paid only inside the context.

When to use it is measured once per process (:func:`choice`): one 128x1024x1024 product
each way, and oneDNN must be at least 1.25x faster and agree to float32 rounding. The
``MMCLI_CPU_LINEAR`` environment variable (``onednn``, ``blas``, ``auto``) overrides the
measurement. Anything else runs as torch would: gradients (but not forward-mode AD: a
dual tensor's tangent is lost here, so use it outside this context), autocast, other dtypes, devices and layouts, a
bias oneDNN cannot read (broadcast, strided), and the attention calls it does not cover
(need_weights, bias_k, unbatched or empty inputs, shapes torch would refuse).

Any TorchFunctionMode turns off torch's native "fast path" of ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer``, so inside the context those run torch's general path,
whose results are the same (measured equal with the fast path disabled), except where the
fast path differs from it by design: nested-tensor inputs (not accepted), padded positions
of ``nn.TransformerEncoder(enable_nested_tensor=True)`` (0 on the fast path, computed
values here; mmcli's encoders set it False), ``is_causal=True`` without a mask (an error
here, as on torch's general path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

log = logging.getLogger("mmcli")

ENV = "MMCLI_CPU_LINEAR"
_CHOICE: list[bool] = []  # [use oneDNN], measured once per process


def linear(device: Any = "cpu") -> contextlib.AbstractContextManager:
    """A context in which float32 CPU linear layers that need no gradient run through
    oneDNN, where :func:`choice` says it is faster; a null context otherwise (and on any
    device other than the CPU)."""
    if str(getattr(device, "type", device)).split(":")[0] != "cpu" or not choice():
        return contextlib.nullcontext()
    return _mode_class()()  # a TorchFunctionMode: a context of its own


def choice() -> bool:
    """Whether this process runs float32 CPU linear layers through oneDNN: ``MMCLI_CPU_LINEAR``
    when set, else measured once (see the module docstring)."""
    if not _CHOICE:
        _CHOICE.append(_decide())
    return _CHOICE[0]


def _decide() -> bool:
    wanted = os.environ.get(ENV, "auto").strip().lower()
    if wanted == "blas":
        return False
    if wanted not in ("onednn", "auto"):
        log.warning("%s=%s: expected onednn, blas or auto; measuring (auto)", ENV, wanted)
        wanted = "auto"
    import torch

    try:  # (measured in float32 whatever context the first call comes from)
        with torch.autocast("cpu", enabled=False), torch.inference_mode():
            return _measure(timed=wanted == "auto")
    except Exception as e:  # no oneDNN in this build of torch, or the op changed
        log.debug("oneDNN linear unavailable: %s", e)
        return False


def _measure(m: int = 128, k: int = 1024, n: int = 1024, repeats: int = 5, timed=True) -> bool:
    """True when oneDNN's product agrees with torch's and (``timed``) is >= 1.25x faster
    (medians)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen)
    ref = torch.nn.functional.linear(x, w, b)
    got = _dnn(x, w, b)
    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-3):
        log.debug("oneDNN linear disagrees with torch's: not used")
        return False
    if not timed:
        return True
    times: dict[str, list[float]] = {"blas": [], "onednn": []}
    for _ in range(repeats):  # interleaved: the host's noise falls on both
        for name, f in (("blas", torch.nn.functional.linear), ("onednn", _dnn)):
            t = time.perf_counter()
            f(x, w, b)
            times[name].append(time.perf_counter() - t)
    blas, dnn = (sorted(times[s])[repeats // 2] for s in ("blas", "onednn"))
    log.debug("fp32 linear %dx%dx%d: torch %.2f ms, oneDNN %.2f ms", m, k, n, blas * 1e3, dnn * 1e3)
    return dnn * 1.25 <= blas


def _dnn(x, w, b):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _takes(x, w, b) -> bool:
    """Whether oneDNN runs this product: float32 CPU tensors, no gradient wanted, no autocast."""
    import torch

    tensors = (x, w) if b is None else (x, w, b)
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided
           or t.is_nested for t in tensors):  # fmt: skip
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if w.dim() != 2 or not w.is_contiguous() or x.dim() < 1 or x.numel() == 0:
        return False
    # oneDNN reads a bias as N packed floats: anything else (broadcast, strided) is torch's
    return b is None or (b.dim() == 1 and b.shape[0] == w.shape[0] and b.is_contiguous())


def _linear(input, weight, bias=None):  # F.linear's names: callers may pass them by keyword
    import torch

    if _takes(input, weight, bias):
        return _dnn(input if input.is_contiguous() else input.contiguous(), weight, bias)
    return torch.nn.functional.linear(input, weight, bias)


def product(a, b):
    """``a @ b.T`` of float32 CPU matrices, through oneDNN where :func:`choice` says it is
    faster (exact search's float32 pass), else torch's."""
    if choice():
        return _linear(a, b)
    return a @ b.T


def _mask(mask, dtype):
    """A boolean mask (True: masked out) as the additive float mask torch's attention uses."""
    import torch

    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _attention(query, key, value, embed_dim, heads, in_w, in_b, bias_k, bias_v, zero_attn,
               dropout_p, out_w, out_b, training=True, key_padding_mask=None, need_weights=True,
               attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
               k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
               average_attn_weights=True, is_causal=False):  # fmt: skip
    """``F.multi_head_attention_forward``'s path without attention weights, its projections
    through :func:`_linear`; None for what it does not cover (the caller then runs torch's)."""
    import torch
    import torch.nn.functional as F

    if (need_weights or bias_k is not None or bias_v is not None or zero_attn
            or static_k is not None or static_v is not None or (training and dropout_p > 0)
            or (is_causal and (attn_mask is None or key_padding_mask is not None))
            or query.dtype != torch.float32 or query.device.type != "cpu"
            or not _well_formed(query, key, value, embed_dim, heads, key_padding_mask, attn_mask)):  # fmt: skip
        return None  # torch's own path (which also raises torch's own errors)
    tgt, bsz, e = query.shape
    src, hd = key.shape[0], e // heads
    if use_separate_proj_weight:
        bq, bk, bv = (None,) * 3 if in_b is None else in_b.chunk(3)
        q, k, v = (_linear(t, pw, pb) for t, pw, pb in
                   ((query, q_proj_weight, bq), (key, k_proj_weight, bk), (value, v_proj_weight, bv)))  # fmt: skip
    elif query is key and key is value:
        q, k, v = _linear(query, in_w, in_b).unflatten(-1, (3, e)).unbind(-2)
    else:
        wq, wkv = in_w.split([e, 2 * e])
        bq, bkv = (None, None) if in_b is None else in_b.split([e, 2 * e])
        q = _linear(query, wq, bq)
        k, v = _linear(key, wkv, bkv).unflatten(-1, (2, e)).unbind(-2) if key is value else (
            _linear(key, *_part(wkv, bkv, 0, e)), _linear(value, *_part(wkv, bkv, 1, e)))  # fmt: skip
    mask = None if is_causal else _mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(bsz, heads, tgt, src)
    pad = _mask(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(bsz, 1, 1, src)
        mask = pad if mask is None else mask + pad
    q, k, v = (t.reshape(t.shape[0], bsz * heads, hd).transpose(0, 1).view(bsz, heads, -1, hd)
               for t in (q, k, v))  # fmt: skip
    out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal and mask is None)
    out = out.permute(2, 0, 1, 3).reshape(tgt * bsz, e)
    return _linear(out, out_w, out_b).view(tgt, bsz, -1), None


def _well_formed(query, key, value, embed_dim, heads, key_padding_mask, attn_mask) -> bool:
    """Batched, non-empty, and every shape as torch's attention checks it."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or not isinstance(embed_dim, int):
        return False
    tgt, bsz, e = query.shape
    src = key.shape[0]
    if e != embed_dim or e % heads or key.shape[:2] != value.shape[:2] or key.shape[1] != bsz:
        return False
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src):
        return False
    return attn_mask is None or tuple(attn_mask.shape) in ((tgt, src), (bsz * heads, tgt, src))


def _part(w, b, i: int, e: int):
    return w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e]


_MODE: list[type] = []  # the TorchFunctionMode class, made on first use


def _mode_class() -> type:
    """The TorchFunctionMode that routes the calls, made on first use (importing this
    module does not import torch)."""
    if _MODE:
        return _MODE[0]
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    linears = {F.linear, torch._C._nn.linear}
    attention = F.multi_head_attention_forward

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in linears:
                return _linear(*args, **kwargs)
            if func is attention:
                out = _attention(*args, **kwargs)
                if out is not None:
                    return out
            return func(*args, **kwargs)

    _MODE.append(Mode)
    return Mode
