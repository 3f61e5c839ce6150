"""extract throughput: mmcli extract against a bare model loop and the usual tutorial loop.

    python benchmarks/bench_extract.py [--images 512] [--batch-size 64] [--repeats 3]

Generates N JPEGs of 512x384 with some structure (gradients, shapes, texture) in an
ImageFolder layout, preprocesses them once to uint8 224 px tensor shards with mmcli's
``preprocess`` library function, then times for each encoder (``convnet``, ``resnet18``;
random init, the same model object everywhere), interleaved and repeated:

(a) bare loop -- ``model.encode("image", x)`` over the same uint8 tensors already in memory,
    batch by batch (the limit: no I/O, no output);
(b) mmcli extract -- the library call, from the tensor shards to features shards on disk;
(c) tutorial loop -- ``torchvision.datasets.ImageFolder`` + ``Resize(256)/CenterCrop(224)/
    ToTensor/Normalize`` + ``DataLoader(num_workers=2)`` + the same network, on the JPEGs.

The tutorial loop decodes JPEGs; extract starts from preprocessed shards (decoding is paid
once by ``mmcli preprocess``, not per pass). Rows/s are medians of the repeats; the
ratios are extract / bare and extract / tutorial. With a CUDA GPU, extract and the bare
loop are also timed on it with bf16 autocast and channels_last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcli.extract import extract  # noqa: E402
from mmcli.formats.tensorfile import TensorSet  # noqa: E402
from mmcli.models import build_model  # noqa: E402

CLASSES = ("circles", "stripes", "blobs", "checks")


def make_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """n 512x384 JPEGs (quality 90) with gradients, a shape and noise, in class folders."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = 384, 512
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(4, 40, 2).tolist() + [rng.uniform(0, 6.3)]
        base = np.sin(xx / fx + phase) * 60 + np.cos(yy / fy) * 60 + 128
        rgb = np.stack([base, np.roll(base, int(rng.integers(0, 200)), 1), 255 - base], -1)
        rgb += rng.normal(0, 12, rgb.shape)
        im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 100)), int(rng.integers(0, h - 100))
            box = (x0, y0, x0 + int(rng.integers(40, 100)), y0 + int(rng.integers(40, 100)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=color)
        im.save(folder / cls / f"{i:05d}.jpg", quality=90)


def make_shards(jpegs: Path, out: Path, shard_size: int) -> None:
    try:
        from mmcli.preprocess import PreprocessConfig, preprocess
    except ImportError:  # before mmcli preprocess existed: the same decoding, by hand
        preprocess = None
    if preprocess is not None:
        config = PreprocessConfig(image_size=224, shard_size=shard_size, workers=2)
        preprocess(str(jpegs), str(out), fmt="imagefolder", config=config)
        return
    from mmcli.data.image import ImageTransform, load_image
    from mmcli.formats.tensorfile import Shard, shard_name, write_shard

    paths = sorted(jpegs.glob("*/*.jpg"))
    count = (len(paths) + shard_size - 1) // shard_size
    for s in range(count):
        part = paths[s * shard_size : (s + 1) * shard_size]
        images = np.stack([load_image(p, 224) for p in part])
        shard = Shard(ids=[p.stem for p in part], tables={"image": images},
                      items={"image": np.arange(len(part), dtype=np.int64)})  # fmt: skip
        write_shard(out / shard_name("tensors", s, count), shard, kind="tensors",
                    specs={"image": ImageTransform(224).spec()}, index=s, count=count)  # fmt: skip


def bare_loop(model, batches, device, precision="fp32") -> float:
    from mmcli.runtime import autocast

    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for x in batches:
            z = model.encode("image", x.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
    del z
    return time.perf_counter() - start


def tutorial_loop(model, jpegs: Path, batch_size: int, workers: int) -> tuple[float, int]:
    """ImageFolder + Resize/CenterCrop/ToTensor/Normalize + DataLoader + the same network."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    loader = DataLoader(datasets.ImageFolder(str(jpegs), transform=tf), batch_size=batch_size,
                        num_workers=workers)  # fmt: skip
    n = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            z = F.normalize(model(x), dim=-1)
            n += z.shape[0]
    return time.perf_counter() - start, n


def for_tutorial(model):
    """The same network, in the default NCHW layout a tutorial uses, fed already-normalised
    floats (the tutorial's Normalize does that)."""
    enc = copy.deepcopy(model.encoders["image"]).to(memory_format=torch.contiguous_format)
    enc.mean.zero_()
    enc.std.fill_(1.0)
    return enc


def run_extract(shards: Path, out: Path, model, batch_size: int, **kw) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    extract(str(shards), str(out), model, batch_size=batch_size, **kw)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="tutorial DataLoader workers")
    ap.add_argument("--encoders", default="convnet,resnet18")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "extract"))
    args = ap.parse_args()

    work = Path(args.out)
    jpegs, shards = work / "jpeg", work / "tensors"
    if len(list(jpegs.glob("*/*.jpg"))) != args.images:
        shutil.rmtree(jpegs, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
        print(f"generating {args.images} JPEGs (512x384) in {jpegs}", file=sys.stderr)
        make_jpegs(jpegs, args.images)
    if not shards.exists():
        print(f"preprocessing to uint8 224 px shards in {shards}", file=sys.stderr)
        make_shards(jpegs, shards, shard_size=256)
    data, _ = TensorSet(shards).table("image")
    data = data.clone()  # in memory for the bare loop
    n = data.shape[0]
    bs = args.batch_size
    cpu = torch.device("cpu")

    results = {
        "images": n,
        "batch_size": bs,
        "repeats": args.repeats,
        "tutorial_workers": args.workers,
        "cpu": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },  # fmt: skip
        "torch": torch.__version__,
        "encoders": {},
    }
    for name in args.encoders.split(","):
        torch.manual_seed(0)
        model = build_model({"image": name}).eval()
        model.encoders["image"].to(memory_format=torch.channels_last)  # as extract runs it
        batches = [x.contiguous(memory_format=torch.channels_last) for x in data.split(bs)]
        tut_model = for_tutorial(model)
        times: dict[str, list[float]] = {"bare": [], "extract": [], "tutorial": []}
        bare_loop(model, batches[:1], cpu)  # warm-up
        for r in range(args.repeats):
            times["bare"].append(bare_loop(model, batches, cpu))
            times["extract"].append(run_extract(shards, work / "feats", model, bs, device="cpu"))
            t, seen = tutorial_loop(tut_model, jpegs, bs, args.workers)
            assert seen == n
            times["tutorial"].append(t)
            print(f"{name} repeat {r + 1}: " + ", ".join(f"{k} {n / v[-1]:.1f} rows/s" for k, v in times.items()),
                  file=sys.stderr)  # fmt: skip
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        # for reference: the same bare loop in the default NCHW layout
        plain = build_model({"image": name}).eval()
        plain.load_state_dict(model.state_dict())
        nchw = n / statistics.median(
            bare_loop(plain, list(data.split(bs)), cpu) for _ in range(args.repeats)
        )
        results["encoders"][name] = {
            "rows_per_s": rate,
            "bare_nchw_rows_per_s": nchw,
            "extract_vs_bare": rate["extract"] / rate["bare"],
            "extract_vs_tutorial": rate["extract"] / rate["tutorial"],
        }

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        results["cuda"] = {"device": torch.cuda.get_device_name(0), "encoders": {}}
        for name in args.encoders.split(","):
            torch.manual_seed(0)
            model = build_model({"image": name}).eval().to(gpu)
            model.encoders["image"].to(memory_format=torch.channels_last)
            batches = [
                x.contiguous(memory_format=torch.channels_last).pin_memory()
                for x in data.split(256)
            ]
            bare_loop(model, batches[:2], gpu, "bf16")
            bare = [bare_loop(model, batches, gpu, "bf16") for _ in range(args.repeats)]
            ext = [run_extract(shards, work / "feats", model, 256, device="cuda", precision="bf16")
                   for _ in range(args.repeats)]  # fmt: skip
            results["cuda"]["encoders"][name] = {
                "bare_rows_per_s": n / statistics.median(bare),
                "extract_rows_per_s": n / statistics.median(ext),
            }
    else:
        results["cuda"] = "no CUDA GPU available"

    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(render(results))


