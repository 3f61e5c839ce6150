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
