"""LiT (``fuse-train --init open_clip:... --freeze image``): the frozen image tower's
outputs computed once (the default) against running it at every step.

    python benchmarks/bench_lit.py                  # in benchmarks/out/lit
    python benchmarks/bench_lit.py --items 128 --epochs 2

A random-init open_clip ViT (width 256, 6 layers, 64 px, patch 8: a small stand-in for a
real CLIP, built with open_clip's own constructors and saved as its state dict) on the toy
data's images and captions, preprocessed with ``--like``. Both runs train the same text
tower for the same steps through :func:`mmcli.train.fuse.fuse_train`; the second sets
``FuseConfig.cache_frozen = False``. Printed: seconds per run, the ratio, and how many
image rows went through the tower in each (counted by a forward hook on open_clip's
``VisionTransformer``). Needs ``pip install "mmcli[open_clip]"``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def setup(out: Path, items: int) -> tuple[str, Path]:
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "bench-clip.json"
    cfg.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("bench-clip")
    weights = out / "bench-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run = [sys.executable, "-m", "mmcli"]
    if not (out / "data" / "manifest.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "toydata.py"), str(out / "data"),
                        "--items", str(items), "--quiet"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*run, "preprocess", str(out / "data" / "manifest.jsonl"), "-o", str(out / "t"),
                    "--like", f"open_clip:{cfg}", "--modality", "image", "--modality", "text",
                    "--overwrite", "-q"], check=True)  # fmt: skip
    return f"open_clip:{cfg}", weights


def timed(out: Path, like: str, weights: Path, epochs: int, cache: bool) -> tuple[float, int]:
    import open_clip
    from torch.nn.modules.module import register_module_forward_hook

    from mmcli.train.fuse import FuseConfig, fuse_train
    from mmcli.train.loop import LoopConfig

    rows = [0]

    def hook(module, args, result):
        if isinstance(module, open_clip.transformer.VisionTransformer):
            rows[0] += args[0].shape[0]

    cfg = FuseConfig(init=like, init_weights=str(weights), freeze=["image"], cache_frozen=cache)
    handle = register_module_forward_hook(hook)
    started = time.perf_counter()
    try:
        fuse_train([str(out / "t")], str(out / f"run-{cache}"), cfg,
                   LoopConfig(epochs=epochs, lr=1e-4), batch_size=32, overwrite=True, device="cpu")  # fmt: skip
    finally:
        handle.remove()
    return time.perf_counter() - started, rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "lit"))
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    like, weights = setup(out, args.items)
    cached, n_cached = timed(out, like, weights, args.epochs, cache=True)
    live, n_live = timed(out, like, weights, args.epochs, cache=False)
    print(f"LiT, {args.items} items, {args.epochs} epochs (validation after each), batch 32, CPU:")
    print(f"  frozen tower cached   {cached:7.1f} s   image rows through the tower {n_cached:6d}")
    print(f"  frozen tower live     {live:7.1f} s   image rows through the tower {n_live:6d}")
    print(f"  speed-up {live / cached:.2f}x")


if __name__ == "__main__":
    main()
