"""Pretrained-model extraction and bf16 on the CPU: mmcli extract against bare loops.

    python benchmarks/bench_pretrained.py [--images 96] [--batch-size 32] [--repeats 3]
        [--models vitb32,convnet,resnet18,transformer] [--layouts]

Random-init models (a random ViT-B-32 costs what the real one does), synthetic uint8
224 px images written once as tensor shards (the same tensors the bare loops get in
memory), median of ``--repeats`` interleaved runs:

* ``vitb32``: open_clip ViT-B-32 image tower. bare = open_clip's own loop
  (``encode_image`` over ``(x / 255 - mean) / std`` of the in-memory uint8 batches);
  extract = ``mmcli extract --model open_clip:ViT-B-32`` (shards on disk -> features on
  disk), fp32 and ``--precision bf16``; also the bare loop with the model cast to
  bfloat16 and with ``torch.autocast("cpu", bfloat16)``. Models are built and cast once,
  outside the timings (for extract bf16: a model already cast, so it is used as given).
* ``convnet``, ``resnet18``: mmcli's bare ``model.encode`` loop and extract, fp32 / bf16.
* ``transformer``: mmcli's text transformer over byte tokens, extract fp32 / bf16.
* ``--layouts``: the bare loop of each image encoder in channels_last and NCHW at fp32 and
  bf16 (what ``Encoder.prefers_channels_last`` was set from).

extract's fp32 runs its linear layers through oneDNN where that is measured faster than
torch's BLAS (``mmcli.onednn``; the bare loops use torch's own), so ``extract_bf16_vs_fp32``
is bf16 against mmcli's fp32 and ``extract_bf16_vs_bare_fp32`` against torch's.

Prints one JSON object (img/s and ratios) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcli.extract import extract  # noqa: E402
from mmcli.formats.tensorfile import Shard, TensorSet, write_shard  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_shards(out: Path, n: int, seed: int = 0) -> None:
    """n synthetic 224 px uint8 images (gradients + noise) in ``out/images`` and a caption
    each in ``out/texts`` (separate sets: extract encodes every table it finds)."""
    from mmcli.data.model_transforms import open_clip_like
    from mmcli.data.text import ByteTokenizer

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    images = np.empty((n, 3, 224, 224), np.uint8)
    for i in range(n):
        f = rng.uniform(4, 40, 3)
        base = np.stack([np.sin(xx / f[0]), np.cos(yy / f[1]), np.sin((xx + yy) / f[2])]) * 90 + 128
        images[i] = np.clip(base + rng.normal(0, 15, base.shape), 0, 255)
    words = ["red", "blue", "circle", "square", "small", "large", "left", "right", "a", "the"]
    captions = [" ".join(rng.choice(words, int(rng.integers(6, 16)))) for _ in range(n)]
    tok = ByteTokenizer(77)
    tokens, _ = tok.encode_batch(captions)
    ids, rows = [f"x{i}" for i in range(n)], np.arange(n)
    # the image spec of open_clip's ViT-B-32 transform: extract's check finds no mismatch
    pp = {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic"}
    for name, shard, specs in [
        ("images", Shard(ids=ids, tables={"image": images}, items={"image": rows}), {"image": open_clip_like(pp)}),
        ("texts", Shard(ids=ids, tables={"text": tokens}, items={"text": rows}, strings={"text.raw": captions}),
         {"text": tok.spec()}),
    ]:  # fmt: skip
        (out / name).mkdir(parents=True, exist_ok=True)
        write_shard(
            out / name / "data-00000-of-00001.safetensors", shard, kind="tensors", specs=specs
        )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def open_clip_bare(clip, batches, dtype=torch.float32, autocast=False):
    """open_clip's own loop: uint8 -> float, normalise, encode_image."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def run():
        with torch.inference_mode():
            for x in batches:
                x = ((x.float() / 255 - mean) / std).to(dtype)
                if autocast:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        clip.encode_image(x)
                else:
                    clip.encode_image(x)

    return run


def mmcli_bare(model, batches, table="image"):
    def run():
        with torch.inference_mode():
            for x in batches:
                model.encode(table, x)

    return run


def run_extract(shards: Path, out: Path, model, bs: int, precision: str, channels_last=None):
    def run():
        shutil.rmtree(out, ignore_errors=True)
        extract(str(shards), str(out), model, batch_size=bs, device="cpu", precision=precision,
                channels_last=channels_last)  # fmt: skip

    return run


