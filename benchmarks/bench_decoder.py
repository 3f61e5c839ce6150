"""Decoding encoded-image shards in worker processes: how the pixels come back, and how
often the pool starts (mmcli.data.decodepool.Decoder, what extract and training use).

    python benchmarks/bench_decoder.py [--images 512] [--shards 8] [--batch-size 64]
        [--workers 2] [--repeats 5]

``--images`` photo-like 512x384 JPEGs (benchmarks/bench_jpeg_to_features.py's) are kept
as they are by ``preprocess --store encoded`` (224 px) in ``--shards`` shards; then, side
by side in this process (median of ``--repeats`` passes over all rows, in batches):

* ``shared``: ``Decoder(spec, workers).decode``: the workers write into one shared-memory
  buffer, only the small task and ``None`` cross the pool's pipe (what mmcli does);
* ``pipe``: the same pool, ``pool.map(decode_batch, parts)``: the pixels pickled back
  through the pool's pipe (what mmcli did before);
* ``in_thread``: ``Decoder(spec, 0)``: no workers;
* ``pool_per_shard``: a new Decoder (pool start-up included) per shard, as extract's
  loader did before: the cost of restarting the pool, once per pass.

Prints one JSON object (rows/s of each, ratios, the CPU) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batches_of(ts, batch: int):
    """[(shard index, [blobs])] over every shard, in order."""
    out = []
    for i, sf in enumerate(ts.shards):
        data, offsets = sf.encoded("image")
        offsets = offsets.tolist()
        for a in range(0, len(offsets) - 1, batch):
            b = min(a + batch, len(offsets) - 1)
            out.append((i, [data[offsets[r] : offsets[r + 1]].tobytes() for r in range(a, b)]))
    return out


def main() -> None:
    import numpy as np
    import torch  # loaded, as in extract and training: the workers come from a forkserver
    from bench_jpeg_to_features import write_photos
    from bench_search import cpu_line

    from mmcli.data.decodepool import Decoder
    from mmcli.data.encoded import decode_batch
    from mmcli.formats.tensorfile import TensorSet
    from mmcli.preprocess import PreprocessConfig, preprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    try:
        log(f"writing {args.images} JPEGs and preprocessing them (--store encoded) ...")
        write_photos(tmp / "photos", args.images)
        config = PreprocessConfig(
            image_size=224, store="encoded", shard_size=-(-args.images // args.shards)
        )
        preprocess(str(tmp / "manifest.jsonl"), str(tmp / "t"), config=config)
        ts = TensorSet(tmp / "t")
        spec = ts.spec("image")
        work = batches_of(ts, args.batch_size)
        decoder = Decoder(spec, args.workers)
        decoder.decode(work[0][1])  # the pool is up, its workers warm
        pool, t = decoder._pool, decoder.transform

        def shared():
            return [decoder.decode(blobs) for _, blobs in work]

        def pipe():
            out = []
            for _, blobs in work:
                bounds = np.linspace(0, len(blobs), args.workers + 1).astype(int).tolist()
                parts = [(blobs[a:b], t, None) for a, b in zip(bounds[:-1], bounds[1:])]
                out.append(np.concatenate(pool.map(decode_batch, parts)))
            return out

        alone = Decoder(spec, 0)

        def in_thread():
            return [alone.decode(blobs) for _, blobs in work]

        def pool_per_shard():
            out, current, shard = [], None, -1
            for i, blobs in work:
                if i != shard:
                    if current is not None:
                        current.close()
                    current, shard = Decoder(spec, args.workers), i
                out.append(current.decode(blobs))
            current.close()
            return out

        ways = {"shared": shared, "pipe": pipe, "in_thread": in_thread,
                "pool_per_shard": pool_per_shard}  # fmt: skip
        reference = in_thread()
        seconds: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(args.repeats):
            for name in ways if r % 2 == 0 else list(ways)[::-1]:
                start = time.perf_counter()
                got = ways[name]()
                seconds[name].append(time.perf_counter() - start)
                assert all(np.array_equal(a, b) for a, b in zip(got, reference)), name
                log(f"  {name}: {seconds[name][-1]:.2f} s")
        decoder.close()
        rate = {k: args.images / statistics.median(v) for k, v in seconds.items()}
        print(json.dumps({
            "cpu": cpu_line(),
            "cpus": os.cpu_count(),
            "images": args.images, "shards": len(ts.shards), "batch_size": args.batch_size,
            "workers": args.workers, "image": "512x384 JPEG -> 224 px",
            "rows_per_s": {k: round(v, 1) for k, v in rate.items()},
            "shared_vs_pipe": round(rate["shared"] / rate["pipe"], 2),
            "shared_vs_in_thread": round(rate["shared"] / rate["in_thread"], 2),
            "one_pool_vs_pool_per_shard": round(rate["shared"] / rate["pool_per_shard"], 2),
            "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
            "torch": torch.__version__,
        }, indent=2))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
