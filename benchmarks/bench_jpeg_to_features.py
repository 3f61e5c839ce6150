"""From JPEG files to CLIP image features: ``mmcli preprocess --like`` + ``mmcli extract
--model`` against a clip-retrieval-style loop, the same files and model, in one run.

    python benchmarks/bench_jpeg_to_features.py [--images 1000] [--batch-size 64]
        [--store pixels,encoded] [--keep]

1. ``--images`` photo-like JPEGs (512x384, gradients, shapes and noise; quality 90) are
   written into a temporary folder (deleted afterwards unless ``--keep``);
2. mmcli: ``mmcli preprocess manifest.jsonl -o T --like open_clip:ViT-B-32`` then ``mmcli extract T
   -o F --model open_clip:ViT-B-32`` (random init: the real model's cost, nothing
   downloaded), two real command lines, timed from start to end (process start-up, model
   construction and writing the features included), once per ``--store``: ``pixels``
   decodes and resizes every file in preprocess, then extract only computes; ``encoded``
   keeps the JPEG files in the shards and extract decodes them in its 2 worker processes
   while the model computes (the loop's overlap);
3. the loop clip-retrieval runs: PIL ``Image.open`` + open_clip's own preprocess transform
   in a ``torch.utils.data.DataLoader`` with 2 workers, then ``model.encode_image`` batch by
   batch, the features saved with ``numpy.save``; timed in one process from model
   construction to the saved file.

   The loop runs three times: as written; at its best configuration, with the allocator
   setting mmcli's command line makes for itself (glibc's ``GLIBC_TUNABLES`` mmap and trim
   thresholds at 1 GiB, what ``mmcli.cpu.tune_malloc`` sets with mallopt); and tuned with
   mmcli's float32 products as well (``mmcli.onednn.linear()`` around ``encode_image``:
   oneDNN where it is measured faster than torch's BLAS), so that the ratio against that
   last loop counts only what the rest of mmcli (its pipeline) does.

Both at fp32, the same batch size, the same torch thread count; the order alternates over
``--repeats`` (median). Goal (issue 11): mmcli >= 1.0x the loop. Prints one JSON object
on stdout (images/s of each and the ratios); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCH = "ViT-B-32"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-like 512x384 JPEGs: a sky-to-ground gradient, a few filled shapes, noise."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = 512, 384
    yy = np.linspace(0, 1, h)[:, None, None]
    for i in range(n):
        top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        arr = (top * (1 - yy) + bottom * yy) * np.ones((1, w, 1))
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            x1, y1 = x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 160))
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        noisy = np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            folder / f"photo_{i:05d}.jpg", quality=90
        )
    with open(folder.parent / "manifest.jsonl", "w") as f:  # what preprocess reads
        for i in range(n):
            f.write(
                json.dumps({"id": f"photo_{i:05d}", "image": f"photos/photo_{i:05d}.jpg"}) + "\n"
            )


def run_mmcli(photos: Path, work: Path, batch: int, store: str) -> float:
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmds = [
        ["preprocess", str(photos.parent / "manifest.jsonl"), "-o", str(work / "t"), "--like", f"open_clip:{ARCH}",
         "--store", store],
        ["extract", str(work / "t"), "-o", str(work / "f"), "--model", f"open_clip:{ARCH}",
         "--batch-size", str(batch), "--device", "cpu"],
    ]  # fmt: skip
    start = time.perf_counter()
    for args in cmds:
        log("$ mmcli " + " ".join(args))
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "mmcli", *args], capture_output=True, text=True, env=env
        )
        if r.returncode:
            sys.stderr.write(r.stderr)
            raise SystemExit(f"mmcli {args[0]} failed ({r.returncode})")
        log(f"  {args[0]}: {time.perf_counter() - t0:.1f} s")  # preprocess / extract apart
    return time.perf_counter() - start


LOOP = r"""
import sys, time, numpy as np, torch, open_clip
from pathlib import Path
from PIL import Image
photos, out, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
model.eval()
files = sorted(photos.glob("*.jpg"))

class Files(torch.utils.data.Dataset):
    def __len__(self):
        return len(files)
    def __getitem__(self, i):
        return preprocess(Image.open(files[i]))

loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=2)
feats = []
if len(sys.argv) > 4:  # mmcli's oneDNN products for fp32 CPU linear layers (mmcli.onednn)
    from mmcli import onednn
    products = onednn.linear()
else:
    import contextlib
    products = contextlib.nullcontext()
with torch.no_grad(), products:
    for x in loader:
        feats.append(model.encode_image(x).numpy())
np.save(out, np.concatenate(feats))
print(time.perf_counter() - start)
"""


#: the tuned loop with mmcli's oneDNN products as well: what is left is the pipeline's share
LOOP_ONEDNN = "loop_tuned_malloc_onednn"

#: glibc's equivalent of mmcli.cpu.tune_malloc, for the loop at its best
TUNED_MALLOC = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def run_loop(
    photos: Path, work: Path, batch: int, tuned: bool = False, products: bool = False
) -> float:
    """clip-retrieval's loop in a process of its own (as a user runs it); ``tuned``: with
    mmcli's allocator setting; ``products``: and with mmcli's oneDNN linear layers."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"GLIBC_TUNABLES": TUNED_MALLOC} if tuned else {})}
    env["PYTHONPATH"] = str(ROOT)
    log("$ python -c <PIL + open_clip preprocess, DataLoader(num_workers=2), encode_image>"
        + (f" with GLIBC_TUNABLES={TUNED_MALLOC}" if tuned else "")
        + (" and mmcli.onednn.linear()" if products else ""))  # fmt: skip
    start = time.perf_counter()
    argv = [sys.executable, "-c", LOOP, str(photos), str(work / "feats.npy"), str(batch)]
    r = subprocess.run(argv + (["onednn"] if products else []), capture_output=True, text=True,
                       env=env)  # fmt: skip
    if r.returncode:
        sys.stderr.write(r.stderr)
        raise SystemExit("the open_clip loop failed")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--store", default="pixels,encoded", help="preprocess --store values to time")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_jpeg_"))
    try:
        log(f"writing {args.images} JPEGs into {tmp / 'photos'} ...")
        t0 = time.perf_counter()
        write_photos(tmp / "photos", args.images)
        log(f"  {time.perf_counter() - t0:.1f} s")
        stores = [s.strip() for s in args.store.split(",") if s.strip()]
        names = [f"mmcli_{s}" for s in stores] + ["loop", "loop_tuned_malloc", LOOP_ONEDNN]
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                if name.startswith("loop"):
                    tuned, products = name != "loop", name == LOOP_ONEDNN
                    times[name].append(
                        run_loop(tmp / "photos", tmp / "loop", args.batch_size, tuned, products)
                    )
                else:
                    store = name.removeprefix("mmcli_")
                    work = tmp / name
                    times[name].append(run_mmcli(tmp / "photos", work, args.batch_size, store))
                log(f"  {name}: {times[name][-1]:.1f} s")
        a = np.load(tmp / "loop" / "feats.npy")
        rate = {k: args.images / statistics.median(v) for k, v in times.items()}
        out = {
            "images": args.images,
            "image_size": "512x384 JPEG",
            "model": f"open_clip:{ARCH} (random init), fp32, batch {args.batch_size}",
            "cpus": os.cpu_count(),
            "open_clip_dataloader_loop_images_per_s": round(rate["loop"], 2),
            "loop_tuned_malloc_images_per_s": round(rate["loop_tuned_malloc"], 2),
            f"{LOOP_ONEDNN}_images_per_s": round(rate[LOOP_ONEDNN], 2),
        }
        for s in stores:
            out[f"mmcli_{s}_images_per_s"] = round(rate[f"mmcli_{s}"], 2)
            out[f"ratio_mmcli_{s}_vs_loop"] = round(rate[f"mmcli_{s}"] / rate["loop"], 2)
            best = rate[f"mmcli_{s}"] / rate["loop_tuned_malloc"]
            out[f"ratio_mmcli_{s}_vs_loop_tuned_malloc"] = round(best, 2)
            same = rate[f"mmcli_{s}"] / rate[LOOP_ONEDNN]
            out[f"ratio_mmcli_{s}_vs_{LOOP_ONEDNN}"] = round(same, 2)
        out["seconds"] = {k: [round(x, 1) for x in v] for k, v in times.items()}
        out["loop_features"] = list(a.shape)
        print(json.dumps(out, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