def median_rate(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """Items/s of each function: interleaved repeats, the median."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
            log(f"  repeat {r + 1}: {name} {n / times[name][-1]:.1f}/s")
    return {k: round(n / statistics.median(v), 2) for k, v in times.items()}


def vitb32(shards, data, args) -> dict:
    import open_clip

    from mmcli import runtime
    from mmcli.models import load_model

    torch.manual_seed(0)
    model = load_model("open_clip:ViT-B-32")  # random init: the real model's cost
    clip = open_clip.create_model("ViT-B-32").eval()
    clip.visual.load_state_dict(model.encoders["image"].visual.state_dict())
    clip16 = copy.deepcopy(clip).bfloat16()
    bs, n = args.batch_size, data.shape[0]
    batches = list(data.split(bs))
    out = Path(args.out) / "feats"
    # cast once, outside the timing, as for the bare loop (a CLI run casts after loading)
    model16 = runtime.cast_for_inference(copy.deepcopy(model), "bf16", torch.device("cpu"))
    open_clip_bare(clip, batches[:1])()  # warm-up
    fns = {
        "open_clip_bare_fp32": open_clip_bare(clip, batches),
        "extract_fp32": run_extract(shards, out, model, bs, "fp32"),
        "open_clip_bare_bf16": open_clip_bare(clip16, batches, dtype=torch.bfloat16),
        "extract_bf16": run_extract(shards, out, model16, bs, "bf16"),
        "open_clip_autocast_bf16": open_clip_bare(clip, batches, autocast=True),
    }
    rates = median_rate(fns, n, args.repeats)
    return {
        "img_per_s": rates,
        "extract_vs_bare_fp32": round(rates["extract_fp32"] / rates["open_clip_bare_fp32"], 3),
        "extract_vs_bare_bf16": round(rates["extract_bf16"] / rates["open_clip_bare_bf16"], 3),
        "extract_bf16_vs_fp32": round(rates["extract_bf16"] / rates["extract_fp32"], 3),
        # against torch's own fp32 (extract's fp32 runs its linear layers through oneDNN
        # where that is faster: mmcli.onednn)
        "extract_bf16_vs_bare_fp32": round(rates["extract_bf16"] / rates["open_clip_bare_fp32"], 3),
        "autocast_vs_fp32": round(
            rates["open_clip_autocast_bf16"] / rates["open_clip_bare_fp32"], 3
        ),
    }


def builtin(name: str, shards, data, args) -> dict:
    from mmcli import runtime
    from mmcli.models import build_model

    table = "text" if name == "transformer" else "image"
    torch.manual_seed(0)
    model = build_model({table: name}).eval()
    bf16 = runtime.cast_for_inference(copy.deepcopy(model), "bf16", torch.device("cpu"))
    cl = table == "image" and model.encoders["image"].prefers_channels_last("fp32")
    batches = [
        x.contiguous(memory_format=torch.channels_last) if cl else x
        for x in data.split(args.batch_size)
    ]
    if cl:
        for m in (model, bf16):
            m.encoders["image"].to(memory_format=torch.channels_last)
    out = Path(args.out) / "feats"
    mmcli_bare(model, batches[:1], table)()
    fns = {
        "bare_fp32": mmcli_bare(model, batches, table),
        "extract_fp32": run_extract(shards, out, model, args.batch_size, "fp32"),
        "bare_bf16": mmcli_bare(bf16, batches, table),
        "extract_bf16": run_extract(shards, out, bf16, args.batch_size, "bf16"),
    }
    rates = median_rate(fns, data.shape[0], args.repeats)
    return {
        "rows_per_s": rates,
        "extract_vs_bare_fp32": round(rates["extract_fp32"] / rates["bare_fp32"], 3),
        "extract_bf16_vs_fp32": round(rates["extract_bf16"] / rates["extract_fp32"], 3),
        "extract_bf16_vs_bare_fp32": round(rates["extract_bf16"] / rates["bare_fp32"], 3),
    }


def layouts(name: str, data, args) -> dict:
    """The bare loop in channels_last and NCHW, fp32 and bf16."""
    from mmcli import runtime
    from mmcli.models import build_model, load_model

    torch.manual_seed(0)
    model = load_model("open_clip:ViT-B-32") if name == "vitb32" else build_model({"image": name})
    model.eval()
    fns = {}
    for precision in ("fp32", "bf16"):
        m = runtime.cast_for_inference(copy.deepcopy(model), precision, torch.device("cpu"))
        cl = copy.deepcopy(m)
        cl.encoders["image"].to(memory_format=torch.channels_last)
        batches = list(data.split(args.batch_size))
        fns[f"nchw_{precision}"] = mmcli_bare(m, batches)
        fns[f"channels_last_{precision}"] = mmcli_bare(
            cl, [x.contiguous(memory_format=torch.channels_last) for x in batches]
        )
    return median_rate(fns, data.shape[0], args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="vitb32,convnet,resnet18,transformer")
    ap.add_argument("--layouts", action="store_true", help="also time channels_last vs NCHW")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "pretrained"))
    args = ap.parse_args()
    work = Path(args.out)
    shards = work / "tensors"
    shutil.rmtree(shards, ignore_errors=True)
    make_shards(shards, args.images)
    image, _ = TensorSet(shards / "images").table("image")
    text, _ = TensorSet(shards / "texts").table("text")
    image, text = image.clone(), text.clone()
    results = {
        "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_average": os.getloadavg(), "models": {},
    }  # fmt: skip
    for name in args.models.split(","):
        log(f"{name}:")
        if name == "vitb32":
            results["models"][name] = vitb32(shards / "images", image, args)
        elif name == "transformer":
            results["models"][name] = builtin(name, shards / "texts", text, args)
        else:
            results["models"][name] = builtin(name, shards / "images", image, args)
        if args.layouts and name != "transformer":
            log(f"{name} layouts:")
            results["models"][name]["layouts_img_per_s"] = layouts(name, image, args)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
