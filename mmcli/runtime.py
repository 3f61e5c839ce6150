"""Where the work runs: device choice, autocast, seeding and torchrun/DDP helpers.

Shared by ``extract``, ``fuse-train`` and ``distill``. Imports torch lazily so that the CLI
stays fast; every function here takes plain strings and returns torch objects.

    device = resolve_device("auto")                 # cuda:LOCAL_RANK when available, else cpu
    with autocast(device, "bf16", training=True):   # CUDA; the CPU only for training
        y = model(x)
    model = cast_for_inference(model, inference_precision("bf16", device), device)  # CPU: bf16 weights
    dist = dist_info()                              # rank / world size from torchrun's env
    with distributed(device) as dist:               # init gloo (cpu) / nccl (cuda) when world > 1
        for i in dist.my_shards(n_shards): ...
    feed = Prefetch(lambda: (load(i) for i in range(n)), depth=3)   # a background producer
    for item in feed: ...                           # feed.wait_seconds: time the consumer waited
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mmcli.cpu import _warn_emulated_bf16, cpu_amx, cpu_bf16_units
from mmcli.errors import BadInput

log = logging.getLogger("mmcli")

PRECISIONS = ("fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- devices


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: str = "auto", *, local_rank: int | None = None):
    """``auto|cpu|cuda|cuda:N`` -> torch.device. Raises BadInput when CUDA is asked for but absent.

    Under torchrun ``auto`` and ``cuda`` pick ``cuda:LOCAL_RANK``.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if local_rank is None:
        local_rank = dist_info().local_rank
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInput(
                f"--device {spec}: no CUDA GPU is available",
                hint="use --device cpu (or auto), or install a CUDA build of torch",
            )
        count = torch.cuda.device_count()
        if spec == "cuda":
            index = local_rank % count
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise BadInput(
                    f"bad device {spec!r}", hint="use auto, cpu, cuda or cuda:N"
                ) from None
            if not 0 <= index < count:
                raise BadInput(
                    f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
                )
        return torch.device("cuda", index)
    raise BadInput(f"bad device {spec!r}", hint="use auto, cpu, cuda or cuda:N")


