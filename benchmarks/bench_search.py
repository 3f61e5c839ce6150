"""Exact `retrieve` search against faiss.IndexFlatIP, and the faiss backend's recall.

    python benchmarks/bench_search.py [--rows 500000] [--dim 512] [--queries 256] [-k 10]
                                      [--repeats 5] [--no-hnsw] [--no-ivfpq] [--keep DIR]

Generates N random L2-normalised float32 vectors and Q queries (seeded; --clusters C
draws them around C centres, closer to real embeddings than uniform noise, on which
approximate indices have little to exploit) and writes them
as feature shards stored as float32, float16 and bfloat16. Each contender runs in its
own process (so its peak RSS is its own), is built once, searched once to warm up, then
timed over --repeats searches of all Q queries at once (median):

* faiss.IndexFlatIP: vectors added from the float32 file (read, not memory-mapped), twice:
  with ``import faiss`` alone, and with torch imported first (then faiss's matrix products
  go through the BLAS torch loads, several times faster here: faiss at its best);
* mmcli exact search (mmcli.search.exact.ExactIndex, what `retrieve` runs): memory-
  mapped shards of each storage dtype, with the float32 and the bfloat16 scoring pass;
* mmcli --backend faiss (ivf, ivfpq, hnsw): build time, search time, recall@k against
  exact, and the index's own build check (recall@10 on stored rows, bytes per vector).

Hits are checked against an independent reference: float64 scores of the same stored
vectors, full sort (score desc, row asc). Agreement with faiss (float32 arithmetic on
the float32 original) is reported too. Prints a table and the ratios; --json for the
raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARDS = 4


# ------------------------------------------------------------------------- data


def cpu_line() -> str:
    """The CPU the figures were taken on: model, family/model numbers, vector units."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    first = info.split("\n\n")[0]
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in first.splitlines())
    )
    flags = set(fields.get("flags", "").split())
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return (
        f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model "
        f"{fields.get('model', '?')}), {', '.join(units) or 'no avx2'}"
    )


