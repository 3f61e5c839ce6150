"""The scoring passes of exact search and their proven error bounds.

A *scoring pass* scores a batch of queries against a chunk of index rows fast (a float32
or bfloat16 matrix product); each pass score ``s~`` comes with a bound ``|s - s~| <= e``
on its distance to the exact score ``s`` (float64 dot product rounded to float32).

**Error bounds** (u = 2^-24, the float32 unit roundoff; gamma_D = D u / (1 - D u)):

* float32 pass: ``|s - fl(q.x)| <= gamma_D |q| |x|`` (any summation order, FMA or not).
* bfloat16 pass, ``q^ = bf16(q)``, ``x^ = bf16(x)`` (``x^ = x`` for bfloat16 storage),
  products accumulated in float32 and the result rounded to bfloat16 (relative error
  2^-8):  ``|s - s~| <= |q - q^| |x| + |q^| |x - x^| + gamma_D |q^| |x^| + 2^-8 |s~| / (1 - 2^-8)``,
  with ``|x - x^| <= 2^-8 |x|``. ``|x|`` is bounded per chunk by the largest row norm.

Both bounds are widened by a small relative margin (for the float32 arithmetic of the
bounds themselves and the final rounding to float32). The bfloat16 kernel's float32
accumulation is checked once per process by a probe; where it fails, the float32 pass is
used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcli import onednn
from mmcli.errors import BadInput
from mmcli.runtime import cpu_bf16_units

log = logging.getLogger("mmcli")

U32 = 2.0**-24
U_BF16 = 2.0**-8
MARGIN = 1.001  # widening of the bounds for the float32 arithmetic that computes them
REL_SLACK = 2.0**-21  # room for the final float32 rounding of exact scores (ties)
ABS_SLACK = 1e-30  # subnormals flushed to zero by bf16 kernels
PIECE = 1024  # rows of the float32 scratch that 16-bit rows are rounded to bfloat16 through


def gamma(d: int) -> float:
    return d * U32 / (1.0 - d * U32)


# ------------------------------------------------------------------- the passes


_BF16_OK: dict[str, bool] = {}


def fast_bf16_available(device: Any = "cpu") -> bool:
    """Whether a bfloat16 pass is worth it here: CPUs with AMX or AVX-512 BF16, and the
    kernel accumulates in float32 (checked by a probe once per process)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return False
    key = "cpu"
    if key not in _BF16_OK:
        _BF16_OK[key] = cpu_bf16_units() and _bf16_probe()
    return _BF16_OK[key]


def _bf16_probe() -> bool:
    """Check that bf16 matrix products accumulate in float32: 1 + 511 * 2^-9 is 1.998 in
    float32 accumulation but stays 1.0 if each partial sum were rounded to bfloat16."""
    d = 512
    x = torch.full((64, d), 2.0**-9)
    x[:, 0] = 1.0
    q = torch.ones(8, d)
    out = (q.bfloat16() @ x.bfloat16().T).float()
    exact = 1.0 + (d - 1) * 2.0**-9
    ok = bool(((out - exact).abs() <= exact * (U_BF16 + gamma(d)) * 1.01).all())
    if not ok:
        log.warning("bfloat16 matrix products do not accumulate in float32 here; using float32")
    return ok


def resolve_scoring(scoring: str, device: Any = "cpu") -> str:
    if scoring not in ("auto", "fp32", "bf16"):
        raise BadInput(f"unknown scoring pass {scoring!r}", hint="use auto, fp32 or bf16")
    if scoring == "auto":
        return "bf16" if fast_bf16_available(device) else "fp32"
    return scoring


