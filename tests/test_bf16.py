"""``--precision bf16`` on the CPU: the model runs in bfloat16 (its weights cast, not
autocast) in extract, retrieve's query encoding and eval, for built-in encoders and
library adapters alike; the features keep a per-row cosine >= 0.999 to fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcli.formats.tensorfile import TensorSet


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


@pytest.mark.parametrize(
    "encoders",
    [
        {
            "image": "convnet:width=8",
            "text": "transformer:width=64,depth=2",
            "audio": "melcnn:width=8,depth=2",
        },
        {"image": "resnet18", "text": "bow"},
    ],
)
def test_extract_bf16_on_the_cpu_keeps_the_features(toy_tensors, tmp_path, encoders):
    from mmcli.extract import extract

    outs = {}
    for precision in ("fp32", "bf16"):
        s = extract(toy_tensors, tmp_path / precision, encoders=encoders, device="cpu", precision=precision,
                    dtype="float32")  # fmt: skip
        assert s["precision"] == precision
        outs[precision] = TensorSet(tmp_path / precision)
    for m in encoders:
        assert _cos(outs["fp32"].table(m)[0], outs["bf16"].table(m)[0]) >= 0.999


def test_bf16_casts_the_model_and_keeps_the_normalisation_in_fp32():
    from mmcli import runtime
    from mmcli.models import build_model

    model = build_model({"image": "tiny", "audio": "tiny"})
    runtime.cast_for_inference(model, "bf16", torch.device("cpu"))
    assert model.encoders["image"].conv1.weight.dtype == torch.bfloat16  # not autocast
    assert model.encoders["image"].mean.dtype == torch.float32
    assert model.encoders["audio"].logmel.fb.dtype == torch.float32
    same = build_model({"image": "tiny"})
    assert runtime.cast_for_inference(same, "fp32", torch.device("cpu")) is same
    assert same.encoders["image"].conv1.weight.dtype == torch.float32


def test_a_fusion_model_and_a_callers_model_object(toy_tensors, tmp_path):
    from mmcli.extract import extract
    from mmcli.models import ModelConfig, MultimodalModel, build_model

    base = build_model({"image": "tiny", "text": "tiny"})
    heads = {
        m: {"kind": "linear", "in_dim": 16, "out_dim": 8, "hidden": None} for m in ("image", "text")
    }
    config = ModelConfig(encoders=base.config.encoders, heads=heads, embed_dim=8,
                         fusion={"kind": "attention", "width": 16, "depth": 1, "heads": 2})  # fmt: skip
    torch.manual_seed(0)
    model = MultimodalModel(config).eval()
    for precision in ("fp32", "bf16"):
        extract(
            toy_tensors,
            tmp_path / precision,
            model,
            device="cpu",
            precision=precision,
            dtype="float32",
        )
    assert model.encoders["image"].conv1.weight.dtype == torch.float32  # a copy was cast
    a, b = TensorSet(tmp_path / "fp32"), TensorSet(tmp_path / "bf16")
    for table in ("image", "text", "fused"):
        assert _cos(a.table(table)[0], b.table(table)[0]) >= 0.999


def test_query_encoding_and_pretrained_adapters_in_bf16(tmp_path):
    pm = pytest.importorskip("pretrained_models")
    pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    from mmcli.models import load_model
    from mmcli.search.queries import QueryEncoder

    cfg, weights = pm.open_clip_model(tmp_path / "oc")
    photos = [str(p) for p in pm.photos(tmp_path / "photos", n=4)]
    captions = ["a photo of a dog", "two cats on a sofa", "a red square"]
    specs = [(f"open_clip:{cfg}", str(weights)), (f"hf:{pm.hf_clip(tmp_path / 'clip')}", None)]
    for spec, w in specs:
        fp32 = QueryEncoder(load_model(spec, weights=w), "cpu")
        bf16 = QueryEncoder(load_model(spec, weights=w), "cpu", precision="bf16")
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        assert _cos(fp32.encode("text", captions), bf16.encode("text", captions)) >= 0.999
        assert _cos(fp32.encode("image", photos), bf16.encode("image", photos)) >= 0.999


def test_eval_and_retrieve_take_precision(cli, toy_tensors, tmp_path):
    for command in ("eval", "retrieve"):
        result = cli(command, "--help")
        assert "--precision" in result.stdout and "bfloat16" in result.stdout


@pytest.mark.parametrize("amx", [False, True])
def test_training_bf16_on_the_cpu_needs_amx(caplog, monkeypatch, amx):
    """fuse-train / distill --precision bf16 on the CPU: autocast with fp32 master weights
    measured 1.5-1.7x fp32 on a CPU with AMX tiles and 0.12-0.14x on one with AVX-512 BF16
    but no AMX (benchmarks/bench_train_bf16.py): bf16 where the tiles are, else fp32 and a
    note that says why; inference keeps its bf16 cast either way. The cached answer stands
    in for the CPU here (test_cpu_amx_reads_this_cpu reads the real one)."""
    import logging

    from mmcli import runtime

    monkeypatch.setattr(runtime, "cpu_amx", lambda: amx)
    with caplog.at_level(logging.INFO, logger="mmcli"):
        got = runtime.check_precision("bf16", torch.device("cpu"))
    if amx:
        assert got == "bf16" and "bf16 autocast on the cpu (AMX)" in caplog.text
    else:
        assert got == "fp32"
        assert "running fp32 on cpu (bf16 autocast measured slower than fp32 on CPUs" in (
            caplog.text
        )
    assert runtime.inference_precision("bf16", torch.device("cpu")) == "bf16"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmcli"):
        assert runtime.check_precision("fp16", torch.device("cpu")) == "fp32"
        assert runtime.inference_precision("fp16", torch.device("cpu")) == "fp32"
    assert "measured slower" not in caplog.text


def test_cpu_amx_reads_this_cpu():
    import os

    from mmcli import runtime

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this system")
    runtime.cpu_amx.cache_clear()
    with open("/proc/cpuinfo") as f:
        assert runtime.cpu_amx() == ("amx_bf16" in f.read().split())


@pytest.mark.parametrize("units", [False, True])
def test_bf16_inference_warns_on_a_cpu_without_bf16_units(caplog, monkeypatch, units):
    """Without AMX / AVX-512 BF16 torch emulates bfloat16 (ViT-B-32 measured 1.1 vs 6.9
    img/s in fp32 on an AVX2-only CPU): bf16 still runs as asked, with one warning line
    saying it is slower and what to use; with the units, no warning. The cached answer
    stands in for the CPU here, the same code reads /proc/cpuinfo on a real one."""
    import logging

    from mmcli import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: units)
    runtime._warn_emulated_bf16.cache_clear()  # once per process: earlier tests may have warned
    with caplog.at_level(logging.WARNING, logger="mmcli"):
        assert runtime.inference_precision("bf16", torch.device("cpu")) == "bf16"
        assert runtime.inference_precision("bf16", torch.device("cpu")) == "bf16"
    warned = caplog.text.count("no bfloat16 units")
    assert warned == (0 if units else 1) and (units or "use --precision fp32" in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmcli"):
        runtime.inference_precision("fp32", torch.device("cpu"))
    assert "bfloat16" not in caplog.text


def test_cpu_bf16_units_reads_this_cpu():
    import os

    from mmcli import runtime

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this system")
    runtime.cpu_bf16_units.cache_clear()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert runtime.cpu_bf16_units() is (" amx_bf16" in flags or " avx512_bf16" in flags)