def generate(folder: Path, rows: int, dim: int, queries: int, seed: int, clusters: int = 0) -> None:
    import torch

    from mmcli.formats.tensorfile import Shard, shard_name, write_shard

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    q = torch.randn(queries, dim, generator=g)
    if clusters:  # a mixture: points near one of `clusters` centres, like real embeddings
        centres = torch.randn(clusters, dim, generator=g) * 2.0
        x += centres[torch.randint(clusters, (rows,), generator=g)]
        q += centres[torch.randint(clusters, (queries,), generator=g)]
    x = torch.nn.functional.normalize(x, dim=1)
    q = torch.nn.functional.normalize(q, dim=1)
    np.save(folder / "queries.npy", q.numpy())
    per = -(-rows // SHARDS)
    for dtype in ("float32", "float16", "bfloat16"):
        out = folder / dtype
        out.mkdir(parents=True, exist_ok=True)
        for s in range(SHARDS):
            lo, hi = s * per, min(rows, (s + 1) * per)
            data = x[lo:hi].to(getattr(torch, dtype))
            shard = Shard(
                ids=[str(i) for i in range(lo, hi)],
                tables={"image": data},
                items={"image": torch.arange(hi - lo)},
            )
            spec = {"image": {"encoder": "random", "dim": dim, "normalized": True, "dtype": dtype}}
            write_shard(
                out / shard_name("bench", s, SHARDS),
                shard,
                kind="features",
                specs=spec,
                index=s,
                count=SHARDS,
            )


def reference(folder: Path, dtype: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact hits from float64 scores of the stored vectors, full tie-aware sort."""
    import torch

    from mmcli.formats.features import FeatureSet

    q = torch.from_numpy(np.load(folder / "queries.npy")).double()
    parts = [d for d, _ in FeatureSet.open(folder / dtype).iter_shards("image")]
    n = sum(p.shape[0] for p in parts)
    scores = np.empty((q.shape[0], n), dtype=np.float32)
    at = 0
    for p in parts:
        for lo in range(0, p.shape[0], 32768):
            x = p[lo : lo + 32768].double()
            scores[:, at : at + x.shape[0]] = (q @ x.T).float().numpy()
            at += x.shape[0]
    rows = np.empty((q.shape[0], k), dtype=np.int64)
    vals = np.empty((q.shape[0], k), dtype=np.float32)
    for i, s in enumerate(scores):
        kth = -np.partition(-s, k - 1)[k - 1]
        cand = np.flatnonzero(s >= kth)
        order = cand[np.lexsort((cand, -s[cand].astype(np.float64)))][:k]
        rows[i], vals[i] = order, s[order]
    return rows, vals


# ----------------------------------------------------------------------- children


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited from the
    parent across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_faiss_flat(folder: Path, k: int, repeats: int, torch_first: bool = False) -> dict:
    if torch_first:  # faiss's matrix products then run through the BLAS torch loads (faster)
        import torch

        torch.zeros(4, 4) @ torch.zeros(4, 4)
    import faiss

    from mmcli.formats.tensorfile import TensorSet

    q = np.load(folder / "queries.npy")
    base = peak_rss()
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(q.shape[1])
    for s in TensorSet(folder / "float32").shards:  # plain reads, no memory map
        info = s.tensors["image"]
        with open(s.path, "rb") as f:
            f.seek(s.data_start + info.begin)
            index.add(
                np.frombuffer(f.read(info.end - info.begin), dtype=np.float32).reshape(info.shape)
            )
    build = time.perf_counter() - t0
    index.search(q, k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores, rows = index.search(q, k)
        times.append(time.perf_counter() - t0)
    np.save(folder / f"hits-faiss-flat{'-torch' if torch_first else ''}.npy", rows)
    return {
        "build_s": build,
        "times": times,
        "peak_rss": peak_rss(),
        "base_rss": base,
        "index_bytes": index.ntotal * index.d * 4,
    }


def child_mmcli(folder: Path, dtype: str, scoring: str, k: int, repeats: int) -> dict:
    from mmcli.formats.features import FeatureSet
    from mmcli.search.exact import ExactIndex, resolve_scoring

    q = np.load(folder / "queries.npy")
    import torch

    torch.zeros(1) @ torch.zeros(1)  # runtime initialised before the baseline
    base = peak_rss()
    t0 = time.perf_counter()
    index = ExactIndex.from_features(FeatureSet.open(folder / dtype), "image")
    index.chunk_norms()  # computed once (else on the first search): per-chunk norm bounds
    build = time.perf_counter() - t0
    used = resolve_scoring(scoring)
    res = index.search(q, k, scoring=used)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = index.search(q, k, scoring=used)
        times.append(time.perf_counter() - t0)
    np.save(folder / f"hits-mmcli-{dtype}-{used}.npy", res.indices.numpy())
    return {
        "build_s": build,
        "times": times,
        "peak_rss": peak_rss(),
        "base_rss": base,
        "index_bytes": index.nbytes,
        "scoring": used,
        "candidates_per_query": res.candidates / len(q),
    }


def child_faiss_backend(folder: Path, kind: str, k: int, repeats: int) -> dict:
    from mmcli.formats.features import FeatureSet
    from mmcli.search.faiss_backend import FaissIndex, FaissParams

    q = np.load(folder / "queries.npy")
    base = peak_rss()
    t0 = time.perf_counter()
    index = FaissIndex.open(
        FeatureSet.open(folder / "float32"), "image", FaissParams(kind=kind), rebuild=True
    )
    build = time.perf_counter() - t0
    res = index.search(q, k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = index.search(q, k)
        times.append(time.perf_counter() - t0)
    np.save(folder / f"hits-faiss-{kind}.npy", res.indices.numpy())
    return {
        "build_s": build,
        "times": times,
        "peak_rss": peak_rss(),
        "base_rss": base,
        "factory": index.params.factory(index.exact.size, index.exact.dim),
        "check": index.check,
    }


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def tie_gaps(folder: Path, ours: np.ndarray, theirs: np.ndarray) -> list[float]:
    """For queries whose hit lists differ: the exact score gap between the two rows at the
    first rank where they differ (tiny gaps: a float32 near-tie, not a wrong hit)."""
    import torch

    from mmcli.formats.features import FeatureSet
    from mmcli.search.exact import ExactIndex

    index = ExactIndex.from_features(FeatureSet.open(folder / "float32"), "image")
    q = torch.from_numpy(np.load(folder / "queries.npy")).double()
    gaps = []
    for i in np.flatnonzero((ours != theirs).any(1)):
        r = int(np.flatnonzero(ours[i] != theirs[i])[0])
        a, b = index.rescore(q, np.array([i, i]), np.array([ours[i, r], theirs[i, r]]))
        gaps.append(abs(float(a) - float(b)))
    return gaps


def same_lists(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).all(1).mean())


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a.tolist(), b.tolist())]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--clusters",
        type=int,
        default=0,
        help="draw vectors around this many centres (0: uniform random, the hardest case for ANN)",
    )
    ap.add_argument("--no-hnsw", action="store_true", help="skip the faiss HNSW build (slow)")
    ap.add_argument("--no-ivfpq", action="store_true", help="skip the faiss IVF-PQ build (slow)")
    ap.add_argument(
        "--keep", help="folder for the generated data (default: a temp folder, removed)"
    )
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        what, folder, *rest = args.child
        folder = Path(folder)
        if what in ("faiss-flat", "faiss-flat-torch"):
            out = child_faiss_flat(folder, args.k, args.repeats, what.endswith("torch"))
        elif what == "mmcli":
            out = child_mmcli(folder, rest[0], rest[1], args.k, args.repeats)
        else:
            out = child_faiss_backend(folder, rest[0], args.k, args.repeats)
        print(json.dumps(out))
        return

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if not (folder / "queries.npy").exists():
            generate(folder, args.rows, args.dim, args.queries, args.seed, args.clusters)
        print(
            f"data: {args.rows:,} x {args.dim} normalised ({args.clusters or 'no'} clusters), "
            f"{args.queries} queries, k={args.k} "
            f"({time.perf_counter() - t0:.0f} s to generate); torch threads {os.cpu_count()} cpus",
            file=sys.stderr,
        )
        print(f"cpu: {cpu_line()}", file=sys.stderr)
        common = ["-k", str(args.k), "--repeats", str(args.repeats)]
        results = {
            name: run_child([name, str(folder), *common])
            for name in ("faiss-flat", "faiss-flat-torch")
        }
        for dtype, scoring in (
            ("float32", "fp32"),
            ("float32", "auto"),
            ("float16", "auto"),
            ("bfloat16", "auto"),
            ("float16", "fp32"),
        ):
            r = run_child(["mmcli", str(folder), dtype, scoring, *common])
            results[f"mmcli-{dtype}-{r['scoring']}"] = r
        kinds = ["ivf"] + ([] if args.no_ivfpq else ["ivfpq"]) + ([] if args.no_hnsw else ["hnsw"])
        for kind in kinds:
            results[f"faiss-{kind}"] = run_child(["faiss", str(folder), kind, *common])
        refs = {d: reference(folder, d, args.k)[0] for d in ("float32", "float16", "bfloat16")}
        faiss_hits = np.load(folder / "hits-faiss-flat.npy")
        base = statistics.median(results["faiss-flat"]["times"])
        fast = statistics.median(results["faiss-flat-torch"]["times"])
        best = min(base, fast)  # faiss at its best on this machine, whichever import order
        rows = []
        for name, r in results.items():
            med = statistics.median(r["times"])
            hits = np.load(folder / f"hits-{name}.npy")
            if name.startswith("mmcli"):
                dtype = name.split("-")[1]
                r["identical_to_exact_same_storage"] = same_lists(hits, refs[dtype])
                r["identical_to_exact_float32_original"] = same_lists(hits, refs["float32"])
                r["identical_to_faiss_flat"] = same_lists(hits, faiss_hits)
                r["recall_vs_float32_exact"] = overlap(hits, refs["float32"])
            else:
                r["identical_to_exact_float32_original"] = same_lists(hits, refs["float32"])
                r["recall_vs_float32_exact"] = overlap(hits, refs["float32"])
            r["median_s"] = med
            r["ratio_vs_faiss_flat"] = med / base
            r["ratio_vs_faiss_flat_torch_first"] = med / fast
            r["ratio_vs_faiss_best"] = med / best
            rows.append((name, r))
        for name, r in results.items():
            if name.startswith("mmcli-float32"):
                gaps = tie_gaps(folder, np.load(folder / f"hits-{name}.npy"), faiss_hits)
                r["differs_from_faiss"] = len(gaps)
                r["max_exact_gap_where_differs"] = max(gaps, default=0.0)
        if args.json:
            print(json.dumps(results, indent=2))
        print(
            f"\n{'contender':<26}{'median s':>10}{'ratio':>8}{'fast':>7}{'best':>7}{'build s':>9}{'peak RSS':>10}{'+RSS':>8}{'index':>8}"
            f"{'same as exact':>15}{'same as f32':>13}{'same as faiss':>15}{'recall':>8}"
        )
        for name, r in rows:
            print(
                f"{name:<26}{r['median_s']:>10.3f}{r['ratio_vs_faiss_flat']:>8.3f}"
                f"{r['ratio_vs_faiss_flat_torch_first']:>7.3f}{r['ratio_vs_faiss_best']:>7.3f}"
                f"{r['build_s']:>9.1f}"
                f"{r['peak_rss'] / 2**30:>9.2f}G{(r['peak_rss'] - r['base_rss']) / 2**30:>7.2f}G"
                f"{r.get('index_bytes', 0) / 2**30:>7.2f}G"
                f"{_pct(r.get('identical_to_exact_same_storage')):>15}{_pct(r['identical_to_exact_float32_original']):>13}"
                f"{_pct(r.get('identical_to_faiss_flat')):>15}{r['recall_vs_float32_exact']:>8.4f}"
            )
        for name, r in results.items():
            if "differs_from_faiss" in r:
                print(
                    f"{name}: {r['differs_from_faiss']} of {args.queries} hit lists differ from "
                    f"faiss.IndexFlatIP; largest exact score gap at the first differing rank: "
                    f"{r['max_exact_gap_where_differs']:.2e}"
                )
        for name, r in results.items():
            if r.get("check"):
                print(f"{name} ({r['factory']}): its own build check: {r['check']}")
        print(
            "\nratio: to faiss.IndexFlatIP with faiss imported alone; fast: to the same with torch"
            " imported first (faiss's products then use torch's BLAS, faster on some CPUs);"
            " best: to the faster of the two (faiss at its best on this machine)."
            "\n+RSS: peak RSS growth after start-up (the index and the search); index: stored vectors."
            "\nsame as exact: hit lists identical (ids and order) to a float64 full sort of the same stored "
            "vectors; same as f32: ... of the float32 original; recall: overlap@k with exact float32."
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


if __name__ == "__main__":
    main()
