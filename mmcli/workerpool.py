"""The worker processes of mmcli's decoders (preprocess, encoded shards): an ordered
``imap`` over tasks, each worker on a pipe of its own.

Why not :class:`multiprocessing.Pool`: its workers share one result pipe behind one
lock, and ``Pool.terminate()`` kills workers that may hold it (one blocked writing a
result the parent was not reading); its task thread then waits for that lock forever and
``terminate()`` with it: a Ctrl-C of ``preprocess --workers 2`` hung in 2 of 8 runs that
way. And a worker the kernel kills (out of memory) leaves ``Pool.imap`` waiting forever.
Here nothing is shared between workers: each reads its tasks on its own pipe (a thread
that keeps reading, so neither end can block on a full pipe while the other writes) and
answers on it; a worker that dies is an error that names it; stopping is a kill and a
join, which nothing can hold up.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

from mmcli.errors import RunFailure

#: tasks sent ahead to each worker (one running, one waiting: no idle gap between tasks)
AHEAD = 2


class WorkerDied(RunFailure):
    """A worker process ended while it had work (killed by a signal: out of memory?)."""


def _serve(conn: Any, initializer: Callable[[], None] | None, inherited: list) -> None:
    """A worker: run ``(fn, task)`` jobs from ``conn`` in order, answer ``(ok, value)``.
    ``inherited``: (fork) the parent's ends of the pipes, closed first, or the parent's
    death would never reach the reader as the end of its pipe. Signals are the parent's:
    Ctrl-C reaches the whole process group and the parent stops the pool, and SIGTERM (the
    pool's close) ends the worker even when it forked from a command with a handler."""
    for c in inherited:
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    failed = None  # an initializer that raised: every job is answered with its error
    try:
        if initializer is not None:
            initializer()
    except Exception as e:
        failed = _portable(e)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                inbox.put(conn.recv())
        inbox.put(None)  # the parent closed the pipe (or went away)

    threading.Thread(target=read, daemon=True, name="mmcli-worker-inbox").start()
    while (job := inbox.get()) is not None:
        fn, task = job
        try:
            answer = (True, fn(task)) if failed is None else (False, failed)
            data = ForkingPickler.dumps(answer)  # an answer that cannot pickle is an
        except Exception as e:  # error too; the parent raises it
            data = ForkingPickler.dumps((False, _portable(e)))
        try:
            conn.send_bytes(data)
        except (OSError, ValueError):  # the parent is gone
            return


def _portable(e: Exception) -> Exception:
    """``e`` with the worker's traceback as a note, or a RuntimeError saying what it was
    when ``e`` cannot be pickled and unpickled (an exception whose ``__init__`` wants
    other arguments than its ``args`` pickles, and fails in the parent)."""
    text = "".join(traceback.format_exception(e)).rstrip()
    try:
        e.add_note(f"in a worker process:\n{text}")
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"in a worker process:\n{text}")


class WorkerPool:
    """``workers`` processes of the multiprocessing context ``ctx``, each started by
    ``initializer``; :meth:`imap` runs tasks on them and yields the results in task order.
    Close it (or use it as a context manager) to stop them."""

    def __init__(self, ctx: Any, workers: int, initializer: Callable[[], None] | None = None):
        if workers < 1:
            raise ValueError(f"a WorkerPool needs at least one worker, not {workers}")
        self._procs, self._conns = [], []
        self._busy = False
        fork = ctx.get_start_method() == "fork"
        try:
            for _ in range(workers):
                mine, theirs = ctx.Pipe(duplex=True)
                inherited = [*self._conns, mine] if fork else []
                args = (theirs, initializer, inherited)
                p = ctx.Process(target=_serve, args=args, daemon=True)
                p.start()
                theirs.close()
                self._procs.append(p)
                self._conns.append(mine)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def imap(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """``fn(task)`` for each task, in a worker, yielded in task order. ``fn`` and the
        tasks must pickle (``fn`` a module-level function). An exception in ``fn`` is
        raised here with the worker's traceback as a note, and the pool is closed. At most
        ``AHEAD`` tasks per worker are out or waiting to be yielded. One ``imap`` at a time
        (another one, from this thread or another, raises RuntimeError)."""
        if not self._procs:
            raise ValueError("this WorkerPool is closed")
        if self._busy:
            raise RuntimeError("this WorkerPool is already running an imap")
        self._busy = True
        try:
            yield from self._imap(fn, tasks)
        finally:
            self._busy = False

    def _imap(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        pending = iter(tasks)
        sent: list[deque[int]] = [deque() for _ in self._procs]  # task numbers, per worker
        results: dict[int, Any] = {}
        idle: list[int] = []  # workers not fed: the results waiting to be yielded are many
        count = 0
        done = 0
        limit = AHEAD * len(self._procs)  # tasks out or waiting to be yielded, at most

        def feed(w: int) -> bool:
            nonlocal count
            if count - done >= limit:
                idle.append(w)
                return True
            task = next(pending, _END)
            if task is _END:
                return False
            sent[w].append(count)  # first: a send cut short (Ctrl-C) still closes the pool
            count += 1
            self._send(w, (fn, task))
            return True

        try:
            for _ in range(AHEAD):  # round-robin: tasks 0, 1, ... go to workers 0, 1, ...
                if not all(feed(w) for w in range(len(self._procs))):
                    break
            while done < count:
                while done in results:
                    yield results.pop(done)
                    done += 1
                while idle and count - done < limit and feed(idle.pop(0)):
                    pass
                if done == count:
                    break
                busy = [self._conns[w] for w in range(len(self._procs)) if sent[w]]
                for conn in wait(busy):
                    w = self._conns.index(conn)
                    ok, value = self._receive(w)
                    number = sent[w].popleft()
                    if not ok:
                        raise value
                    results[number] = value
                    feed(w)
        except GeneratorExit:  # the caller stopped early: answers still to come would
            if any(sent):  # answer the next imap
                self.close()
            raise
        except BaseException:  # an error in a task, a dead worker, a signal
            self.close()
            raise

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        return list(self.imap(fn, tasks))

    def _send(self, w: int, job: tuple) -> None:
        try:
            self._conns[w].send(job)
        except (OSError, ValueError):
            raise self._died(w) from None

    def _receive(self, w: int) -> tuple[bool, Any]:
        try:
            return self._conns[w].recv()
        except (EOFError, OSError):
            raise self._died(w) from None

    def _died(self, w: int) -> WorkerDied:
        p = self._procs[w]
        p.join(timeout=5)
        code = p.exitcode
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited ({code})"
        hint = "if it ran out of memory, use fewer --workers or smaller inputs"
        return WorkerDied(f"a worker process (pid {p.pid}) {how} mid-task", hint=hint)

    def close(self) -> None:
        """Stop the workers now (whatever they are doing) and wait for them to end."""
        for conn in self._conns:
            conn.close()
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
        for p in self._procs:
            p.join(timeout=5)
            if p.exitcode is None:  # (a worker that ignores SIGTERM)
                p.kill()
                p.join()
        self._procs, self._conns = [], []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()
