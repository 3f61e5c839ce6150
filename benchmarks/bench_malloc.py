"""The command line's allocator setting (mmcli.cpu.tune_malloc) against glibc's default
(``MMCLI_MALLOC=system``): the same mmcli commands, alternating, in fresh processes.

    python benchmarks/bench_malloc.py [--rows 512] [--repeats 3] [--commands vitb32,convnet,train]

Commands (each on generated data, random weights: the real models' cost):

* ``vitb32``: ``mmcli extract --model open_clip:ViT-B-32`` over ``--rows`` 224 px images
  (pixel shards), fp32, batch 64;
* ``convnet``: ``mmcli extract -e image=convnet`` over 16x as many 64 px images;
* ``train``: ``mmcli fuse-train`` (convnet + transformer towers) on ``--rows`` toy
  captioned images (examples/toydata.py), 2 epochs.

Each run is timed under ``/usr/bin/time``: wall seconds, user and system CPU seconds,
minor page faults and the peak resident memory (the setting's cost: freed memory stays with
the process). Prints one line per command and setting (medians), and the ratios, on
stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from mmcli.data.image import ImageTransform  # noqa: E402
from mmcli.formats.tensorfile import Shard, shard_name, write_shard  # noqa: E402

SETTINGS = {"tuned": {}, "system": {"MMCLI_MALLOC": "system"}}
FIELDS = ("wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mb")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pixel_set(folder: Path, rows: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    shard = Shard(
        ids=[str(i) for i in range(rows)],
        tables={"image": rng.integers(0, 256, (rows, 3, size, size), dtype=np.uint8)},
        items={"image": np.arange(rows, dtype=np.int64)},
    )
    write_shard(folder / shard_name("tensors", 0, 1), shard, kind="tensors",
                specs={"image": ImageTransform(size).spec()}, index=0, count=1)  # fmt: skip
    return folder


def toy_set(folder: Path, rows: int) -> Path:
    from toydata import generate

    manifest = generate(folder / "toy", items=rows, seed=0, audio=False)
    out = folder / "toy_t"
    subprocess.run([sys.executable, "-m", "mmcli", "preprocess", str(manifest), "-o", str(out),
                    "--image-size", "64", "-q"], check=True, env=env_with({}))  # fmt: skip
    return out


def env_with(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MMCLI_MALLOC"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def timed(args: list[str], extra: dict[str, str]) -> dict[str, float]:
    fmt = "%e %U %S %R %M"
    r = subprocess.run(["/usr/bin/time", "-f", fmt, sys.executable, "-m", "mmcli", *args],
                       capture_output=True, text=True, env=env_with(extra))  # fmt: skip
    if r.returncode:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"mmcli {args[0]} failed ({r.returncode})")
    wall, user, system, faults, rss = r.stderr.strip().splitlines()[-1].split()
    return dict(zip(FIELDS, (float(wall), float(user), float(system), int(faults),
                             int(rss) / 1024)))  # fmt: skip


def commands(work: Path, rows: int, which: list[str]) -> dict[str, list[str]]:
    out = {}
    if "vitb32" in which:
        src = pixel_set(work / "vit", rows, 224)
        out["vitb32"] = ["extract", str(src), "-o", str(work / "o"), "--model",
                         "open_clip:ViT-B-32", "--batch-size", "64", "--device", "cpu", "-q"]  # fmt: skip
    if "convnet" in which:
        src = pixel_set(work / "conv", rows * 16, 64)
        out["convnet"] = ["extract", str(src), "-o", str(work / "o"), "-e", "image=convnet",
                          "--device", "cpu", "-q"]  # fmt: skip
    if "train" in which:
        src = toy_set(work, rows)
        out["train"] = ["fuse-train", str(src), "-o", str(work / "o"), "--epochs", "2", "--batch-size", "32",
                        "--device", "cpu", "-q"]  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commands", default="vitb32,convnet,train")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_malloc_"))
    try:
        cmds = commands(work, args.rows, args.commands.split(","))
        print(f"{'command':<9}{'malloc':<8}" + "".join(f"{f:>14}" for f in FIELDS))
        for name, cmd in cmds.items():
            runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for r in range(args.repeats):
                for setting in SETTINGS if r % 2 == 0 else list(SETTINGS)[::-1]:
                    shutil.rmtree(work / "o", ignore_errors=True)
                    runs[setting].append(timed(cmd, SETTINGS[setting]))
                    log(f"{name} {setting}: {runs[setting][-1]}")
            med = {s: {f: statistics.median(x[f] for x in v) for f in FIELDS}
                   for s, v in runs.items()}  # fmt: skip
            for s, m in med.items():
                print(f"{name:<9}{s:<8}" + "".join(f"{m[f]:>14.1f}" for f in FIELDS))
            ratio = med["system"]["wall_s"] / med["tuned"]["wall_s"]
            rss = med["tuned"]["peak_rss_mb"] / med["system"]["peak_rss_mb"]
            print(
                f"{name:<9}speed-up tuned vs system {ratio:.2f}x, peak RSS tuned/system {rss:.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
