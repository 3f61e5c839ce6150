"""The cost of durable atomic writes: fsync of the file before the rename and of its
folder after it (mmcli.formats.atomic), against the same atomic writes without fsync.

    python benchmarks/bench_fsync.py [--dir /path/on/the/disk/to/measure] [--repeats 5]

Two workloads, each timed ``--repeats`` times (median printed, min and max beside it):

* one 25 MB write (the size of a training state: state.safetensors of a small run);
* 1,000 small writes of 4 KB each (many shards' sidecar files, eval results).

Run it on the file system you care about (``--dir``): fsync costs next to nothing on
tmpfs, a little on an SSD, much more on a network or spinning disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcli.formats.atomic import atomic_write_bytes  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", type=int, default=1000, help="number of small files")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=args.dir))
    big = os.urandom(25 * 2**20)
    small = os.urandom(4096)
    try:
        fs = os.statvfs(work)
        print(f"writing in {work} (block size {fs.f_bsize}), median of {args.repeats}")
        print(f"{'workload':<28} {'no fsync':>22} {'fsync':>22} {'cost':>8}")
        for name, write in (
            (
                "one 25 MB file",
                lambda fsync: atomic_write_bytes(work / "state.bin", big, fsync=fsync),
            ),
            (
                f"{args.small:,} files of 4 KB",
                lambda fsync: [
                    atomic_write_bytes(work / f"f{i}.json", small, fsync=fsync)
                    for i in range(args.small)
                ],
            ),
        ):
            medians, shown = [], []
            for fsync in (False, True):
                times = _time(lambda w=write, f=fsync: w(f), args.repeats)
                medians.append(statistics.median(times))
                shown.append(
                    f"{medians[-1] * 1e3:8.1f} ms ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})"
                )
            cost = medians[1] / medians[0] if medians[0] > 0 else float("nan")
            print(f"{name:<28} {shown[0]:>22} {shown[1]:>22} {cost:7.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
