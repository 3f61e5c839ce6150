"""Training on the CPU: fp32 vs ``torch.autocast("cpu", bfloat16)`` with fp32 master weights
(what ``fuse-train --precision bf16`` would run there), side by side in one run.

    python benchmarks/bench_train_bf16.py [--steps 6] [--repeats 3] [--batch-size 64]

The training step of ``fuse-train`` on raw rows: both encoders and heads forward, the
symmetric contrastive loss, backward, AdamW step, on synthetic uint8 images and byte-token
captions (the same batch for both precisions). Models:

* ``small``: ``convnet`` on 64 px and ``transformer`` over 77 byte tokens (the registry
  defaults when measured);
* ``mid``: ``resnet18`` on 128 px and ``transformer:width=256,depth=4``.

Median steps/s of ``--repeats`` interleaved runs of ``--steps`` steps (after a warm-up
step each), and the ratio bf16 / fp32. ``--fuse-train N`` also times the real thing:
``fuse_train`` (the library call behind ``mmcli fuse-train``) over toy data of N items
(examples/toydata.py, preprocessed once at each model's image size) for ``--steps`` steps
per run, ``--precision fp32`` against ``bf16`` (autocast where the CPU has AMX; fp32 with
a note elsewhere), interleaved, median samples/s of its own summary. Prints one JSON object
on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcli.cpu import cpu_amx  # noqa: E402
from mmcli.models.multimodal import ModelConfig, MultimodalModel  # noqa: E402
from mmcli.models.registry import config_to_dict, make_config, parse_encoder_spec  # noqa: E402

MODELS = {
    # the registry defaults when measured (docs/fuse-train.md)
    "small": (
        {"image": "convnet:width=32,depth=4,dim=256", "text": "transformer:width=256,depth=4"},
        64,
    ),
    "mid": ({"image": "resnet18", "text": "transformer:width=256,depth=4"}, 128),
}


def build(encoders: dict[str, str]) -> MultimodalModel:
    encs, heads = {}, {}
    for m, spec in encoders.items():
        name, opts = parse_encoder_spec(spec, modality=m)
        cfg = make_config(name, m, **opts)
        encs[m] = {"name": type(cfg).encoder_name, "config": config_to_dict(cfg)}
    probe = MultimodalModel(ModelConfig(encoders=encs))
    for m in encs:
        heads[m] = {"kind": "linear", "in_dim": probe.encoders[m].out_dim, "out_dim": 256}
    return MultimodalModel(ModelConfig(encoders=encs, heads=heads, embed_dim=256, logit_scale=2.66))


def step(model, opt, images, tokens, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        a = model.encode("image", images)
        b = model.encode("text", tokens)
        logits = model.logit_scale.exp() * a @ b.t()
        target = torch.arange(len(a))
        loss = 0.5 * (
            F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().t(), target)
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def measure(name: str, steps: int, repeats: int, batch: int) -> dict:
    encoders, size = MODELS[name]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    tokens = torch.randint(1, 255, (batch, 77), dtype=torch.int64)
    runs = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build(encoders).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step(model, opt, images, tokens, prec == "bf16")  # warm-up
        runs[prec] = (model, opt)
    times = {p: [] for p in runs}
    for _ in range(repeats):
        for prec, (model, opt) in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(model, opt, images, tokens, prec == "bf16")
            times[prec].append(time.perf_counter() - start)
    rate = {p: steps / statistics.median(t) for p, t in times.items()}
    params = sum(p.numel() for p in runs["fp32"][0].parameters())
    return {
        "encoders": encoders,
        "image_px": size,
        "parameters": params,
        "fp32_steps_per_s": round(rate["fp32"], 3),
        "bf16_autocast_steps_per_s": round(rate["bf16"], 3),
        "bf16_vs_fp32": round(rate["bf16"] / rate["fp32"], 2),
    }


def measure_fuse_train(name: str, items: int, steps: int, repeats: int, batch: int) -> dict:
    import logging
    import shutil
    import subprocess
    import tempfile

    from mmcli.preprocess import PreprocessConfig, preprocess
    from mmcli.train.fuse import FuseConfig, fuse_train
    from mmcli.train.loop import LoopConfig

    logging.getLogger("mmcli").setLevel(logging.WARNING)
    encoders, size = MODELS[name]
    work = Path(tempfile.mkdtemp(prefix="bench-train-bf16-"))
    try:
        toy = [sys.executable, str(ROOT / "examples" / "toydata.py"), str(work / "data")]
        toy += ["--items", str(items), "--no-audio", "--quiet"]
        subprocess.run(toy, check=True, stdout=subprocess.DEVNULL)
        tensors = work / "tensors"
        preprocess(str(work / "data" / "manifest.jsonl"), str(tensors),
                   config=PreprocessConfig(image_size=size, workers=2))  # fmt: skip
        cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(encoders), val_split="none")
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(repeats):
            for prec in rates:
                loop = LoopConfig(max_steps=steps, lr=1e-4, log_every=10**6, eval_every=10**6,
                                  precision=prec)  # fmt: skip
                summary = fuse_train([str(tensors)], str(work / "run"), cfg, loop,
                                     batch_size=batch, device="cpu", overwrite=True)  # fmt: skip
                rates[prec].append(summary["samples_per_s"])
        med = {p: statistics.median(r) for p, r in rates.items()}
        return {
            "encoders": encoders,
            "image_px": size,
            "items": items,
            "steps": steps,
            "bf16_autocast": cpu_amx(),
            "fp32_samples_per_s": med["fp32"],
            "bf16_samples_per_s": med["bf16"],
            "bf16_vs_fp32": round(med["bf16"] / med["fp32"], 2),
            "runs": rates,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models", default="small,mid")
    ap.add_argument("--fuse-train", type=int, default=0, metavar="ITEMS",
                    help="also time fuse_train itself over toy data of ITEMS items")  # fmt: skip
    args = ap.parse_args()
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "amx_bf16": cpu_amx(),
    }
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        out[name] = measure(name, args.steps, args.repeats, args.batch_size)
        print(json.dumps(out[name]), file=sys.stderr, flush=True)
        if args.fuse_train:
            print(f"fuse_train {name} ...", file=sys.stderr, flush=True)
            out[f"{name}_fuse_train"] = measure_fuse_train(
                name, args.fuse_train, args.steps, args.repeats, args.batch_size
            )
            print(json.dumps(out[f"{name}_fuse_train"]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
