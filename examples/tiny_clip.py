"""Save a tiny random-init open_clip model the way open_clip saves real ones.

    python examples/tiny_clip.py out/tiny-clip     # -> tiny-clip.json + tiny-clip.safetensors

A custom model config (a 2-layer ViT on 32 px images and a 2-layer text transformer,
open_clip's own BPE tokenizer) and its state dict, built with open_clip's constructors:
what the README's "Use a pretrained model" commands run on, offline. The commands are
the same for a real CLIP: ``open_clip:ViT-B-32`` and ``--weights`` the downloaded
``open_clip_model.safetensors``. Its features are random: it shows the mechanics, not
the quality. Needs ``pip install "mmcli[open_clip]"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="folder for tiny-clip.json and tiny-clip.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "tiny-clip.json"
    config.write_text(json.dumps(CONFIG, indent=2))
    open_clip.add_model_config(config)
    torch.manual_seed(args.seed)
    model = open_clip.create_model("tiny-clip")
    weights = out / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    print(f"{config}\n{weights}")


if __name__ == "__main__":
    main()
