"""extract's memory stays flat however large the input: peak RSS against input size.

    python benchmarks/bench_extract_memory.py [--shards 2,8,32] [--rows 2000] [--size 64]

Writes shard sets of random uint8 images (``--rows`` rows of 3 x size x size per shard;
2,000 x 64 px = 24.6 MB a shard) with mmcli's own writer, then runs ``mmcli extract SET
-o OUT -e image=convnet`` on each in a fresh process under ``/usr/bin/time`` and prints
the input size, the peak resident memory and the wall time. Shards are memory-mapped and
read batch by batch, and one output shard is held at a time: the peak should not grow
with the number of shards.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcli.data.image import ImageTransform  # noqa: E402
from mmcli.formats.tensorfile import Shard, shard_name, write_shard  # noqa: E402


def make_set(folder: Path, shards: int, rows: int, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    block = rng.integers(0, 256, (rows, 3, size, size), dtype=np.uint8)
    for s in range(shards):
        shard = Shard(
            ids=[f"{s}-{i}" for i in range(rows)],
            tables={"image": np.roll(block, s, axis=0)},
            items={"image": np.arange(rows, dtype=np.int64)},
        )
        write_shard(folder / shard_name("tensors", s, shards), shard, kind="tensors",
                    specs={"image": ImageTransform(size).spec()}, index=s, count=shards)  # fmt: skip
    return sum(p.stat().st_size for p in folder.iterdir())


def peak_rss(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``python -m mmcli ARGS`` in a fresh process."""
    t = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "mmcli", *args],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return int(r.stderr.strip().splitlines()[-1]) / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", default="2,8,32")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-extract-memory-"))
    try:
        print(f"mmcli extract -e image=convnet, {args.rows} rows of 3x{args.size}x{args.size} "
              "uint8 per shard")  # fmt: skip
        print(f"{'shards':>7}{'rows':>9}{'input MB':>10}{'peak RSS MB':>13}{'seconds':>9}")
        for n in (int(x) for x in args.shards.split(",")):
            src = work / f"in{n}"
            nbytes = make_set(src, n, args.rows, args.size)
            rss, wall = peak_rss(
                ["extract", str(src), "-o", str(work / f"out{n}"), "-e", "image=convnet", "-q"]
            )
            print(f"{n:>7}{n * args.rows:>9,}{nbytes / 1e6:>10.0f}{rss:>13.0f}{wall:>9.1f}")
            shutil.rmtree(src)
            shutil.rmtree(work / f"out{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
