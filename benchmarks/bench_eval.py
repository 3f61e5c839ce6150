"""`eval` retrieval at COCO scale against one bare matrix product + topk of the same size.

    python benchmarks/bench_eval.py [--images 5000] [--captions 5] [--dim 512] [--repeats 3]

Generates a COCO-sized test set (5,000 images, 5 captions each: 25,000 captions, D=512)
where each caption is its image plus noise (--noise: the default gives recalls like a
CLIP model on COCO, text->image R@1 around 0.4), stored as float16 features (what
`mmcli extract` writes). In separate processes, each timed --repeats times (median):

* bare: the two tables as float32 in memory, ``(text @ image.T).topk(10)`` on the full
  25,000 x 5,000 score matrix: the least any evaluation must do;
* mmcli: ``evaluate_retrieval`` (what ``mmcli eval`` runs): reads the tables, computes
  exact tie-aware ranks in both directions in blocks and every metric;

and the peak RSS of each process; plus one `mmcli eval` command-line run end to end.
The text->image recall@k of both are compared.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(path: Path, images: int, captions: int, dim: int, noise: float, seed: int) -> None:
    import torch

    from mmcli.formats.tensorfile import Shard, write_shard

    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(images, dim, generator=g), dim=1)
    items = torch.arange(images).repeat_interleave(captions)
    txt = img[items] + noise * torch.randn(len(items), dim, generator=g) / dim**0.5
    txt = torch.nn.functional.normalize(txt, dim=1)
    spec = {"encoder": "synthetic", "dim": dim, "normalized": True, "dtype": "float16"}
    shard = Shard(
        ids=[f"{i:06d}" for i in range(images)],
        tables={"image": img.half(), "text": txt.half()},
        items={"image": torch.arange(images), "text": items},
    )
    write_shard(path, shard, kind="features", specs={"image": spec, "text": spec})


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


def child(kind: str, path: Path, repeats: int) -> dict:
    import torch

    from mmcli.evaluate.retrieval import evaluate_retrieval
    from mmcli.formats.features import FeatureSet

    times, out = [], {}
    if kind == "bare":
        fs = FeatureSet.open(path)
        txt, ti = fs.table("text")
        img, _ = fs.table("image")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            top = (txt @ img.T).topk(10, dim=1).indices
            times.append(time.perf_counter() - t0)
        hit = top == ti[:, None]
        out["recall"] = {f"recall@{k}": float(hit[:, :k].any(1).float().mean()) for k in (1, 5, 10)}
    else:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            metrics, _ = evaluate_retrieval(FeatureSet.open(path), "text", "image")
            times.append(time.perf_counter() - t0)
        out["recall"] = {
            k.split("_", 2)[2]: v
            for k, v in metrics.items()
            if k.startswith("image_retrieval_recall")
        }
        out["metrics"] = metrics
    out.update(times=times[1:], peak_rss=peak_rss(), threads=torch.get_num_threads())
    return out


def run_child(kind: str, path: Path, repeats: int) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=7.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--keep", help="folder for the generated data (default: a temp folder, removed)"
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.repeats)))
        return

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "coco-synthetic.safetensors"
    try:
        if not path.exists():
            generate(path, args.images, args.captions, args.dim, args.noise, args.seed)
        n_txt = args.images * args.captions
        print(
            f"data: {args.images:,} images x {n_txt:,} captions, D={args.dim}, float16 features",
            file=sys.stderr,
        )
        bare = run_child("bare", path, args.repeats)
        mm = run_child("mmcli", path, args.repeats)
        t0 = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "mmcli", "eval", str(path), "-q"], capture_output=True, text=True
        )
        cli_s = time.perf_counter() - t0
        if cli.returncode != 0:
            raise SystemExit(cli.stderr)
        tb, tm = statistics.median(bare["times"]), statistics.median(mm["times"])
        print(f"\n{'':<34}{'median s':>10}{'peak RSS':>12}")
        print(f"{'bare matmul + topk(10)':<34}{tb:>10.3f}{bare['peak_rss'] / 2**30:>11.2f}G")
        print(f"{'mmcli evaluate_retrieval':<34}{tm:>10.3f}{mm['peak_rss'] / 2**30:>11.2f}G")
        print(f"{'mmcli eval (CLI, end to end)':<34}{cli_s:>10.3f}{'':>12}")
        print(
            f"\nratio mmcli / bare: {tm / tb:.2f}  (goal <= 1.5); peak memory {mm['peak_rss'] / 2**30:.2f} GB (goal <= 1.5 GB)"
        )
        print(f"text->image recall, bare topk: {bare['recall']}")
        print(f"text->image recall, mmcli:     {mm['recall']}")
        m = mm["metrics"]
        print(
            "mmcli metrics: "
            + ", ".join(
                f"{k}={v:.4f}"
                for k, v in m.items()
                if k.endswith(("@1", "@5", "map@r", "median_rank"))
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
