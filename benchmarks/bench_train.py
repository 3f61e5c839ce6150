"""End-to-end training throughput: mmcli fuse-train vs the tutorial loop.

    python benchmarks/bench_train.py [--items 2000] [--steps 40] [--batch-size 64] [--workers 2]

Both train the same model (image convnet + text transformer + linear heads, contrastive
loss, AdamW) with the same batch size on the same toy images:

* mmcli: ``fuse_train`` from preprocessed uint8 shards (memory-mapped, a background
  thread assembles the next batches, uint8 -> float normalisation inside the model);
* tutorial: ``torchvision.datasets.ImageFolder`` over the PNG files + ``transforms``
  (Resize, CenterCrop, ToTensor, Normalize) + ``DataLoader(num_workers=W, shuffle=True)``,
  captions tokenized once up front, the same training step.

Prints samples/s for each, the ratio, and the fraction of step time spent waiting for
data (time blocked on the next batch / total time). Runs are interleaved and repeated;
medians are quoted.
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

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "convnet:stem_stride=2,grid=4,width=16"
TEXT = "transformer:width=128,depth=2"


def tutorial_loop(
    data_dir: Path, tensors: Path, steps: int, batch_size: int, workers: int, seed: int = 0
):
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from mmcli.data.text import ByteTokenizer
    from mmcli.formats.manifest import read_manifest
    from mmcli.models import build_model
    from mmcli.models.base import IMAGENET_MEAN, IMAGENET_STD
    from mmcli.train.objectives import contrastive_loss

    torch.manual_seed(seed)
    # ImageFolder wants ROOT/<class>/<file>: a view of the toy images by label
    view = data_dir.parent / "imagefolder"
    captions = {}
    tok = ByteTokenizer(77)
    if not view.exists():
        for item in read_manifest(data_dir / "manifest.jsonl"):
            if item.split != "train":
                continue
            (view / item.label).mkdir(parents=True, exist_ok=True)
            os.symlink(
                item.path("image").resolve(), view / item.label / Path(item.fields["image"]).name
            )
    for item in read_manifest(data_dir / "manifest.jsonl"):
        captions[Path(item.fields["image"]).name] = torch.tensor(
            tok.encode(item.texts[0])[0], dtype=torch.int32
        )

    tf = transforms.Compose(
        [
            transforms.Resize(64),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    class WithCaptions(datasets.ImageFolder):
        def __getitem__(self, i):
            image, _ = super().__getitem__(i)
            return image, captions[Path(self.samples[i][0]).name], i

    ds = WithCaptions(str(view), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    from mmcli.data.text import BYTE_VOCAB_SIZE  # noqa: F401  (same tokenizer as mmcli)

    inputs = {"image": {"image_size": 64}, "text": {"context_length": 77}}
    model = build_model(
        {"image": IMAGE, "text": TEXT},
        inputs=inputs,
        heads={
            m: {"kind": "linear", "in_dim": d, "out_dim": 256}
            for m, d in (("image", 256), ("text", 128))
        },
        embed_dim=256,
    ).train()
    scale = torch.nn.Parameter(torch.tensor(2.659))
    opt = torch.optim.AdamW([*model.parameters(), scale], lr=1e-3)
    done, wait = 0, 0.0
    started = None
    while done < steps:
        it = iter(loader)
        while done < steps:
            t = time.perf_counter()
            try:
                images, text, idx = next(it)
            except StopIteration:
                break
            if started is None:  # exclude worker start-up, as mmcli's number excludes set-up
                started = time.perf_counter()
            else:
                wait += time.perf_counter() - t
            ei = F.normalize(model.heads["image"](model.encoders["image"](images)), dim=-1)
            et = F.normalize(model.heads["text"](model.encoders["text"](text)), dim=-1)
            loss = contrastive_loss(ei, et, idx, idx, scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": (steps - 1) * batch_size / seconds,
        "data_wait_fraction": wait / seconds,
    }


def mmcli_loop(tensors: Path, run: Path, steps: int, batch_size: int):
    from mmcli.train.fuse import FuseConfig, fuse_train
    from mmcli.train.loop import LoopConfig

    cfg = FuseConfig(
        pairs=[("image", "text")], encoders={"image": IMAGE, "text": TEXT}, val_split="none"
    )
    loop = LoopConfig(max_steps=steps, lr=1e-3, log_every=10**6, eval_every=10**6, grad_clip=None)
    s = fuse_train(
        [str(tensors)], str(run), cfg, loop, batch_size=batch_size, device="cpu", overwrite=True
    )
    return {"samples_per_s": s["samples_per_s"], "data_wait_fraction": s["data_wait_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the tutorial loop"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", help="folder for the generated data (default: a temp folder)")
    args = ap.parse_args()
    import logging

    logging.getLogger("mmcli").setLevel(logging.WARNING)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-train-"))
    data, tensors = work / "data", work / "tensors"
    if not (data / "manifest.jsonl").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "toydata.py"),
                str(data),
                "--items",
                str(args.items),
                "--no-audio",
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not (tensors / "preprocess.json").exists():
        from mmcli.preprocess import PreprocessConfig, preprocess

        preprocess(
            str(data / "manifest.jsonl"),
            str(tensors),
            config=PreprocessConfig(image_size=64, workers=2),
            overwrite=True,
        )
    results: dict[str, list[dict]] = {"mmcli": [], "tutorial": []}
    for _ in range(args.repeats):
        results["mmcli"].append(mmcli_loop(tensors, work / "run", args.steps, args.batch_size))
        results["tutorial"].append(
            tutorial_loop(data, tensors, args.steps, args.batch_size, args.workers)
        )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("samples_per_s", "data_wait_fraction")}
        for k, v in results.items()
    }
    print(
        f"end-to-end training, image {IMAGE} + text {TEXT}, batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(f"{'loop':<10}{'samples/s':>11}{'data wait':>11}")
    for k, v in med.items():
        print(f"{k:<10}{v['samples_per_s']:>11.1f}{v['data_wait_fraction']:>10.1%}")
    print(
        f"ratio mmcli / tutorial: {med['mmcli']['samples_per_s'] / med['tutorial']['samples_per_s']:.2f}x"
    )
    print(json.dumps(med), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
