"""The gradient cache: ``--batch-size 64 --accum-steps 8`` against ``--batch-size 512``.

    python benchmarks/bench_gradcache.py [--items 1100] [--steps 5] [--device cpu|cuda]

One contrastive image-text model (the quickstart's: ``convnet:stem_stride=2,grid=4,
width=16`` + ``transformer:width=128,depth=2``, 64 px) trained for a few steps on the toy
data, each configuration in its own process:

* ``512``: one batch of 512 per step;
* ``64x8``: 8 micro-batches of 64 per step through the gradient cache;
* ``64x8+ckpt``: the same with ``--grad-checkpointing``.

Printed side by side: the peak memory of training (CPU: the growth of the process's peak
resident set, ``ru_maxrss``, over its value before the first step; CUDA:
``torch.cuda.max_memory_allocated``), the median step time, and the loss of every step.
Each item keeps one caption, so that a step of 8×64 sees exactly the rows of a step of
512 (the sampler draws captions per batch). The convnet has batch norm: the micro-batches
are normalised with their own statistics (64 rows) where the big batch uses 512, so the
curves agree closely but not to the last digit; ``--image tiny`` (no batch norm) shows
them equal to float error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "convnet:stem_stride=2,grid=4,width=16"
TEXT = "transformer:width=128,depth=2"
CONFIGS = {"512": (512, 1, False), "64x8": (64, 8, False), "64x8+ckpt": (64, 8, True)}


def child(args) -> None:
    """One training run; prints {peak_mb, step_s, losses} as JSON."""
    import resource

    import torch

    from mmcli.train.fuse import FuseConfig, fuse_train
    from mmcli.train.loop import LoopConfig

    batch, accum, ckpt = CONFIGS[args.config]
    torch.set_num_threads(args.threads)
    cfg = FuseConfig(
        pairs=[("image", "text")],
        encoders={"image": args.image, "text": TEXT},
        embed_dim=256,
        val_split="none",
    )
    loop = LoopConfig(
        epochs=1,
        max_steps=args.steps,
        lr=2e-3,
        warmup=0,
        accum_steps=accum,
        grad_checkpointing=ckpt,
        log_every=1,
        seed=0,
    )
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = Path(args.out) / args.config
    summary = fuse_train(
        [args.tensors], str(run), cfg, loop, batch_size=batch, device=args.device, overwrite=True
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    # per-step time from the logged throughput (every step is logged); the first step
    # (warm-up of the allocator and kernels) is left out of the median
    times = [batch * accum / x["samples_per_s"] for x in steps]
    out = {
        "peak_mb": (torch.cuda.max_memory_allocated() if cuda else (peak - base) * 1024) / 2**20,
        "step_s": statistics.median(times[1:] or times),
        "losses": [x["loss"] for x in steps],
        "seconds": summary["seconds"],
    }
    print(json.dumps(out))


def prepare(folder: Path, items: int) -> Path:
    """Toy data with one caption per item, preprocessed at 64 px (image and text)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from toydata import generate

    from mmcli.preprocess import PreprocessConfig, preprocess

    manifest = generate(folder / "data", items=items, seed=0, image_size=(64, 64), audio=False)
    rows = [json.loads(x) for x in Path(manifest).read_text().splitlines()]
    for r in rows:
        r["text"] = r["text"][:1]
        r["split"] = "train"
    Path(manifest).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = folder / "tensors"
    preprocess(str(manifest), str(out), config=PreprocessConfig(image_size=64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default=IMAGE, help="image encoder spec (tiny: no batch norm)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--config", help=argparse.SUPPRESS)  # child
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors = prepare(tmp, args.items)
        results = {}
        for name in args.configs.split(","):
            cmd = [sys.executable, __file__, "--config", name, "--tensors", str(tensors)]
            cmd += ["--out", str(tmp / "runs"), "--steps", str(args.steps)]
            cmd += ["--device", args.device, "--threads", str(args.threads), "--image", args.image]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            results[name] = json.loads(p.stdout.strip().splitlines()[-1])
    report(results, args)


def report(results: dict, args) -> None:
    names = list(results)
    ref = results[names[0]]
    what = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    print(f"image {args.image}, text {TEXT}, {args.steps} steps, device {args.device}")
    print(f"{'config':<12}{'peak MB':>10}{'x ' + names[0]:>10}{'step s':>9}{'x ' + names[0]:>10}")
    for n in names:
        r = results[n]
        print(
            f"{n:<12}{r['peak_mb']:>10.0f}{r['peak_mb'] / ref['peak_mb']:>10.2f}"
            f"{r['step_s']:>9.2f}{r['step_s'] / ref['step_s']:>10.2f}"
        )
    print(f"(peak memory: {what}; step: median over steps 2..{args.steps})")
    print("step " + "".join(f"{n:>12}" for n in names) + f"{'max rel diff':>14}")
    for i in range(len(ref["losses"])):
        row = [results[n]["losses"][i] for n in names]
        diff = max(abs(v - row[0]) / abs(row[0]) for v in row)
        print(f"{i + 1:>4} " + "".join(f"{v:>12.6f}" for v in row) + f"{diff:>14.2e}")


if __name__ == "__main__":
    main()
