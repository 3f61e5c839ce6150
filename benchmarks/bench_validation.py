"""What the reader checks cost: opening a feature file (ids, item and label columns
checked), reading a table, and loading a checkpoint (meta-device build + shape checks,
then the real build).

    python benchmarks/bench_validation.py [--items 200000] [--repeats 5]

Prints the median seconds of each step. Run it on an older checkout (same arguments) to
compare: it uses only the public API there; the meta-check line needs this version.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from feature_files import write_features

    from mmcli.formats.features import FeatureSet
    from mmcli.models import MultimodalModel, build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mmcli-bench-validation-"))
    rng = np.random.default_rng(0)
    n = args.items
    feats = write_features(
        folder / "f.safetensors",
        [f"item-{i:07d}" for i in range(n)],
        {
            "image": (rng.standard_normal((n, 256)).astype(np.float16), np.arange(n)),
            "text": (rng.standard_normal((n, 256)).astype(np.float16), np.arange(n)),
        },
    )
    torch.manual_seed(0)
    ckpt = folder / "m.safetensors"
    model = build_model({"image": "resnet50", "text": "transformer"})
    params = sum(p.numel() for p in model.parameters())
    model.to_checkpoint(ckpt)
    r = args.repeats
    print(
        f"feature file: {n:,} items x 2 tables x 256 float16; checkpoint: {params / 1e6:.1f} M parameters"
    )
    print(f"open + ids          {median_time(lambda: FeatureSet.open(feats), r):.3f} s")
    print(
        f"open + image table  {median_time(lambda: FeatureSet.open(feats).table('image'), r):.3f} s"
    )
    print(
        f"from_checkpoint     {median_time(lambda: MultimodalModel.from_checkpoint(ckpt), r):.3f} s"
    )
    try:
        from mmcli.formats.safetensors_io import read_header
        from mmcli.models.checkpoint_io import build_on_meta, check_against_stored
        from mmcli.models.config import ModelConfig
    except ImportError:
        return
    config = ModelConfig.from_dict(model.config.to_dict())

    def checks():
        stored = read_header(ckpt)[0]
        meta = build_on_meta(MultimodalModel, config, len(stored), str(ckpt))
        check_against_stored(meta, stored, str(ckpt))

    print(f"  of which checks   {median_time(checks, r):.3f} s (header, meta build, shapes)")


if __name__ == "__main__":
    main()
