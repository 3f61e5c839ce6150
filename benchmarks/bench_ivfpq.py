"""IVF-PQ recall and time by ``--nprobe`` and ``--rescore``, over one saved index.

    python benchmarks/bench_ivfpq.py                      # 1,000,000 x 512, 1,000 clusters
    python benchmarks/bench_ivfpq.py --rows 100000 --folder /tmp/ivfpq100k

The data is ``bench_search.py``'s (normalised vectors around ``--clusters`` centres, 256
queries), kept in ``--folder`` with the index beside it, so a second run only searches.
Each setting: one warm-up, median of 3 searches of the 256 queries (k = 10), recall@10
against an exact float64 sort. torch is imported before faiss (faiss's best configuration
on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (before faiss: its products then use torch's faster BLAS)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as bs  # noqa: E402

from mmcli.formats.features import FeatureSet  # noqa: E402
from mmcli.search.faiss_backend import FaissIndex, FaissParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--folder", default="/tmp/bench-ivfpq")
    ap.add_argument("--nprobe", default="64,128,256")
    ap.add_argument("--rescore", default="10,40,100")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "queries.npy").exists():
        bs.generate(folder, args.rows, args.dim, 256, 0, args.clusters)
    truth = bs.reference(folder, "float32", 10)[0]
    q = np.load(folder / "queries.npy")
    t0 = time.perf_counter()
    index = FaissIndex.open(FeatureSet.open(folder / "float32"), "image", FaissParams(kind="ivfpq"))
    print(
        f"{index.params.factory(index.exact.size, index.exact.dim)}: "
        f"{'built' if index.built else 'loaded'} in {time.perf_counter() - t0:.1f} s; "
        f"its build check {index.check}"
    )
    print(f"{'nprobe':>7}{'rescore':>9}{'median s':>10}{'recall@10':>11}")
    for nprobe in (int(v) for v in args.nprobe.split(",")):
        for rescore in (int(v) for v in args.rescore.split(",")):
            index.params.nprobe, index.params.candidates = nprobe, rescore
            index._configure()
            index.search(q, 10)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                res = index.search(q, 10)
                times.append(time.perf_counter() - t0)
            recall = bs.overlap(res.indices.numpy(), truth)
            print(f"{nprobe:>7}{rescore:>9}{statistics.median(times):>10.3f}{recall:>11.4f}")


if __name__ == "__main__":
    main()
