"""How long a command that needs torch takes to answer, against torch's own import.

    python benchmarks/bench_startup.py [--repeats 5] [--rows 2000] [--dim 64]

Writes a small feature index (``--rows`` normalised float16 vectors with a manifest) in a
temporary folder, then times, each in a fresh process, ``--repeats`` times (median,
interleaved so that a busy moment of a shared machine hits every contender alike):

* ``python -c "import torch"``: the floor for any command that imports torch;
* ``mmcli retrieve --index IDX --id X -k 10``: start to the first result line on stdout
  (read from the pipe as it arrives, not at exit);
* ``mmcli retrieve --help`` and ``mmcli --help``: commands that must not import torch.

Prints a table; the difference "retrieve − import torch" is what mmcli itself costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_index(folder: Path, rows: int, dim: int) -> Path:
    import numpy as np
    import torch

    from mmcli.formats.tensorfile import Shard, write_shard

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"item{i:05d}" for i in range(rows)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "label": "x"}) + "\n" for i in ids))
    shard = Shard(ids=ids, tables={"image": torch.from_numpy(x).half()},
                  items={"image": torch.arange(rows)})  # fmt: skip
    spec = {"image": {"encoder": "bench", "dim": dim, "normalized": True, "dtype": "float16"}}
    out = folder / "feats" / "features-00000-of-00001.safetensors"
    out.parent.mkdir(parents=True)
    write_shard(out, shard, kind="features", specs=spec, label_names=[],
                source={"manifest": str(manifest)}, index=0, count=1)  # fmt: skip
    return out.parent


def first_line_seconds(cmd: list[str]) -> float:
    """Seconds from process start to its first stdout line (the process is then waited for)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline()
    elapsed = time.perf_counter() - t0
    p.stdout.read()
    if p.wait() != 0 or (not line and "-c" not in cmd):
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="mmcli-bench-startup-") as tmp:
        index = make_index(Path(tmp), args.rows, args.dim)
        contenders = {
            'python -c "import torch"': [py, "-c", "import torch; print('ok')"],
            "mmcli retrieve --id (first result)": [
                py,
                "-m",
                "mmcli",
                "retrieve",
                "--index",
                str(index),
                "--id",
                "item00042",
                "-k",
                "10",
                "-q",
            ],  # fmt: skip
            "mmcli retrieve --help": [py, "-m", "mmcli", "retrieve", "--help"],
            "mmcli --help": [py, "-m", "mmcli", "--help"],
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for name, cmd in contenders.items():
                times[name].append(first_line_seconds(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"start-up, median of {args.repeats} (index: {args.rows} x {args.dim} float16)")
    for name, v in times.items():
        spread = f"{min(v):.2f}–{max(v):.2f}"
        print(f"  {name:<40} {med[name]:6.2f} s   (range {spread})")
    torch_s = med['python -c "import torch"']
    print(
        f"  retrieve − import torch: {med['mmcli retrieve --id (first result)'] - torch_s:+.2f} s"
    )


if __name__ == "__main__":
    main()
