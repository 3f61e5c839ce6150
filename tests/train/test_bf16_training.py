"""``fuse-train --precision bf16`` on a CPU with AMX: bf16 autocast with fp32 master
weights. The forward runs its products in bfloat16, the gradient stays close to fp32's,
the gradient cache still gives the whole batch's gradient, and the checkpoint is fp32.
These run the real autocast kernels on any CPU (emulated where there are no bf16 units:
slower, the same numbers); only the AMX check is stood in for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmcli import runtime
from mmcli.runtime import dist_info
from mmcli.train.fuse import FuseConfig, FuseTask, fuse_train, setup_data, setup_model
from mmcli.train.gradcache import GradCache
from mmcli.train.loop import LoopConfig
from mmcli.train.sampler import Batch, BatchSampler

ENCODERS = {"image": "convnet:width=8,depth=2,dim=32", "text": "transformer:width=32,depth=1"}
CPU = torch.device("cpu")


def _task(toy_tensors, n=3, b=8):
    torch.manual_seed(0)
    cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(ENCODERS), embed_dim=16)
    data = setup_data([str(toy_tensors)], None, cfg)
    task = FuseTask(setup_model(data, cfg), cfg, data, seed=0).train()
    sampler = BatchSampler(data.dataset, data.train, b, seed=0, modalities=data.modalities)
    return task, [sampler.make_batch(0, s) for s in range(n)]


def _grads(task) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad(set_to_none=True)
    return out


def _full(task, batch, precision: str) -> dict[str, torch.Tensor]:
    with runtime.autocast(CPU, precision, training=True):
        loss, _ = task(batch)
    loss.backward()
    return _grads(task)


def _rel(a: dict, b: dict) -> float:
    """|a - b| / |b| over all the parameters' gradients as one vector."""
    assert a.keys() == b.keys()
    flat = [torch.cat([d[k].flatten() for k in sorted(d)]) for d in (a, b)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


def _cached(task, batches, precision: str) -> dict[str, torch.Tensor]:
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    GradCache(task, len(batches), scaler, CPU, precision, dist_info()).backward(batches)
    return _grads(task)


def test_training_autocast_runs_bf16_products_on_the_cpu_and_inference_does_not():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with runtime.autocast(CPU, "bf16", training=True):
        assert lin(x).dtype == torch.bfloat16
    with runtime.autocast(CPU, "bf16"):  # inference casts the model instead
        assert lin(x).dtype == torch.float32
    with runtime.autocast(CPU, "fp32", training=True):
        assert lin(x).dtype == torch.float32


def test_bf16_gradient_is_close_to_fp32_and_the_cache_keeps_the_whole_batch(toy_tensors):
    task, batches = _task(toy_tensors)
    whole = Batch.cat(batches)
    fp32 = _full(task, whole, "fp32")
    bf16 = _full(task, whole, "bf16")
    assert all(g.dtype == torch.float32 for g in bf16.values())  # fp32 master weights
    assert 0 < _rel(bf16, fp32) < 0.05  # bf16 products: close, not equal (measured 0.02)
    # the cache under bf16 autocast: the fp32 cache's N x B gradient up to bf16 rounding
    # (the convnet's batch norm sees micro-batches, so the cache, not the whole batch, is
    # the reference), far from plain accumulation's (measured 0.016 vs 0.25)
    cached32, cached16 = _cached(task, batches, "fp32"), _cached(task, batches, "bf16")
    assert _rel(cached16, cached32) < 0.05
    assert _rel(_plain(task, batches), cached32) > 4 * _rel(cached16, cached32)


def _plain(task, batches) -> dict[str, torch.Tensor]:
    """Plain accumulation under bf16 autocast: each micro-batch sees its own negatives only."""
    for b in batches:
        with runtime.autocast(CPU, "bf16", training=True):
            loss, _ = task(b)
        (loss / len(batches)).backward()
    return _grads(task)


@pytest.mark.parametrize("amx", [True, False])
def test_fuse_train_bf16_on_the_cpu(toy_tensors, tmp_path, monkeypatch, caplog, amx):
    """End to end with the gradient cache (--accum-steps 2): bf16 autocast where the CPU
    has AMX, fp32 elsewhere, said in the log; losses finite; an fp32 checkpoint."""
    import logging

    monkeypatch.setattr(runtime, "cpu_amx", lambda: amx)
    cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(ENCODERS), embed_dim=16)
    loop = LoopConfig(epochs=2, lr=1e-3, precision="bf16", log_every=1, accum_steps=2)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mmcli"):
        summary = fuse_train([str(toy_tensors)], str(run), cfg, loop, batch_size=8)
    said = "bf16 autocast on the cpu (AMX)" if amx else "running fp32 on cpu"
    assert said in caplog.text
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in steps if "loss" in x]
    assert summary["steps"] == len(losses) >= 4
    assert all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(run / "model.safetensors").values()
    assert {w.dtype for w in weights if w.is_floating_point()} == {
        torch.float32
    }  # fp32 master weights in the checkpoint