@dataclass
class ScoringPass:
    """A batch of queries ready for one kind of pass (``fp32`` or ``bf16``), with the
    norms its error bound needs. ``rel``: the bound's part relative to ``|s~|``."""

    mode: str
    q: Any  # the pass's queries on the device: float32 or bfloat16 [B, D]
    qn: Any  # |q| float64 [B]
    dq: Any  # bf16: |q - q^| float64 [B]
    qhn: Any  # bf16: |q^| float64 [B]
    rel: float
    gamma: float
    device: Any
    buf: Any = None  # CPU float32 rows, reused by :meth:`_float32` and :meth:`_bfloat16`
    bbuf: Any = None  # CPU bfloat16 rows, reused by :meth:`_bfloat16`

    @classmethod
    def prepare(cls, q, q64, mode: str, dim: int, device) -> ScoringPass:
        """``q``: float32 [B, D] queries on the CPU, ``q64`` the same in float64."""
        qn = torch.linalg.vector_norm(q64, dim=1)  # (B,)
        dq = qhn = None
        if mode == "bf16":
            qp = q.to(torch.bfloat16)
            dq = torch.linalg.vector_norm(q64 - qp.double(), dim=1)
            qhn = torch.linalg.vector_norm(qp.double(), dim=1)
            rel = U_BF16 / (1 - U_BF16) * MARGIN + REL_SLACK
        else:
            qp = q
            rel = REL_SLACK
        return cls(mode, qp.to(device), qn, dq, qhn, rel, gamma(dim), device)

    def scores(self, x, xn: float) -> tuple[Any, np.ndarray]:
        """(pass scores [B, n], their absolute error bound per query float64 [B]) of the
        index rows ``x`` [n, D] (stored dtype) whose row norms are at most ``xn``."""
        if self.mode == "bf16":
            if x.dtype == torch.bfloat16:
                xb = x.to(self.device)
            elif self.device.type == "cpu":
                xb = self._bfloat16(x)
            else:  # rows cross to the device at their size, rounded there
                xb = x.to(self.device).to(torch.bfloat16)
            dx = 0.0 if x.dtype == torch.bfloat16 else U_BF16 * xn
            xhn = xn * (1 + U_BF16)
            s = self.q @ xb.T  # (B, n) bfloat16
            a = (self.dq * xn + self.qhn * dx + self.gamma * self.qhn * xhn) * MARGIN + ABS_SLACK
        else:
            if self.device.type == "cpu":
                # rows x queries then a transposed view: the same products, 1.2-1.4x
                # faster through the CPU BLAS than queries x rows (benchmarks/bench_search.py);
                # through oneDNN where it is faster than the BLAS (mmcli.onednn). Any
                # summation order stays inside gamma's bound.
                s = onednn.product(self._float32(x), self.q).T  # (B, n) float32
            else:  # 16-bit rows cross to the device at their size, widened there
                s = self.q @ x.to(self.device).float().T  # (B, n) float32
            a = self.gamma * self.qn * xn * MARGIN + ABS_SLACK
        return s, a.numpy()

    def _bfloat16(self, x):
        """Rows rounded to bfloat16 in one buffer reused chunk after chunk, through a
        float32 scratch of PIECE rows that stays in cache: float16 -> float32 is exact, so
        the one rounding is ``x.to(torch.bfloat16)``'s (equal, tested), at a quarter of its
        time here (no fresh tensor per chunk, and torch's direct float16 -> bfloat16 copy
        is not vectorised)."""
        n, d = x.shape
        out = self._reused("bbuf", n, d, torch.bfloat16)
        if x.dtype == torch.float32:
            return out.copy_(x)
        scratch = self._reused("buf", PIECE, d, torch.float32)
        for start in range(0, n, PIECE):
            stop = min(start + PIECE, n)
            out[start:stop].copy_(scratch[: stop - start].copy_(x[start:stop]))
        return out

    def _float32(self, x):
        """16-bit rows widened into one buffer reused chunk after chunk: a fresh
        float32 tensor per chunk costs several times the copy (page faults)."""
        if x.dtype == torch.float32:
            return x
        return self._reused("buf", *x.shape, torch.float32).copy_(x)

    def _reused(self, attr: str, rows: int, dim: int, dtype):
        """The first ``rows`` rows of the CPU buffer ``self.<attr>``, grown when too small
        (a pass is of one mode: its buffers keep one use)."""
        buf = getattr(self, attr)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim:
            buf = torch.empty((rows, dim), dtype=dtype)
            setattr(self, attr, buf)
        return buf[:rows]


# ------------------------------------------------------------------- the bounds


def lower_bound(s: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    """Lower bound of the exact score of pass scores ``s`` (error a + rel |s|)."""
    a = a if np.ndim(a) == 0 or np.ndim(s) == 1 else a[:, None]
    return s - a - rel * np.abs(s)


def upper_bound(s: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    a = a if np.ndim(a) == 0 or np.ndim(s) == 1 else a[:, None]
    return s + a + rel * np.abs(s)


def score_floor(tau: np.ndarray, a: np.ndarray, rel: float) -> np.ndarray:
    """The smallest pass score whose upper bound reaches ``tau`` (per query), rounded
    down a little so that float rounding can only add candidates, never lose one."""
    y = tau - a  # s + rel |s| >= y
    s = np.where(y >= 0, y / (1 + rel), y / (1 - rel))
    return s - np.abs(s) * 1e-6 - 1e-30
