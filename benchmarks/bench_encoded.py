"""Encoded-image shards (``preprocess --store encoded``) against pixel shards (issue 12).

    python benchmarks/bench_encoded.py                    # 10,000 photos, in benchmarks/out/encoded
    python benchmarks/bench_encoded.py --images 1000 --repeats 2 --steps 0 --vit-steps 0
    python benchmarks/bench_encoded.py --images 1000 --reuse --no-preprocess --steps 20

Every step is the real command line (printed on stderr), so the figures are what a user
gets; ratios come from one run:

1. ``--images`` generated photo-like JPEGs (smooth gradients, shapes, mild noise,
   512 x 384, quality 90) with a caption each, in ``--tars`` webdataset tars
   (img2dataset's layout: ``KEY.jpg`` + ``KEY.txt``);
2. ``mmcli preprocess --image-size 224 --workers 2`` with ``--store encoded`` and
   ``--store pixels``: the disk each takes (the shards' bytes), and items/s (the
   summary's, median of ``--repeats`` runs interleaved with the loop's) against a
   plain ``webdataset`` + PIL loop doing the same decode and resize (``.decode("pil")``,
   RGB, shorter side to 224 bicubic, center crop, uint8 array; one process, as such a
   loop is written);
3. ``mmcli fuse-train`` for ``--steps`` steps from each store with the same model: the
   small convnet (``convnet``) and a ViT-B-32 sized tower (``open_clip:ViT-B-32``,
   random weights, ``--vit-steps``; 0 skips it): samples/s and the share of the time the
   loop waited for data (``data_wait_fraction``).

Goals (issue 12): encoded disk <= 1/4 of pixels; preprocess >= 1.5x the plain loop with
``--workers 2``; fuse-train from encoded >= 0.9x pixels where compute dominates (the
ViT), data wait <= 10%. The table goes to stdout, the figures to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sh(*args: str) -> str:
    cmd = [str(a) for a in args]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def photo(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like RGB: smooth gradients, a few shapes, mild sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            127 + 100 * np.sin(x / w * rng.uniform(1, 4) + rng.uniform(0, 6)),
            127 + 100 * np.cos(y / h * rng.uniform(1, 4) + rng.uniform(0, 6)),
            127 + 80 * np.sin((x + y) / (w + h) * rng.uniform(2, 6) + rng.uniform(0, 6)),
        ],
        axis=-1,
    )
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, h / 3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(folder: Path, images: int, tars: int, seed: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-images // tars)
    paths = []
    for t in range(tars):
        path = folder / f"{t:05d}.tar"
        paths.append(str(path))
        with tarfile.open(path, "w") as tar:
            for i in range(t * per, min(images, (t + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(photo(512, 384, rng)).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()),
                                   (f"{i:08d}.txt", f"generated photo {i}".encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def plain_loop(tars: list[str], size: int) -> float:
    """items/s of a webdataset + PIL loop: decode, RGB, shorter side to size, center crop."""
    import webdataset as wds
    from PIL import Image

    start, n = time.perf_counter(), 0
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        im = sample["jpg"].convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
        n += arr.shape[0] > 0
    return n / (time.perf_counter() - start)


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def train(tensors: Path, out: Path, encoder: str, steps: int, batch: int, workers: int) -> dict:
    summary = sh(
        sys.executable, "-m", "mmcli", "fuse-train", tensors, "-o", out, "--overwrite",
        "--encoder", f"image={encoder}", "--encoder", "text=bow", "--max-steps", steps,
        "--batch-size", batch, "--workers", workers, "--val-split", "none", "-q",
    )  # fmt: skip
    return json.loads(summary.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--tars", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved preprocess runs")
    ap.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                    help="reuse the shards in OUT (with --reuse), measure training only")  # fmt: skip
    ap.add_argument("--steps", type=int, default=50, help="fuse-train steps (convnet; 0: skip)")
    ap.add_argument(
        "--vit-steps", type=int, default=20, help="fuse-train steps (ViT-B-32; 0: skip)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "encoded"))
    ap.add_argument("--reuse", action="store_true", help="keep the tars and shards already there")
    args = ap.parse_args()
    out = Path(args.out)
    tar_dir = out / "tars"
    if not (args.reuse and tar_dir.is_dir()):
        generate(tar_dir, args.images, args.tars)
    tars = sorted(str(p) for p in tar_dir.glob("*.tar"))
    fig: dict = {"images": args.images, "tars": len(tars), "size": args.size}
    fig["tar_bytes"] = sum(Path(t).stat().st_size for t in tars)
    rates: dict[str, list[float]] = {"encoded": [], "pixels": [], "plain": []}
    for _ in range(args.repeats if args.preprocess else 0):  # interleaved: load drifts
        print("$ (plain webdataset + PIL loop)", file=sys.stderr, flush=True)
        rates["plain"].append(plain_loop(tars, args.size))
        for store in ("encoded", "pixels"):
            sh(sys.executable, "-m", "mmcli", "preprocess", tar_dir, "-o", out / store,
               "--overwrite", "--store", store, "--image-size", args.size, "--workers",
               args.workers, "-q")  # fmt: skip
            summary = json.loads((out / store / "preprocess.json").read_text())["summary"]
            rates[store].append(summary["items_per_s"])
    for store in ("encoded", "pixels"):
        if rates[store]:
            fig[f"preprocess_{store}_items_per_s"] = round(statistics.median(rates[store]), 1)
        fig[f"disk_{store}_bytes"] = shard_bytes(out / store)
    if rates["plain"]:
        fig["plain_loop_items_per_s"] = round(statistics.median(rates["plain"]), 1)
        for store in ("encoded", "pixels"):
            fig[f"preprocess_{store}_vs_plain"] = round(
                fig[f"preprocess_{store}_items_per_s"] / fig["plain_loop_items_per_s"], 2
            )
    fig["disk_ratio"] = round(fig["disk_encoded_bytes"] / fig["disk_pixels_bytes"], 4)
    models = [("convnet", "convnet", args.steps)] if args.steps else []
    if args.vit_steps:
        models.append(("vit_b_32", "open_clip:ViT-B-32", args.vit_steps))
    for label, encoder, steps in models:
        for store in ("encoded", "pixels"):
            s = train(out / store, out / f"run-{label}-{store}", encoder, steps,
                      args.batch_size, args.workers)  # fmt: skip
            rate = s["steps"] * args.batch_size / s["seconds"]  # the summary rounds to 0.1
            fig[f"train_{label}_{store}_samples_per_s"] = round(rate, 3)
            fig[f"train_{label}_{store}_data_wait"] = s["data_wait_fraction"]
        fig[f"train_{label}_ratio"] = round(
            fig[f"train_{label}_encoded_samples_per_s"]
            / fig[f"train_{label}_pixels_samples_per_s"],
            3,
        )
    (out / "bench.json").write_text(json.dumps(fig, indent=2))
    mb = 1 / 2**20
    print(f"{args.images} photos 512x384 in {len(tars)} tars -> {args.size} px, "
          f"--workers {args.workers}")  # fmt: skip
    print(f"disk: encoded {fig['disk_encoded_bytes'] * mb:.1f} MiB, pixels "
          f"{fig['disk_pixels_bytes'] * mb:.1f} MiB, ratio {fig['disk_ratio']:.3f} (goal <= 0.25)")  # fmt: skip
    if not rates["plain"]:
        print("preprocess: not measured (--no-preprocess)")
    else:
        print(f"preprocess items/s (median of {args.repeats}): encoded {fig['preprocess_encoded_items_per_s']}, pixels "
          f"{fig['preprocess_pixels_items_per_s']}, plain webdataset+PIL loop "
          f"{fig['plain_loop_items_per_s']}: {fig['preprocess_encoded_vs_plain']}x / "
          f"{fig['preprocess_pixels_vs_plain']}x (goal >= 1.5x)")  # fmt: skip
    for label, _, steps in models:
        print(f"fuse-train {label} ({steps} steps, batch {args.batch_size}) samples/s: encoded "
              f"{fig[f'train_{label}_encoded_samples_per_s']} (data wait "
              f"{fig[f'train_{label}_encoded_data_wait']:.1%}), pixels "
              f"{fig[f'train_{label}_pixels_samples_per_s']} (data wait "
              f"{fig[f'train_{label}_pixels_data_wait']:.1%}); ratio {fig[f'train_{label}_ratio']}")  # fmt: skip


if __name__ == "__main__":
    main()
