"""preprocess throughput: mmcli preprocess --workers N against a plain single-process PIL loop.

    python benchmarks/bench_preprocess.py [--items 2000] [--workers 2] [--repeats 3]

Generates N toy JPEGs of 512x384 (examples/toydata.py), then times, interleaved and
repeated, (a) the loop a user would write: PIL open -> RGB -> resize shorter side to 224
(bicubic) -> center crop -> numpy, collected in memory, and (b) mmcli's preprocess
library call writing safetensors shards with N worker processes (and with 0 workers,
for reference). Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def baseline(paths: list[Path], size: int = 224) -> np.ndarray:
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize(
                (max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC
            )
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            out[i] = np.asarray(im).transpose(2, 0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", help="folder to keep the generated data in (default: a temp folder)")
    args = ap.parse_args()

    from mmcli.preprocess import PreprocessConfig, preprocess

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-preprocess-"))
    data = work / "jpegs"
    if not (data / "manifest.jsonl").exists():
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "toydata.py"),
                str(data),
                "--items",
                str(args.items),
                "--image-size",
                "512x384",
                "--image-format",
                "jpg",
                "--no-audio",
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(
            f"generated {args.items} JPEGs 512x384 in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
    manifest = data / "manifest.jsonl"
    paths = sorted((data / "images").glob("*.jpg"))[: args.items]

    def run_mmcli(workers: int) -> float:
        out = work / f"out-{workers}"
        t = time.perf_counter()
        preprocess(
            str(manifest),
            str(out),
            config=PreprocessConfig(image_size=224, workers=workers, modalities=["image"]),
            overwrite=True,
        )
        return time.perf_counter() - t

    def run_baseline() -> float:
        t = time.perf_counter()
        baseline(paths)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"baseline": [], "mmcli-w0": [], f"mmcli-w{args.workers}": []}
    for _ in range(args.repeats):  # interleaved so machine noise hits all alike
        times["baseline"].append(run_baseline())
        times["mmcli-w0"].append(run_mmcli(0))
        times[f"mmcli-w{args.workers}"].append(run_mmcli(args.workers))
    n = len(paths)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preprocess {n} JPEGs 512x384 -> 224x224 uint8, median of {args.repeats}")
    print(f"{'run':<14}{'seconds':>9}{'images/s':>10}{'vs baseline':>13}")
    for k, v in med.items():
        print(f"{k:<14}{v:>9.2f}{n / v:>10.0f}{med['baseline'] / v:>12.2f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
