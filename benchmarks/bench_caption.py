"""Captioning and transcription on the toy data: the attention decoder (Show, Attend and
Tell) against the pooled one (Show and Tell) on the same image encoder, audio -> transcript,
and decoding speed with and without the KV cache.

    python benchmarks/bench_caption.py              # everything, in benchmarks/out/caption
    python benchmarks/bench_caption.py --reuse      # keep data / runs already there

Every step is the real command line (printed on stderr), so the figures are what a user
gets:

1. ``examples/toydata.py --items 2000``; a training manifest with each item's canonical
   English caption (the toy grammar's first template) and ``mmcli preprocess`` of it
   (64 px images, 1 s audio at 8 kHz); the test split of the full manifest (all four
   captions of an item, three English and one Chinese) preprocessed as the references;
2. ``mmcli fuse-train --objective caption --caption-decoder attention`` and ``pooled`` on
   the same image encoder (a convnet with global average pooling), and
   ``--caption-from audio`` with a melcnn (no label smoothing: one caption per item);
3. ``mmcli caption --split test`` (greedy) and ``mmcli eval --task captioning`` against
   every reference of each test item: BLEU-4, CIDEr-D (and the rest), WER for audio;
4. attribute binding: each generated caption parsed with the toy grammar
   (``examples/toy_grammar.py``) and compared with the item's ground-truth objects;
   ``binding``: the caption names the scene's shapes with the right colour each;
   ``exact``: shape, colour, size and position of every object right;
5. decoding speed of the attention model: generated tokens/s with and without the KV cache,
   batch 1 and 64.

Goals (issue 14): the attention decoder binds colour to shape on >= 90% of the test images
and beats ``pooled`` on CIDEr. The table goes to stdout, the figures to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

IMAGE_ENCODER = "convnet:stem_stride=2,width=16"  # 4x4 tokens of 128 channels at 64 px
AUDIO_ENCODER = "melcnn:width=8,depth=3,dim=64"  # 7 time tokens of 1 s at 8 kHz
DECODER = "width=96,depth=2,heads=2,mlp_ratio=2"
THREADS = {"n": 1}


def sh(*args: str, stdout: Path | None = None) -> str:
    cmd = [str(a) for a in args]
    print("$ " + " ".join(cmd) + (f" > {stdout}" if stdout else ""), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS["n"])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    if stdout is not None:
        stdout.write_text(r.stdout, encoding="utf-8")
    return r.stdout


def mmcli(*args, stdout: Path | None = None) -> str:
    return sh(sys.executable, "-m", "mmcli", *args, stdout=stdout)


def fresh(path: Path, reuse: bool) -> bool:
    return not (reuse and path.exists())


def canonical_manifest(manifest: Path) -> Path:
    """Each item with its first (canonical English) caption only, next to the original."""
    out = manifest.with_name("train-canonical.jsonl")
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["text"] = [r["text"][0]]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return out


def binding(captions: Path, manifest: Path) -> dict:
    """Toy-grammar judgement of every generated caption, overall and per subset."""
    from toy_grammar import judge

    items = {r["id"]: r for r in map(json.loads, manifest.read_text(encoding="utf-8").splitlines())}
    counts: dict[str, dict[str, int]] = {}
    for line in captions.read_text(encoding="utf-8").splitlines():
        c = json.loads(line)
        item = items[c["id"]]
        verdict = judge(c["caption"], item["objects"])
        for group in ("all", item["subset"]):
            g = counts.setdefault(group, {"n": 0, "parsed": 0, "binding": 0, "exact": 0})
            g["n"] += 1
            for k, v in verdict.items():
                g[k] += int(v)
    return {
        group: {k: (v / g["n"] if k != "n" else v) for k, v in g.items()}
        for group, g in counts.items()
    }


def speed(model: Path, tensors: Path, threads: int, batches=(1, 64)) -> dict:
    """Generated tokens/s (the end token counted) of greedy decoding with and without the
    KV cache, on test images (64 for batch 64; 16 one at a time for batch 1)."""
    import torch

    from mmcli.formats.tensorfile import open_tensors
    from mmcli.generate import Captioner, DecodeOptions
    from mmcli.generate.captioner import first_rows, select_items

    torch.set_num_threads(threads)
    ts = open_tensors(str(tensors))
    keep = select_items(ts, "test")
    rows = []
    for _, data, first, items in first_rows(ts, "image"):
        rows += [data[int(first[j])] for j in range(len(first)) if keep[items[j]]]
    images = torch.stack(rows[:64])
    out: dict[str, dict] = {}
    for cache in (True, False):
        for b in batches:
            cap = Captioner.load(str(model), DecodeOptions(cache=cache), batch_size=b)
            x = images[: 16 if b == 1 else 64]
            cap.generate(x[:b])  # warm up
            start = time.perf_counter()
            gen = cap.generate(x)
            seconds = time.perf_counter() - start
            tokens = sum(len(g.tokens) + g.finished for g in gen)
            out[f"{'cache' if cache else 'no cache'}, batch {b}"] = {
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
            }
    return out


def train(out: Path, tensors: Path, name: str, args, *extra: str) -> Path:
    run = out / name
    if fresh(run / "model.safetensors", args.reuse):
        mmcli(
            "fuse-train", tensors, "-o", run, "--objective", "caption",
            "--encoder", "text=tiny", *extra,
            "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed,
            "--label-smoothing", args.label_smoothing,
            "--overwrite", "-q",
            stdout=run.with_suffix(".train.json"),
        )  # fmt: skip
    return run / "model.safetensors"


def caption_and_score(model: Path, tensors: Path, refs: Path, beam: int = 1) -> tuple[Path, dict]:
    captions = model.parent / ("test-captions.jsonl" if beam == 1 else f"test-beam{beam}.jsonl")
    mmcli(
        "caption", tensors, "--model", model, "--split", "test", "--beam", beam, "-q",
        stdout=captions,
    )  # fmt: skip
    result = json.loads(
        mmcli("eval", refs, "--task", "captioning", "--captions", captions, "--split", "test", "-q")
    )
    return captions, result


def table(res: dict) -> str:
    lines = [
        f"test split: {res['test_items']} images ({res['two_shape']} with two shapes); "
        "references: all 4 captions of an item (3 English, 1 Chinese)",
        "",
        "| decoder | params | BLEU-4 | CIDEr-D | ROUGE-L | binding (all) | binding (two shapes) "
        "| exact (all) | parsed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("attention", "pooled"):
        r = res[name]
        m, b = r["metrics"], r["binding"]
        lines.append(
            f"| {name} | {r['parameters']:,} | {m['Bleu_4']:.3f} | {m['CIDEr']:.3f} "
            f"| {m['ROUGE_L']:.3f} | {b['all']['binding']:.1%} "
            f"| {b.get('two-shape', {}).get('binding', float('nan')):.1%} "
            f"| {b['all']['exact']:.1%} | {b['all']['parsed']:.1%} |"
        )
    if "audio" in res:
        a = res["audio"]
        lines += [
            "",
            f"audio -> transcript ({a['parameters']:,} params): WER {a['metrics']['WER']:.3f} "
            f"against the closest reference, BLEU-4 {a['metrics']['Bleu_4']:.3f}, "
            f"exact scene {a['binding']['all']['exact']:.1%}",
        ]
    if "speed" in res:
        lines += ["", f"greedy decoding, attention model, {THREADS['n']} thread(s):"]
        for k, v in res["speed"].items():
            lines.append(f"  {k:<20} {v['tokens_per_s']:>9,.0f} tokens/s ({v['tokens']} tokens)")
    goals = res["goals"]
    lines += [
        "",
        f"goal: attention binding >= 90%: {'met' if goals['binding'] else 'NOT met'}; "
        f"attention beats pooled on CIDEr-D: {'met' if goals['cider'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def parameters(model: Path) -> int:
    from mmcli.models import MultimodalModel

    m = MultimodalModel.from_checkpoint(model)
    src = m.captioner.config.source
    return sum(p.numel() for p in [*m.captioner.parameters(), *m.encoders[src].parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "caption"))
    ap.add_argument("--reuse", action="store_true", help="keep what OUT already holds")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=12, help="image captioners")
    ap.add_argument("--audio-epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="0: each training item has one caption, so the target is certain",
    )
    ap.add_argument("--decoder", default=DECODER, help="options of both decoders")
    ap.add_argument("--image-encoder", default=IMAGE_ENCODER)
    ap.add_argument("--audio-encoder", default=AUDIO_ENCODER)
    ap.add_argument("--beam", type=int, default=1, help="also caption with this beam (> 1)")
    ap.add_argument("--no-audio", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine more threads wait on each other)",
    )
    args = ap.parse_args()
    THREADS["n"] = args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = "python benchmarks/bench_caption.py " + " ".join(sys.argv[1:])
    print(f"command: {command}", file=sys.stderr)

    manifest = out / "data" / "manifest.jsonl"
    if fresh(manifest, args.reuse):
        sh(sys.executable, "examples/toydata.py", out / "data", "--items", args.items,
           "--seed", args.seed, "--quiet")  # fmt: skip
    train_manifest = canonical_manifest(manifest)
    tensors, refs = out / "tensors", out / "test-refs"
    prep = ["--image-size", "64", "--audio-seconds", "1", "--sample-rate", "8000", "--workers", "2"]
    if fresh(tensors / "preprocess.json", args.reuse):
        mmcli("preprocess", train_manifest, "-o", tensors, *prep, "--overwrite", "-q")
    if fresh(refs / "preprocess.json", args.reuse):
        mmcli("preprocess", manifest, "-o", refs, "--split", "test", *prep, "--overwrite", "-q")

    image = ["--pairs", "image-text", "--encoder", f"image={args.image_encoder}",
             "--epochs", args.epochs]  # fmt: skip
    res: dict = {"command": command, "threads": args.threads}
    for kind in ("attention", "pooled"):
        model = train(
            out, tensors, kind, args, *image, "--caption-decoder", f"{kind}:{args.decoder}"
        )
        captions, result = caption_and_score(model, tensors, refs)
        res[kind] = {
            "model": str(model),
            "parameters": parameters(model),
            "metrics": result["metrics"],
            "binding": binding(captions, manifest),
        }
        if args.beam > 1:
            _, beam = caption_and_score(model, tensors, refs, beam=args.beam)
            res[kind][f"beam{args.beam}_metrics"] = beam["metrics"]
        res["test_items"] = result["info"]["items"]
    res["two_shape"] = res["attention"]["binding"].get("two-shape", {}).get("n", 0)
    if not args.no_audio:
        audio = [
            "--pairs", "audio-text", "--caption-from", "audio",
            "--encoder", f"audio={args.audio_encoder}", "--epochs", args.audio_epochs,
            "--caption-decoder", f"attention:{args.decoder}",
        ]  # fmt: skip
        model = train(out, tensors, "audio", args, *audio)
        captions, result = caption_and_score(model, tensors, refs)
        res["audio"] = {
            "model": str(model),
            "parameters": parameters(model),
            "metrics": result["metrics"],
            "binding": binding(captions, manifest),
        }
    if not args.no_speed:
        print("decoding speed ...", file=sys.stderr, flush=True)
        res["speed"] = speed(Path(res["attention"]["model"]), tensors, args.threads)
    res["goals"] = {
        "binding": res["attention"]["binding"]["all"]["binding"] >= 0.9,
        "cider": res["attention"]["metrics"]["CIDEr"] > res["pooled"]["metrics"]["CIDEr"],
    }
    res["seconds"] = round(time.perf_counter() - started, 1)
    (out / "bench.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(table(res))
    print(f"\n{res['seconds']:.0f} s in all; figures in {out / 'bench.json'}")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
