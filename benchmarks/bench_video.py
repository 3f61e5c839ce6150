"""Video: frames decoded per second against a bare PyAV loop, and text -> video recall with
mean vs attention pooling over frames.

    python benchmarks/bench_video.py decode [--clips 24] [--seconds 10] [--repeats 3]
    python benchmarks/bench_video.py pooling [--items 300] [--epochs 40] [--frames 8]

``decode`` writes ``--clips`` H.264 clips (320x240, 25 fps, a keyframe every 2 s, moving
shapes) and times, interleaved and repeated:

* bare: the loop a user writes with PyAV at its best (``thread_type = "AUTO"``): decode
  the clip forward, keep the frame nearest each of the 8 segment centres, ``to_image()``,
  then the same resize + crop to 112 px as mmcli (so only the decoding differs);
* mmcli: ``VideoTransform`` in this process (the same sampling, seeking over long gaps);
* preprocess: mmcli's preprocess (the library call ``mmcli preprocess`` makes, so without
  the command's ~1.5 s start-up) of the clips' manifest into shards with ``--workers 0``
  and ``--workers 2`` (a fresh output folder each time).

It prints the median sampled frames per second and clips per second of each, and the
ratios to bare (goals: >= 0.9x, and >= 1.5x with --workers 2).

``pooling`` makes the toy videos (examples/toyvideo.py: a motion and its reverse show the
same frames in the opposite order), trains ``fuse-train --pairs video-text`` twice with the
same settings but ``frames:...:pool=mean`` and ``frames:...:pool=attention`` (each clip's
reverse in its batch, ``--batch-with swap_id``, unless ``--no-pair-batches``), and prints
text -> video R@1 / R@5 on the test split (eval's own metrics) for both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def write_clips(folder: Path, clips: int, seconds: float, fps: int = 25) -> Path:
    import av
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for c in range(clips):
        path = folder / f"clip{c:03d}.mp4"
        rows.append({"id": f"clip{c:03d}", "video": path.name, "text": f"clip {c}"})
        if path.exists():
            continue
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        with av.open(str(path), "w") as out:
            v = out.add_stream("libx264", rate=Fraction(fps))
            v.width, v.height, v.pix_fmt = 320, 240, "yuv420p"
            v.options = {"crf": "23", "preset": "veryfast", "g": str(2 * fps)}
            for k in range(int(seconds * fps)):
                im = Image.new("RGB", (320, 240), (230, 230, 220))
                x = 20 + (k * 3) % 260
                ImageDraw.Draw(im).ellipse((x, 80, x + 60, 140), fill=colour)
                for p in v.encode(av.VideoFrame.from_image(im)):
                    out.mux(p)
            for p in v.encode():
                out.mux(p)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def bare(paths: list[Path], frames: int, size: int) -> int:
    """The PyAV loop a user writes: decode forward, keep the nearest frame per target."""
    import av

    from mmcli.data.image import resize_crop

    n = 0
    for p in paths:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            duration = float(s.duration * s.time_base)
            targets = [(i + 0.5) * duration / frames for i in range(frames)]
            picked, prev, j = [], None, 0
            for f in c.decode(s):
                t = float(f.time)
                while j < frames and t >= targets[j]:
                    best = f if prev is None or t - targets[j] < targets[j] - prev[0] else prev[1]
                    picked.append(best)
                    j += 1
                if j == frames:
                    break
                prev = (t, f)
            while len(picked) < frames:
                picked.append(prev[1])
            out = np.stack([resize_crop(f.to_image(), size) for f in picked])
            n += out.shape[0]
    return n


def decode(args) -> None:
    from mmcli.data.image import ImageTransform
    from mmcli.data.video import VideoTransform

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-video-"))
    manifest = write_clips(work / "clips", args.clips, args.seconds)
    paths = [
        manifest.parent / json.loads(line)["video"] for line in manifest.read_text().splitlines()
    ]
    transform = VideoTransform(8, image=ImageTransform(112))

    def ours() -> int:
        return sum(transform(p).shape[0] for p in paths)

    def library(workers: int):
        from mmcli.preprocess import PreprocessConfig, preprocess

        def run() -> int:
            out = work / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            config = PreprocessConfig(image_size=112, frames=8, workers=workers)
            summary = preprocess(str(manifest), str(out), config=config)
            return 8 * summary["kept"]

        return run

    runs = {"bare PyAV loop": lambda: bare(paths, 8, 112), "mmcli VideoTransform": ours,
            "preprocess --workers 0": library(0), "preprocess --workers 2": library(2)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t)
            assert n == 8 * len(paths)
    base = statistics.median(times["bare PyAV loop"])
    print(f"{len(paths)} clips of {args.seconds:g} s, 320x240 H.264 25 fps, 8 frames each -> 112 px; "
          f"medians of {args.repeats}")  # fmt: skip
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:24s} {8 * len(paths) / m:8.1f} frames/s  {len(paths) / m:6.2f} clips/s  "
              f"{base / m:5.2f}x bare")  # fmt: skip


def _mmcli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mmcli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return r.stdout


def pooling(args) -> None:
    from toyvideo import generate_videos

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-video-pool-"))
    manifest = work / "toy" / "manifest.jsonl"
    if not manifest.exists():
        generate_videos(work / "toy", items=args.items, seed=0, image_size=(48, 48), frames=16)
    tensors = work / "tensors"
    if not (tensors / "preprocess.json").exists():
        _mmcli("preprocess", str(manifest), "-o", str(tensors), "--image-size", "32",
               "--frames", str(args.frames), "-q")  # fmt: skip
    print(f"toy videos: {args.items} clips, {args.frames} frames of 32 px; fuse-train "
          f"--pairs video-text --epochs {args.epochs}"
          + (" --batch-with swap_id" if args.pair_batches else "")
          + "; text -> video on the test split")  # fmt: skip
    for pool in ("mean", "attention"):
        run = work / f"run-{pool}"
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        _mmcli("fuse-train", str(tensors), "-o", str(run), "--pairs", "video-text",
               "--encoder", f"video=frames:convnet:width=16,grid=4,stem_stride=1:pool={pool}",
               "--epochs", str(args.epochs), "--batch-size", "32", "--seed", "0", "-q",
               *(["--batch-with", "swap_id"] if args.pair_batches else []))  # fmt: skip
        seconds = time.perf_counter() - t
        feats = work / f"feats-{pool}"
        shutil.rmtree(feats, ignore_errors=True)
        _mmcli(
            "extract",
            str(tensors),
            "--model",
            str(run / "model.safetensors"),
            "-o",
            str(feats),
            "-q",
        )
        result = json.loads(_mmcli("eval", str(feats), "--query", "text", "--target", "video",
                                   "--split", "test", "-q"))  # fmt: skip
        m = result["metrics"]
        print(f"  pool={pool:9s} text->video R@1 {m['video_retrieval_recall@1']:.3f}  "
              f"R@5 {m['video_retrieval_recall@5']:.3f}  video->text R@1 "
              f"{m['text_retrieval_recall@1']:.3f}  (train {seconds:.0f} s)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--clips", type=int, default=24)
    d.add_argument("--seconds", type=float, default=10.0)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--keep")
    p = sub.add_parser("pooling")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument(
        "--no-pair-batches",
        dest="pair_batches",
        action="store_false",
        help="do not put each clip's reverse in its batch (--batch-with swap_id)",
    )
    p.add_argument("--keep")
    args = ap.parse_args()
    decode(args) if args.what == "decode" else pooling(args)


if __name__ == "__main__":
    main()
