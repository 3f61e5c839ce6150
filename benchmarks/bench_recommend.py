"""Recommendation on the toy data: content embeddings vs popularity vs random.

    python benchmarks/bench_recommend.py [--items 600] [--users 300] [--epochs 15] [--work DIR]

Builds a small toy dataset with viewing histories (``examples/toydata.py --items N
--histories U``: users who like one colour or one shape, 10% of the items never watched),
preprocesses it, and gets item embeddings two ways:

* ``convnet (random init)``: ``mmcli extract -e image=convnet``, an untrained backbone;
* ``attribute one-hot (ideal)``: each item's colours, shapes (weight 1), sizes and
  positions (weight 0.5) one-hot, summed over its objects, unit length: what a perfect
  content embedding of this data knows (no training), to tell the recommender's own
  limit from the model's;
* ``fuse-train joint space``: a quick image-text ``fuse-train`` (32 px images, the
  quickstart's encoders, batch 32) and ``mmcli extract --model``: the image embeddings of
  the joint space.

Then ``mmcli eval --task recommend`` (leave-last-out) for each, and prints recall@10,
NDCG@10, coverage@10 and the share of the top 10 given to items that no seen history
holds, for the model, the popularity and random baselines of the same run, random's
exact expectation and two oracles (toyhistories.py): one that knows each user's
preference and the items' popularity, and one that knows the preference only (the
ceiling of a recommender from content alone).
Every step runs the real command in a subprocess; its wall time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "convnet:grid=4,width=16"  # 32 px images: the stem stride follows the size
TEXT = "transformer:width=128,depth=2"


def run(*args: str, stdout=subprocess.DEVNULL) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=stdout)
    return time.perf_counter() - start


def mmcli(*args) -> float:
    return run("-m", "mmcli", *map(str, args), "-q")


def evaluate(features: Path, histories: Path, out: Path, *extra: str) -> dict:
    mmcli("eval", features, "--task", "recommend", "--histories", histories, "--k", "1,5,10",
          "-o", out, "--overwrite", *extra)  # fmt: skip
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the files here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-recommend-"))
    data, tensors, h = work / "data", work / "tensors", work / "data" / "histories.jsonl"
    times = {}
    times["toydata"] = run(str(ROOT / "examples" / "toydata.py"), str(data), "--items",
                           str(args.items), "--seed", str(args.seed), "--no-audio",
                           "--histories", str(args.users), "--quiet")  # fmt: skip
    sys.path.insert(0, str(ROOT / "examples"))
    from toyhistories import ATTRIBUTES, make_histories, oracle_recall, read_manifest

    rows = read_manifest(data / "manifest.jsonl")
    again = make_histories(rows, ATTRIBUTES, users=args.users, seed=args.seed)  # deterministic
    assert again.users == [json.loads(line) for line in h.open()], "histories differ"
    oracle = (oracle_recall(again, rows, ATTRIBUTES, k=10),
              oracle_recall(again, rows, ATTRIBUTES, k=10, popularity=False))  # fmt: skip
    times["preprocess"] = mmcli("preprocess", data / "manifest.jsonl", "-o", tensors,
                                "--image-size", 32, "--workers", 2, "--overwrite")  # fmt: skip
    times["extract convnet"] = mmcli("extract", tensors, "-o", work / "convnet", "-e",
                                     "image=convnet", "--overwrite")  # fmt: skip
    times["fuse-train"] = mmcli("fuse-train", tensors, "-o", work / "run", "--pairs", "image-text",
                                "--encoder", f"image={IMAGE}", "--encoder", f"text={TEXT}",
                                "--epochs", args.epochs, "--batch-size", 32, "--lr", "2e-3",
                                "--seed", args.seed, "--overwrite")  # fmt: skip
    times["extract --model"] = mmcli("extract", tensors, "-o", work / "joint", "--model",
                                     work / "run" / "model.safetensors", "--overwrite")  # fmt: skip
    attribute_features(rows, work / "ideal")
    results = {
        "convnet (random init)": evaluate(work / "convnet", h, work / "convnet.json"),
        "attribute one-hot (ideal)": evaluate(work / "ideal", h, work / "ideal.json"),
        "ideal, --aggregate max": evaluate(
            work / "ideal", h, work / "ideal-max.json", "--aggregate", "max"
        ),  # fmt: skip
        "fuse-train joint space": evaluate(work / "joint", h, work / "joint.json"),
        "joint, --aggregate max": evaluate(
            work / "joint", h, work / "max.json", "--aggregate", "max"
        ),  # fmt: skip
        "joint, --diversity 0.3": evaluate(
            work / "joint", h, work / "mmr.json", "--diversity", "0.3"
        ),  # fmt: skip
    }
    _report(results, oracle, times, work, args)


def attribute_features(rows: list[dict], out: Path) -> None:
    """The ideal content embedding (see the module docstring) as an mmcli feature file."""
    import numpy as np
    import torch

    from mmcli.formats.tensorfile import Shard, write_shard

    keys = {"color": 1.0, "shape": 1.0, "size": 0.5, "position": 0.5}
    vocab = {k: sorted({o[k] for r in rows for o in r["objects"]}) for k in keys}
    offsets = np.cumsum([0] + [len(v) for v in vocab.values()])
    x = np.zeros((len(rows), offsets[-1]), dtype=np.float32)
    for i, r in enumerate(rows):
        for o in r["objects"]:
            for (k, w), off in zip(keys.items(), offsets):
                x[i, off + vocab[k].index(o[k])] += w
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out.mkdir(parents=True, exist_ok=True)
    shard = Shard(ids=[r["id"] for r in rows], tables={"image": torch.from_numpy(x)},
                  items={"image": torch.arange(len(rows))})  # fmt: skip
    spec = {"encoder": "attributes", "dim": int(x.shape[1]), "normalized": True, "dtype": "float32"}
    write_shard(out / "features-00000-of-00001.safetensors", shard, kind="features",
                specs={"image": spec})  # fmt: skip


def _report(results: dict, oracle: tuple, times: dict, work: Path, args) -> None:
    first = next(iter(results.values()))
    info = first["info"]
    print(f"toy data: {args.items} items ({info['candidates']} candidates), {info['users']} users "
          f"({info['users_evaluated']} evaluated), leave-last-out; files in {work}")  # fmt: skip
    print(f"{'method':<28} {'recall@10':>9} {'ndcg@10':>8} {'coverage@10':>11} {'cold@10':>8}")
    rows = [(name, r["metrics"], "") for name, r in results.items()]
    rows += [
        ("popularity", first["metrics"], "popularity_"),
        ("random (seeded)", first["metrics"], "random_"),
    ]
    for name, m, p in rows:
        print(f"{name:<28} {m[p + 'recall@10']:>9.3f} {m[p + 'ndcg@10']:>8.3f} "
              f"{m[p + 'coverage@10']:>11.3f} {m[p + 'cold_share@10']:>8.3f}")  # fmt: skip
    m = first["metrics"]
    print(f"{'random (expected)':<28} {m['random_expected_recall@10']:>9.3f} "
          f"{m['random_expected_ndcg@10']:>8.3f}")  # fmt: skip
    print(f"{'oracle (preference + popularity)':<28} {oracle[0]:>9.3f}")
    print(f"{'oracle (preference only)':<28} {oracle[1]:>9.3f}   (the ceiling from content alone)")
    pop = m["popularity_recall@10"]
    for name, r in results.items():
        ratio = r["metrics"]["recall@10"] / pop if pop else float("inf")
        print(f"  {name}: recall@10 {ratio:.2f}x popularity's")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