def check_precision(precision: str, device, training: bool = True) -> str:
    """The precision that will really be used on ``device``: bf16 / fp16 autocast on CUDA;
    for training on the CPU, bf16 autocast (fp32 master weights) only where the CPU has AMX
    tiles (fuse_train measured 1.37-1.48x fp32 there, 0.12-0.14x on a CPU with AVX-512 BF16
    but no AMX: benchmarks/bench_train_bf16.py); fp32 otherwise, with a note saying why."""
    if precision not in PRECISIONS:
        raise BadInput(f"bad precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        bf16_training = training and precision == "bf16"
        if bf16_training and cpu_amx():
            log.info("bf16 autocast on the cpu (AMX), fp32 master weights")
            return "bf16"
        log.info(
            "note: --precision %s applies on CUDA%s; running fp32 on %s%s",
            precision,
            " and AMX CPUs" if bf16_training else "",
            device.type,
            " (bf16 autocast measured slower than fp32 on CPUs without AMX)"
            if bf16_training
            else "",
        )
        return "fp32"
    if precision == "bf16":  # (on CUDA: the CPU's cases returned above)
        import torch

        if not torch.cuda.is_bf16_supported():
            raise BadInput("this GPU does not support bf16", hint="use --precision fp16")
    return precision


def inference_precision(precision: str, device) -> str:
    """The precision inference runs at on ``device``: bf16 and fp16 on CUDA (autocast), bf16
    on the CPU too (the model cast to bfloat16: measured faster than CPU autocast where the
    CPU has bf16 units; without them it runs as asked, with a warning that it is slower),
    fp16 on the CPU falls back to fp32 with a note."""
    if precision == "bf16" and getattr(device, "type", device) == "cpu":
        if not cpu_bf16_units():
            _warn_emulated_bf16()
        return "bf16"
    return check_precision(precision, device, training=False)


def cpu_cast(precision: str, device) -> bool:
    """True when inference at ``precision`` casts the model itself (bf16 on the CPU)."""
    return precision == "bf16" and getattr(device, "type", device) == "cpu"


def is_cast(model, precision: str) -> bool:
    """True when ``model``'s floating-point weights are already in ``precision``'s dtype."""
    import torch

    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return all(p.dtype == want for p in model.parameters() if p.is_floating_point())


def cast_for_inference(model, precision: str, device):
    """``model`` cast to bfloat16 for bf16 inference on the CPU (weights and activations
    bf16, not autocast); unchanged otherwise. Buffers a module lists in ``fp32_buffers``
    (image mean/std, the log-mel filterbank) stay float32: inputs are normalised in fp32,
    then cast once."""
    if not cpu_cast(precision, device):
        return model
    import torch

    keep = [
        (module, name, getattr(module, name))
        for module in model.modules()
        for name in getattr(module, "fp32_buffers", ())
        if getattr(module, name, None) is not None
    ]
    model.to(torch.bfloat16)
    for module, name, buffer in keep:
        setattr(module, name, buffer)  # the float32 originals
    return model


def autocast(device, precision: str, training: bool = False):
    """The numeric context of a forward pass at ``precision`` on ``device``: autocast for
    bf16 / fp16 on CUDA, and for bf16 on the CPU in ``training`` only
    (:func:`check_precision` allows it where the CPU has AMX; CPU inference casts the model
    to bfloat16 instead, :func:`cast_for_inference`). fp32 inference on the CPU runs its
    linear layers through oneDNN where that is measured faster (:func:`mmcli.onednn.linear`).
    A null context otherwise."""
    import torch

    if precision == "fp32":
        from mmcli import onednn

        return contextlib.nullcontext() if training else onednn.linear(device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    if training and precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def my_shards(self, count: int) -> list[int]:
        """The shard indices this rank owns: rank, rank + world, rank + 2 * world, ..."""
        return list(range(self.rank, count, self.world_size))


def dist_info() -> DistInfo:
    """Rank and world size from the environment torchrun sets (1 process when absent)."""
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise BadInput("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None


@contextlib.contextmanager
def distributed(device) -> Iterator[DistInfo]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) for the duration.

    A no-op for a single process. Leaves an already initialised group (e.g. a caller
    that set one up itself) alone.
    """
    info = dist_info()
    if not info.enabled:
        yield info
        return
    import torch.distributed as dist

    owned = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owned = True
    finished = False
    try:
        yield info
        finished = True
    finally:
        if owned:
            # on success every rank tears the group down together: a rank that destroyed
            # its gloo group while another still worked was seen to abort ("terminate
            # called without an active exception", SIGABRT) in CI; on an error at once
            if finished:
                with contextlib.suppress(Exception):
                    dist.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    backend = dist.get_backend()
    dev = device if (device is not None and backend == "nccl") else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def describe_device(device) -> dict[str, Any]:
    """A small JSON-able description (for summaries and benchmark output)."""
    import torch

    out: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
    else:
        out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------ worker processes


def worker_context(preload: Iterable[str] = ()):
    """The multiprocessing context of mmcli's decode workers (preprocess, encoded shards).

    ``fork`` (fastest) while torch is not loaded; once it is, forking a process that runs
    torch's thread pools can deadlock, so ``forkserver``: its server imports ``preload``
    (and ``__main__``) once and forks every worker from there, already loaded. (Without
    it each worker imports what it needs by itself: torch and torchvision for a library's
    transform took 4.7 s per worker on a 2-core EPYC, paid by every pool.) The preload
    takes effect when the server starts, i.e. with the first forkserver pool of the process.
    """
    import multiprocessing as mp
    import sys

    if sys.platform == "win32":
        return mp.get_context("spawn")
    if "torch" not in sys.modules:
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *dict.fromkeys(preload)])
    return ctx


# --------------------------------------------------------------------------- prefetch

T = TypeVar("T")
_DONE = object()


class _Stopped(Exception):
    """The consumer closed the queue: the producer thread ends quietly."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch(Generic[T]):
    """Runs ``produce()`` (an iterable, usually a generator) in a background thread, at most
    ``depth`` items ahead of the consumer, so reading, copying and collating overlap the
    compute. An exception in the producer is raised in the consumer; :meth:`close` (or
    leaving the loop early and closing) stops the producer. ``wait_seconds`` is how long
    the consumer waited for items: the share of time a job was starved of data.

    Used by ``extract`` (batches from memory-mapped shards) and the training loop
    (batches from the sampler).
    """

    def __init__(
        self, produce: Callable[[], Iterable[T]], *, depth: int = 3, name: str = "mmcli-prefetch"
    ):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self) -> None:
        try:
            for item in self._produce():
                self._put(item)
            self._put(_DONE)
        except _Stopped:
            return
        except BaseException as e:  # hand any failure to the consumer
            try:
                self._put(_Failure(e))
            except _Stopped:
                return

    def __iter__(self) -> Iterator[T]:
        while True:
            t = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - t
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
