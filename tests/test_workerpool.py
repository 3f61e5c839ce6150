"""mmcli.workerpool: ordered results, errors and dead workers told, stopping never hangs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from mmcli.workerpool import WorkerDied, WorkerPool


def _square(x: int) -> int:
    time.sleep(0.001 * (x % 5))  # out of step, so that answers arrive out of order
    return x * x


def _big(n: int) -> bytes:
    return bytes(n)  # far more than a pipe holds


def _fail_on_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x


def _die_on_3(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _pid(_: object) -> int:
    return os.getpid()


@pytest.fixture(params=["fork", "forkserver"])
def ctx(request):
    return mp.get_context(request.param)


def test_results_come_in_task_order_from_every_worker(ctx):
    with WorkerPool(ctx, 3) as pool:
        assert list(pool.imap(_square, range(50))) == [x * x for x in range(50)]
        assert set(pool.map(_pid, range(12))) == set(pool.pids)  # all three did work
        assert pool.map(_square, []) == []


def test_large_tasks_and_answers_both_ways_do_not_block(ctx):
    sizes = [3_000_000, 10, 2_000_000, 5, 4_000_000, 1]
    with WorkerPool(ctx, 2) as pool:
        assert [len(b) for b in pool.imap(_big, sizes)] == sizes


def test_an_error_in_a_task_is_raised_with_the_workers_traceback(ctx):
    pool = WorkerPool(ctx, 2)
    with pytest.raises(ValueError, match="seven") as info:
        pool.map(_fail_on_7, range(20))
    assert any("in a worker process" in n and "_fail_on_7" in n for n in info.value.__notes__)
    with pytest.raises(ValueError, match="closed"):  # answers in flight were dropped with it
        pool.map(_square, range(3))


def test_a_killed_worker_is_an_error_not_a_hang(ctx):
    died = r"was killed by signal 9 mid-task.*--workers"
    with WorkerPool(ctx, 2) as pool, pytest.raises(WorkerDied, match=died):
        pool.map(_die_on_3, range(10))


def test_closing_while_workers_are_blocked_writing_never_hangs():
    """multiprocessing.Pool.terminate() hung when it killed a worker holding the shared
    result lock (blocked writing to a full pipe); here each worker has its own pipe."""
    ctx = mp.get_context("fork")
    for _ in range(5):
        pool = WorkerPool(ctx, 2)
        pids = pool.pids
        results = pool.imap(_big, [1_000_000] * 8)
        next(results)  # the others are now blocked writing answers nobody reads
        time.sleep(0.2)
        closer = threading.Thread(target=results.close)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive()
        assert all(not os.path.exists(f"/proc/{pid}/status") or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except OSError:
        return True


class _NeedsTwo(Exception):
    def __init__(self, a, b):  # pickles (args = ("a b",)), cannot be rebuilt from it
        super().__init__(f"{a} {b}")


def _raise_needs_two(_: object) -> None:
    raise _NeedsTwo("left", "right")


def _unpicklable(_: object):
    return lambda: None


def _failing_init() -> None:
    raise OSError("no decoder here")


def _slow_first(x: int) -> int:
    if x == 0:
        time.sleep(1.0)
    return x


def test_what_cannot_cross_the_pipe_is_an_error_not_a_dead_worker(ctx):
    with WorkerPool(ctx, 2) as pool, pytest.raises(RuntimeError, match="_NeedsTwo: left right"):
        pool.map(_raise_needs_two, range(3))
    with WorkerPool(ctx, 2) as pool, pytest.raises(Exception, match="lambda") as info:
        pool.map(_unpicklable, range(3))
    assert not isinstance(info.value, WorkerDied)
    with WorkerPool(ctx, 2, _failing_init) as pool, pytest.raises(OSError, match="no decoder"):
        pool.map(_square, range(3))


def test_one_slow_task_does_not_let_answers_pile_up(ctx):
    """Answers wait for the slow task 0 in order; the tasks taken from the iterable stay
    within AHEAD per worker meanwhile, not the whole input."""
    taken = []

    def tasks():
        for x in range(200):
            taken.append(x)
            yield x

    with WorkerPool(ctx, 2) as pool:
        results = pool.imap(_slow_first, tasks())
        assert next(results) == 0
        assert len(taken) <= 2 * 2 + 1  # AHEAD x workers out, and the one pulled to see the end
        assert list(results) == list(range(1, 200))


def test_a_second_imap_while_one_runs_is_refused(ctx):
    with WorkerPool(ctx, 2) as pool:
        first = pool.imap(_square, range(10))
        assert next(first) == 0
        with pytest.raises(RuntimeError, match="already running"):
            pool.map(_square, range(3))
        assert list(first) == [x * x for x in range(1, 10)]
        assert pool.map(_square, range(3)) == [0, 1, 4]  # free again once it ended


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_end_when_their_parent_is_killed(tmp_path, method):
    """A forked worker inherits the parent's ends of the pipes: closed in the worker, the
    parent's death ends the worker's pipe, and the worker exits."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, os, signal, sys, time\n"
        "from mmcli.workerpool import WorkerPool\n"
        "if __name__ == '__main__':\n"
        f"    pool = WorkerPool(mp.get_context({method!r}), 2)\n"
        "    print(*pool.pids, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_take_signals_as_the_pool_sets_them():
    """A forked worker inherits the parent's handlers: a SIGTERM handler that raises (the
    command line's) would turn close()'s SIGTERM into a traceback in the worker; the pool
    restores the default, so close() ends each worker by the signal itself."""

    def raising(signum, frame):
        raise RuntimeError("the command line's handler")

    before = signal.signal(signal.SIGTERM, raising)
    try:
        pool = WorkerPool(mp.get_context("fork"), 2)
        assert pool.map(_square, range(4)) == [0, 1, 4, 9]
        procs = list(pool._procs)
        for p in procs:  # what close() sends (close() itself first closes the pipes, and
            p.terminate()  # a worker may see their end and exit 0 before the signal lands)
        for p in procs:
            p.join(timeout=10)
        pool.close()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [p.exitcode for p in procs] == [-signal.SIGTERM] * 2