def render(r: dict) -> str:
    lines = [
        f"extract throughput, {r['images']} images at 224 px, batch {r['batch_size']}, median of "
        f"{r['repeats']}; CPU: {r['cpu']['cores']} cores, {r['cpu']['torch_threads']} torch threads; "
        f"torch {r['torch']}",
        "",
        "| encoder | bare loop (in memory) | mmcli extract | tutorial loop (JPEG, 2 workers) "
        "| extract / bare | extract / tutorial |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in r["encoders"].items():
        rate = e["rows_per_s"]
        lines.append(
            f"| {name} | {rate['bare']:.1f} rows/s | {rate['extract']:.1f} rows/s | "
            f"{rate['tutorial']:.1f} rows/s | {e['extract_vs_bare']:.2f}x | {e['extract_vs_tutorial']:.2f}x |"
        )
    lines.append("")
    lines.append(
        "bare loop in the default NCHW layout (extract and the bare loop above use channels_last): "
        + ", ".join(f"{k} {e['bare_nchw_rows_per_s']:.1f} rows/s" for k, e in r["encoders"].items())
    )
    lines.append(
        "note: the tutorial loop decodes and resizes JPEGs on every pass; mmcli extract reads "
        "uint8 tensor shards written once by mmcli preprocess."
    )
    if isinstance(r["cuda"], str):
        lines.append(f"CUDA (bf16, channels_last): {r['cuda']}")
    else:
        for name, e in r["cuda"]["encoders"].items():
            lines.append(
                f"CUDA {r['cuda']['device']} bf16 channels_last, {name}: extract "
                f"{e['extract_rows_per_s']:.0f} rows/s, bare loop {e['bare_rows_per_s']:.0f} rows/s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
