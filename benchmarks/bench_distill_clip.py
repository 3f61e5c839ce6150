"""distill from a whole CLIP: an open_clip ViT-B-32 teacher into a small student of mmcli's
own encoders (TinyCLIP / CLIP-KD style), on the toy data, with the real command lines.

    python benchmarks/bench_distill_clip.py [--items 200] [--steps 60] [--student ...] [--reuse]

1. ``examples/toydata.py`` (``--items``) and ``mmcli preprocess --like open_clip:ViT-B-32``
   (224 px, the model's own resize; the captions kept as given for its tokenizer);
2. ``mmcli distill OUT/tensors --teacher open_clip:ViT-B-32 --cache-teacher`` with the
   student ``convnet:width=32,depth=4,dim=256`` + ``transformer:width=256,depth=4`` (or
   ``--student``): the teacher's outputs computed once (its BPE tokenizer on the full
   captions), the student trained ``--steps`` steps, then the report.

From ``report.json``: the parameter ratio (goal: <= 1/5), encode throughput of student vs
teacher (images/s and texts/s, the same rows and batch size, fp32, models interleaved,
median of 3; the teacher's captions tokenized beforehand as the student's byte tokens are)
and the retention of text -> image / image -> text recall on the test split.

**The teacher has random weights** (nothing is downloaded; a random ViT-B-32 costs what the
real one does): its recall on the toy data is near chance, so retention says nothing about
quality here, only that the mechanics run; the parameter ratio and the speed-up are real.
With real weights pass ``--weights FILE``. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the student measured in docs/distill.md (mmcli's registry defaults when it was run)
MEASURED_STUDENT = ["image=convnet:width=32,depth=4,dim=256", "text=transformer:width=256,depth=4"]
KEYS = ("image-text/image_retrieval_recall@1", "image-text/text_retrieval_recall@1",
        "image-text/image_retrieval_recall@5")  # fmt: skip


def sh(*args, log: Path | None = None) -> str:
    cmd = [str(a) for a in args]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if log is not None:
        log.write_text(r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distill_clip"))
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--student", action="append", default=None)
    ap.add_argument("--weights", default=None, help="real ViT-B-32 weights (open_clip state dict)")
    ap.add_argument("--reuse", action="store_true", help="keep the data already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, mm = sys.executable, [sys.executable, "-m", "mmcli"]
    if not (args.reuse and (out / "tensors").exists()):
        sh(py, "examples/toydata.py", out / "data", "--items", args.items, "--no-audio", "--quiet")
        sh(*mm, "preprocess", out / "data" / "manifest.jsonl", "-o", out / "tensors",
           "--like", "open_clip:ViT-B-32", "--overwrite")  # fmt: skip
    student = []
    for s in args.student or MEASURED_STUDENT:
        student += ["--student", s]
    weights = ["--weights", args.weights] if args.weights else []
    stdout = sh(*mm, "distill", out / "tensors", "--teacher", "open_clip:ViT-B-32", *weights,
                "-o", out / "run", "--overwrite", *student, "--cache-teacher",
                "--max-steps", args.steps, "--batch-size", args.batch_size, "--lr", "2e-3",
                "--device", "cpu", "--log-every", 10, log=out / "distill.log")  # fmt: skip
    report = json.loads(stdout)
    t, s = report["teacher"], report["student"]
    rates = {m: {"teacher": t["extract_rows_per_s"].get(m), "student": s["extract_rows_per_s"].get(m),
                 "speedup": report["speedup"].get(m)} for m in ("image", "text")}  # fmt: skip
    result = {
        "teacher": "open_clip:ViT-B-32"
        + (" (weights given)" if args.weights else " (random init)"),
        "student": s["encoders"],
        "teacher_parameters": t["parameters"],
        "student_parameters": s["parameters"],
        "parameter_ratio": report["parameter_ratio"],
        "encode_rows_per_s": rates,
        "encode_note": "fp32, the same rows and batch size, interleaved, median of 3; "
        "image = images/s, text = texts/s",
        "recall": {
            k: {
                "teacher": t["metrics"].get(k),
                "student": s["metrics"].get(k),
                "retention": report["retention"].get(k),
            }
            for k in KEYS
        },  # fmt: skip
        "split": report["split"],
        "items": report["items"],
        "train": report["train"],
        "note": None
        if args.weights
        else "random teacher: recall and retention show only that the mechanics run; "
        "the parameter ratio and speed-up are meaningful",
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
