"""distill on the toy data: a fuse-train teacher, a student with at most 1/5 of its
parameters distilled from it, the same student trained without a teacher for the same
steps, and a cross-modal run (image -> audio) whose audio lands in the teacher's space.

    python benchmarks/bench_distill.py                 # everything, in benchmarks/out/distill
    python benchmarks/bench_distill.py --reuse         # keep data / teacher / runs already there

Every step is the real command line (printed on stderr), so the figures are what a user
gets:

1. ``examples/toydata.py --items 2000`` and ``mmcli preprocess`` (64 px images, 1 s audio);
2. the teacher: ``mmcli fuse-train --pairs image-text`` (convnet + transformer);
3. the student: ``mmcli distill --student ... --cache-teacher`` (report.json: parameters,
   encode rows/s, test-split metrics of teacher and student, retention);
4. the baseline: ``mmcli fuse-train`` with the student's encoders, embed width, batch size
   and number of steps, evaluated with the same function on the same test items, and
   timed the same way;
5. cross-modal: ``mmcli distill --from image --to audio``: audio -> text recall on the test
   split, though no audio-text pair was ever trained on.

Goals (issue 5): the student keeps >= 90% of the teacher's held-out text -> image recall@1
and encodes >= 3x faster. The table goes to stdout, the figures to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = {
    "image": "convnet:stem_stride=2,grid=4",
    "text": "transformer:width=128,depth=2",
}
# every teacher encoder a quarter as wide, and the text transformer one layer deep (the text
# tower's cost is mostly per-layer, so width alone leaves it only ~2x faster)
STUDENT = ["derive:0.25", "text=transformer:width=32,depth=1"]
THREADS = {"n": 1}  # torch threads of the training subprocesses (--threads)
KEY = "image-text/image_retrieval_recall@1"  # text -> image recall@1


def sh(*args: str, log: Path | None = None) -> str:
    cmd = [str(a) for a in args]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS["n"])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if log is not None:
        log.write_text(r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def mmcli(*args, log=None) -> str:
    return sh(sys.executable, "-m", "mmcli", *args, log=log)


def fresh(path: Path, reuse: bool) -> bool:
    """True when ``path`` must be (re)built."""
    return not (reuse and path.exists())


def evaluate_alone(alone: Path, report: dict, tensors: Path) -> dict:
    """The no-teacher student: the report's test metrics, computed the same way."""
    from mmcli.models import MultimodalModel
    from mmcli.train.data import load_dataset
    from mmcli.train.distill.report import count_parameters
    from mmcli.train.evaluation import evaluate_model

    ds = load_dataset([str(tensors)])
    test = ds.subset(report["split"])
    model = MultimodalModel.from_checkpoint(alone / "model.safetensors")
    student = MultimodalModel.from_checkpoint(report["student_model"])
    return {
        "model": str(alone / "model.safetensors"),
        "parameters": count_parameters(model),
        "metrics": evaluate_model(model, ds, test, [("image", "text")]),
        "same_architecture": {k: v["config"] for k, v in model.config.encoders.items()}
        == {k: v["config"] for k, v in student.config.encoders.items()},
    }


def throughput(paths: dict[str, str], tensors: Path, batch_size: int, threads: int) -> dict:
    """rows/s of model.encode per modality (image, text) and over both, with ``threads``
    torch threads: the same function as distill's report, all models interleaved."""
    import torch

    from mmcli.models import MultimodalModel
    from mmcli.train.data import load_dataset
    from mmcli.train.distill.report import encode_throughput

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ds = load_dataset([str(tensors)])
        models = {n: MultimodalModel.from_checkpoint(p) for n, p in paths.items()}
        named = {f"{n}.{m}": models[n] for n in models for m in ("image", "text")}
        rates = encode_throughput(
            named,
            {k: k.split(".")[1] for k in named},
            ds,
            ds.subset("train"),
            batch_size=batch_size,
            max_rows=2048,
            repeats=3,
            device=torch.device("cpu"),
        )
    finally:
        torch.set_num_threads(before)
    out = {}
    for n in paths:
        mine = {m: rates[f"{n}.{m}"] for m in ("image", "text")}
        rows = sum(v["rows"] for v in mine.values())
        secs = sum(v["rows"] / v["rows_per_s"] for v in mine.values())
        out[n] = {m: round(v["rows_per_s"], 1) for m, v in mine.items()}
        out[n]["all"] = round(rows / secs, 1)
    return out


