"""The worker processes that decode encoded image rows (:mod:`mmcli.data.encoded`) for
``extract`` and training: :class:`Decoder`, and :class:`EncodedRows` (a table's rows
across shards, fetched by row index).

Rows are split over the workers in order (deterministic). The workers write the pixels
into one shared-memory buffer (``multiprocessing.shared_memory``, as torch's DataLoader
hands tensors over) and return nothing: pickled through the pool's pipe, 10 MB of pixels
(64 rows of 224 px) took 2.4-5.7 s on a 2-vCPU VM (the pipe's 64 KB ping-pong, each
wake-up slow), against 0.01-0.08 s through the buffer. The pool starts once per
Decoder (ahead of time with :meth:`Decoder.start`), its forkserver preloading the
transform's modules (:func:`mmcli.runtime.worker_context`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from mmcli.cpu import tune_malloc
from mmcli.data.encoded import decode_batch, transform_of
from mmcli.runtime import worker_context
from mmcli.workerpool import WorkerPool

_ATTACHED: dict[str, Any] = {}  # in a worker: the Decoder's output buffer, by name


def decode_into(task: tuple) -> None:
    """Worker: decode (blobs, transform, seeds or None) into rows ``start:`` of the shared
    buffer ``name`` holding uint8 ``shape``; only this small task and ``None`` cross the
    pipe, not the pixels."""
    blobs, t, seeds, name, shape, start = task
    if name not in _ATTACHED:
        for old in _ATTACHED.values():  # the Decoder grew its buffer: let the old one go
            old.close()
        _ATTACHED.clear()
        _ATTACHED[name] = shared_memory.SharedMemory(name)
    out = np.ndarray(shape, np.uint8, buffer=_ATTACHED[name].buf)
    out[start : start + len(blobs)] = decode_batch((blobs, t, seeds))


class Decoder:
    """Decodes rows of an encoded table, in ``workers`` processes (0: in this thread),
    the rows split in order (deterministic). The processes start with the first batch, or
    with :meth:`start` (ahead of time: e.g. while the model is built), and serve every
    shard until ``close()`` (see the module docstring)."""

    def __init__(self, spec: dict[str, Any], workers: int = 0):
        self.transform = transform_of(spec)
        self.workers = workers
        self._pool = None
        self._starting = None  # the thread starting the pool (start())
        self._shm = None

    def start(self) -> Decoder:
        """Start the worker processes now, in a background thread where they start slowly
        (a forkserver that first imports what the transform needs: torch and torchvision
        for a library's transform), so that the caller goes on meanwhile."""
        import threading

        if self.workers > 0 and self._pool is None and self._starting is None:
            ctx = self._context()
            if ctx.get_start_method() == "fork":  # fast; and no fork beside a busy thread
                self._pool = self._new_pool(ctx)
            else:
                self._starting = threading.Thread(
                    target=self._start_in_background, args=(ctx,), daemon=True,
                    name="mmcli-decoder-start",
                )  # fmt: skip
                self._starting.start()
        return self

    def _new_pool(self, ctx):
        # the workers share this process's tracker of the shared buffer (one of their own
        # would unlink it, as leaked, when a worker exits)
        resource_tracker.ensure_running()
        # a forkserver's worker does not inherit the command's allocator setting
        return WorkerPool(ctx, self.workers, initializer=tune_malloc)

    def _start_in_background(self, ctx) -> None:
        with contextlib.suppress(Exception):  # (if it fails, _pool_or_none retries and raises)
            self._pool = self._new_pool(ctx)

    def _pool_or_none(self):
        self.start()
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._pool is None and self.workers > 0:  # the background start failed: say why
            self._pool = self._new_pool(self._context())
        return self._pool

    def _context(self):
        return worker_context([__name__, *self.transform.modules])

    def _buffer(self, nbytes: int):
        """The shared output buffer, at least ``nbytes`` (grown by replacing it)."""
        if self._shm is None or self._shm.size < nbytes:
            self._free_buffer()
            self._shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        return self._shm

    def decode(self, blobs: Sequence[bytes], seeds: Sequence[int] | None = None) -> np.ndarray:
        """uint8 [len(blobs), 3, S, S]; ``seeds`` (one per row): augmented rows."""
        t = self.transform
        pool = self._pool_or_none() if len(blobs) > 1 else None
        if pool is None:
            return decode_batch((list(blobs), t, seeds))
        shape = (len(blobs), 3, t.size, t.size)
        shm = self._buffer(math.prod(shape))
        n = min(self.workers, len(blobs))
        bounds = np.linspace(0, len(blobs), n + 1).astype(int).tolist()
        parts = [
            (list(blobs[a:b]), t, None if seeds is None else list(seeds[a:b]), shm.name, shape, a)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        pool.map(decode_into, parts)
        return np.ndarray(shape, np.uint8, buffer=shm.buf).copy()  # the buffer is reused

    def _free_buffer(self) -> None:
        if self._shm is not None:
            shm, self._shm = self._shm, None
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()

    def close(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._free_buffer()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class EncodedRows:
    """The rows of an encoded table across a set of shards (memory-mapped), fetched by
    global row index and decoded by a :class:`Decoder`."""

    def __init__(self, ts: Any, name: str):
        parts = [s.encoded(name) for s in ts.shards]
        self.data = [p[0] for p in parts]
        self.offsets = [np.asarray(p[1]) for p in parts]
        sizes = [len(o) - 1 for o in self.offsets]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.decoder = Decoder(ts.spec(name))
        size = self.decoder.transform.size
        self.row_shape = (3, size, size)

    def workers(self, n: int) -> None:
        self.decoder.close()
        self.decoder.workers = n

    def blobs(self, rows: np.ndarray) -> list[bytes]:
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = []
        for s, r in zip(shard.tolist(), rows.tolist()):
            local = r - int(self.starts[s])
            a, b = int(self.offsets[s][local]), int(self.offsets[s][local + 1])
            out.append(self.data[s][a:b].tobytes())
        return out

    def fetch(self, rows: np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        if not len(rows):
            return np.zeros((0, *self.row_shape), dtype=np.uint8)
        return self.decoder.decode(self.blobs(rows), seeds)
