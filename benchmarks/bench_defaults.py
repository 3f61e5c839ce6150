"""fuse-train's default encoders on a CPU: what a run with no ``--encoder`` flag learns.

    python benchmarks/bench_defaults.py [--items 1500] [--sizes 64,224] [--epochs N]

Generates the toy data (``examples/toydata.py``, images only), preprocesses it at each
image size, and trains image-text models on its train split with fuse-train's own
defaults for everything but the encoders (10 epochs, batch 128, lr 1e-3, seed 0):

* ``default``: ``fuse-train`` with no ``--encoder`` flag (:data:`mmcli.modalities.TRAIN_ENCODERS`);
* ``registry``: the registry's full-size ``convnet`` and ``transformer`` (the defaults
  before they were chosen by this benchmark);

then embeds the held-out test split with each model (``extract --model``) and prints, per
run: parameters, training samples/s, wall time, and text->image / image->text recall@1 on
the test split (chance: 1 / test items). Runs one after another in one process tree, so
compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ["--encoder", "image=convnet", "--encoder", "text=transformer"]


def mmcli(*args: str, stdout=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmcli", *args], check=True, stdout=stdout, text=True
    )


def tensors(work: Path, items: int, size: int) -> Path:
    data = work / "data"
    if not (data / "manifest.jsonl").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "toydata.py"), str(data), "--items",
             str(items), "--no-audio", "--image-size", "256x256", "--quiet"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    out = work / f"tensors{size}"
    if (out / "preprocess.json").exists():
        return out
    mmcli("preprocess", str(data / "manifest.jsonl"), "-o", str(out), "--image-size", str(size),
          "--workers", "2", "-q")  # fmt: skip
    return out


def train_and_score(shards: Path, run: Path, flags: list[str]) -> dict:
    t0 = time.perf_counter()
    done = mmcli(
        "fuse-train", str(shards), "-o", str(run), "--pairs", "image-text", *flags,
        "--overwrite", "-q", stdout=subprocess.PIPE,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    summary = json.loads(done.stdout)
    model = run / "model.safetensors"
    mmcli(
        "extract", str(shards), "-o", str(run / "joint"), "--model", str(model), "--overwrite", "-q"
    )
    res = mmcli(
        "eval", str(run / "joint"), "--task", "retrieval", "--query", "text", "--target",
        "image", "--split", "test", "-q", "-o", "-", stdout=subprocess.PIPE,
    )  # fmt: skip
    metrics = json.loads(res.stdout)["metrics"]
    recall = {
        "text->image": metrics["image_retrieval_recall@1"],
        "image->text": metrics["text_retrieval_recall@1"],
    }
    info = json.loads(mmcli("info", str(model), "--json", stdout=subprocess.PIPE).stdout)
    return {
        "parameters": info.get("parameters"),
        "samples_per_s": (summary.get("throughput") or summary).get("samples_per_s"),
        "wall_s": round(wall, 1),
        **recall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=None, help="default: fuse-train's (10)")
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp dir)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    rows = []
    for size in map(int, args.sizes.split(",")):
        shards = tensors(work, args.items, size)
        lines = (shards / "manifest.jsonl").read_text().splitlines()
        test = sum(json.loads(line).get("split") == "test" for line in lines)
        for name, flags in (("default", []), ("registry", REGISTRY)):
            more = ["--epochs", str(args.epochs)] if args.epochs else []
            r = train_and_score(shards, work / f"run-{size}-{name}", flags + more)
            rows.append({"size": size, "encoders": name, "chance": round(1 / test, 4), **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    epochs = args.epochs or "10 (default)"
    print(f"\n{args.items} toy items, {epochs} epochs, fuse-train's defaults (work dir {work})")
    print(f"{'px':>4} {'encoders':<9} {'params':>10} {'samples/s':>10} {'wall s':>7} "
          f"{'t->i R@1':>9} {'i->t R@1':>9} {'chance':>7}")  # fmt: skip
    for r in rows:
        print(
            f"{r['size']:>4} {r['encoders']:<9} {r['parameters'] or 0:>10,} "
            f"{r['samples_per_s'] or 0:>10} {r['wall_s']:>7} {r['text->image']:>9.3f} "
            f"{r['image->text']:>9.3f} {r['chance']:>7}"
        )


if __name__ == "__main__":
    main()