def table(report: dict, alone: dict, cross: dict | None, speed: dict) -> str:
    t, s = report["teacher"], report["student"]
    nan = float("nan")

    def row(name, key, side, ret=None):
        m = side["metrics"]
        rates = " | ".join(
            f"{speed[th][key]['image']:,.0f} / {speed[th][key]['text']:,.0f} / {speed[th][key]['all']:,.0f}"
            for th in sorted(speed)
        )
        return (
            f"| {name} | {side['parameters']:,} | {rates} "
            f"| {m.get(KEY, nan):.3f} | {m.get('image-text/text_retrieval_recall@1', nan):.3f} "
            f"| {m.get('image-text/mean_recall@5', nan):.3f} "
            f"| {'' if ret is None else f'{ret:.0%}'} |"
        )

    t1 = t["metrics"].get(KEY) or nan
    threads = " | ".join(
        f"rows/s image / text / all, {th} thread{'s' * (th > 1)}" for th in sorted(speed)
    )
    lines = [
        f"{report['split']} split: {report['items']} items; t->i R@1 = text -> image recall@1 ({KEY})",
        "",
        f"| model | params | {threads} | t->i R@1 | i->t R@1 | mean R@5 | retention t->i R@1 |",
        "|---|---:|" + "---:|" * len(speed) + "---:|---:|---:|---:|",
        row("teacher (fuse-train)", "teacher", t),
        row("student, distilled", "student", s, s["metrics"].get(KEY, 0) / t1),
        row("student, no teacher, same steps", "alone", alone, alone["metrics"].get(KEY, 0) / t1),
        "",
        f"student / teacher parameters: {report['parameter_ratio']:.1%}; encode speedup "
        + ", ".join(
            f"{th} thread{'s' * (th > 1)}: "
            + " / ".join(
                f"{speed[th]['student'][m] / speed[th]['teacher'][m]:.1f}x"
                for m in ("image", "text", "all")
            )
            + " (image / text / all)"
            for th in sorted(speed)
        ),
    ]
    if cross:
        cm = cross["cross_modal"]
        lines += [
            "",
            f"cross-modal (--from image --to audio, {cross['student']['trained_parameters']:,} new "
            f"parameters, never trained on an audio-text pair), {cm['split']} split:",
            "  "
            + ", ".join(
                f"{k} {v:.3f}" for k, v in cm.items() if "recall" in k and k.startswith("audio->")
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distill"))
    ap.add_argument("--reuse", action="store_true", help="keep what OUT already holds")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--teacher-epochs", type=int, default=25)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=50, help="student (and baseline) epochs")
    ap.add_argument("--lr", type=float, default=3e-3, help="student (and baseline) peak lr")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--student", action="append", help=f"--student values (default {STUDENT})")
    ap.add_argument("--loss", default=None, help="distill --loss (default: distill's)")
    ap.add_argument("--temperature", default="1")
    ap.add_argument("--cross-epochs", type=int, default=10)
    ap.add_argument("--cross-student", default="audio=melcnn:width=16,depth=3,dim=128")
    ap.add_argument("--no-cross", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the training runs (on a shared machine one thread per run "
        "avoids waiting for a descheduled second thread at every op)",
    )
    args = ap.parse_args()
    THREADS["n"] = args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw, tensors, runs = out / "raw", out / "tensors", out / "runs"
    bs = str(args.batch_size)

    if fresh(tensors, args.reuse):
        sh(sys.executable, "examples/toydata.py", raw, "--items", args.items, "--quiet")
        mmcli(
            "preprocess", raw / "manifest.jsonl", "-o", tensors, "--image-size", "64",
            "--audio-seconds", "1", "--workers", "2", "--overwrite", "-q",
        )  # fmt: skip
    teacher = runs / "teacher" / "model.safetensors"
    if fresh(teacher, args.reuse):
        mmcli(
            "fuse-train", tensors, "-o", runs / "teacher", "--overwrite", "--pairs", "image-text",
            "--encoder", f"image={TEACHER['image']}", "--encoder", f"text={TEACHER['text']}",
            "--epochs", args.teacher_epochs, "--batch-size", bs, "--lr", args.teacher_lr,
            "--device", "cpu",
            log=out / "teacher.log",
        )  # fmt: skip
    students = args.student or STUDENT
    if fresh(runs / "student" / "report.json", args.reuse):
        extra = ["--loss", args.loss] if args.loss else []
        mmcli(
            "distill", tensors, "--teacher", teacher, "-o", runs / "student", "--overwrite",
            *[x for s in students for x in ("--student", s)], *extra,
            "--temperature", args.temperature, "--cache-teacher",
            "--epochs", args.epochs, "--batch-size", bs, "--lr", args.lr, "--device", "cpu",
            log=out / "student.log",
        )  # fmt: skip
    report = json.loads((runs / "student" / "report.json").read_text())
    steps = report["train"]["steps"]

    from mmcli.models import MultimodalModel

    student = MultimodalModel.from_checkpoint(report["student_model"])
    encoders = []
    for m, spec in student.config.encoders.items():
        opts = ",".join(f"{k}={v}" for k, v in spec["config"].items() if v is not None)
        encoders += ["--encoder", f"{m}={spec['name']}:{opts}"]
    if fresh(runs / "alone" / "model.safetensors", args.reuse):
        mmcli(
            "fuse-train", tensors, "-o", runs / "alone", "--overwrite", "--pairs", "image-text",
            *encoders, "--embed-dim", student.config.embed_dim,
            "--max-steps", steps, "--batch-size", bs, "--lr", args.lr, "--device", "cpu",
            log=out / "alone.log",
        )  # fmt: skip
    alone = evaluate_alone(runs / "alone", report, tensors)
    paths = {
        "teacher": str(teacher),
        "student": report["student_model"],
        "alone": str(runs / "alone" / "model.safetensors"),
    }
    # the machine is shared: two threads also measure how often the other one is descheduled
    speed = {th: throughput(paths, tensors, args.batch_size, th) for th in (1, 2)}

    cross = None
    if not args.no_cross:
        if fresh(runs / "audio" / "report.json", args.reuse):
            mmcli(
                "distill", tensors, "--teacher", teacher, "-o", runs / "audio", "--overwrite",
                "--from", "image", "--to", "audio", "--student", args.cross_student,
                "--epochs", args.cross_epochs, "--batch-size", bs, "--lr", args.lr,
                "--device", "cpu",
                log=out / "audio.log",
            )  # fmt: skip
        cross = json.loads((runs / "audio" / "report.json").read_text())

    result = {
        "distill": report,
        "no_teacher": alone,
        "cross_modal": cross,
        "encode_rows_per_s": {f"{th}_threads": v for th, v in speed.items()},
        "args": vars(args),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    t1 = report["teacher"]["metrics"].get(KEY)
    s1 = report["student"]["metrics"].get(KEY)
    goals = {
        "params <= 1/5": report["parameter_ratio"] <= 0.2,
        "retention >= 90%": bool(t1) and s1 / t1 >= 0.9,
        **{
            f"speedup >= 3x ({th} thread{'s' * (th > 1)})": speed[th]["student"]["all"]
            >= 3 * speed[th]["teacher"]["all"]
            for th in sorted(speed)
        },
        "beats no-teacher": s1 > alone["metrics"].get(KEY, 0),
    }
    print(table(report, alone, cross, speed))
    print("\ngoals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))


if __name__ == "__main__":
    main()
