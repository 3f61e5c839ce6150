"""The gradient cache of ``--accum-steps``: N micro-batches of B give the gradient of one
batch of N×B rows for the losses that couple rows (contrastive, sigmoid, match), within
1e-5 relative in fp32; per-row losses keep plain accumulation; batch norm and dropout see
each micro-batch once (running statistics updated once, dropout masks replayed)."""

from __future__ import annotations

import json

import pytest
import torch
from metric_logs import assert_torchrun_equals_one
from torch.utils._pytree import tree_flatten, tree_unflatten

from mmcli.runtime import dist_info
from mmcli.train.fuse import FuseConfig, FuseTask, fuse_train, setup_data, setup_model
from mmcli.train.gradcache import GradCache, uses_cache
from mmcli.train.loop import LoopConfig
from mmcli.train.sampler import Batch, BatchSampler, cat_blocks, split_blocks

TINY = {"image": "tiny", "text": "tiny"}
N, B = 3, 8


def _task(toy_tensors, *, encoders=None, captions=1, **cfg_kw):
    torch.manual_seed(0)
    cfg = FuseConfig(
        pairs=[("image", "text")],
        encoders=encoders or dict(TINY),
        embed_dim=16,
        captions_per_item=captions,
        **cfg_kw,
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    task = FuseTask(setup_model(data, cfg), cfg, data, seed=0).train()
    if task.model.logit_bias is not None:  # as later in training: the negatives weigh in
        with torch.no_grad():  # (at the init bias of -10 they hardly move the gradient)
            task.model.logit_bias.fill_(-2.0)
    sampler = BatchSampler(
        data.dataset, data.train, B, seed=0, captions_per_item=captions, modalities=data.modalities
    )
    return task, [sampler.make_batch(0, s) for s in range(N)]


def _grads(task) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad(set_to_none=True)
    return out


def _cached(task, batches) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cache = GradCache(task, len(batches), scaler, torch.device("cpu"), "fp32", dist_info())
    logs = cache.backward(batches)
    return _grads(task), logs


def _full(task, batches) -> tuple[dict[str, torch.Tensor], float]:
    loss, _ = task(Batch.cat(batches))
    loss.backward()
    return _grads(task), float(loss.detach())


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


def test_blocks_join_and_split_back():
    # two micro-batches, 2 blocks (captions) each: block k of the result = block k of each
    a = torch.arange(6).reshape(2 * 3, 1)  # 3 items, blocks [0 1 2] [3 4 5]
    b = torch.arange(10, 14).reshape(2 * 2, 1)  # 2 items, blocks [10 11] [12 13]
    joined = cat_blocks([a, b], [3, 2])
    assert joined.squeeze(1).tolist() == [0, 1, 2, 10, 11, 3, 4, 5, 12, 13]
    back = split_blocks(joined, [3, 2])
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


@pytest.mark.parametrize(
    "objectives,kw",
    [
        ({"contrastive": 1.0}, {}),
        ({"sigmoid": 1.0}, {}),
        ({"contrastive": 1.0}, {"captions": 2, "hard_negatives": "swap_text"}),
        ({"sigmoid": 1.0}, {"captions": 2}),
    ],
    ids=["contrastive", "sigmoid", "contrastive-2-captions-hard-negatives", "sigmoid-2-captions"],
)
def test_cached_gradient_equals_the_full_batch(toy_tensors, objectives, kw):
    task, batches = _task(toy_tensors, objectives=objectives, **kw)
    assert uses_cache(task, N)
    want, loss = _full(task, batches)
    got, logs = _cached(task, batches)
    assert _rel(got, want) <= 1e-5
    assert logs["loss"] == pytest.approx(loss, rel=1e-6)
    # plain accumulation is not that gradient (each micro-batch sees its own negatives only)
    for b in batches:
        (task(b)[0] / N).backward()
    assert _rel(_grads(task), want) > 1e-3


def test_mixed_objectives_cache_the_coupled_and_accumulate_the_rest(toy_tensors):
    """contrastive + match through attention fusion (coupled, cached) + classify (per row:
    plain accumulation, exact when the micro-batches have as many labelled rows)."""
    objectives = {"contrastive": 1.0, "match": 0.5, "classify": 0.3}
    task, batches = _task(
        toy_tensors, objectives=objectives, fusion="attention", fusion_width=16, fusion_heads=2
    )
    assert all(bool((b.labels >= 0).all()) for b in batches)
    want, loss = _full(task, batches)
    got, logs = _cached(task, batches)
    assert _rel(got, want) <= 1e-5
    assert logs["loss"] == pytest.approx(loss, rel=1e-6)
    assert set(objectives) <= set(logs)


def _reference_per_micro_batch(task, batches):
    """The N×B loss with each micro-batch encoded with its graph, in order (batch norm on
    its micro-batch, dropout drawing in sequence): what the cache must equal."""
    flat = [tree_flatten(task.represent(b)) for b in batches]
    sizes = [len(b) for b in batches]
    leaves = [
        cat_blocks(list(parts), sizes) if isinstance(parts[0], torch.Tensor) else parts[0]
        for parts in zip(*(f[0] for f in flat))
    ]
    whole = tree_unflatten(leaves, flat[0][1])
    loss, _ = task.batch_loss(Batch.cat(batches), whole)
    loss.backward()
    return _grads(task)


def _running_stats(task):
    return {n: b.clone() for n, b in task.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("objectives", [{"contrastive": 1.0}, {"sigmoid": 1.0}])
def test_batch_norm_and_dropout_see_each_micro_batch_once(toy_tensors, objectives):
    encoders = {
        "image": "convnet:width=4,depth=2,dim=16,dropout=0.3",
        "text": "transformer:width=16,depth=1,heads=2,dropout=0.2",
    }
    task, batches = _task(toy_tensors, encoders=encoders, objectives=objectives)
    start = {k: v.clone() for k, v in task.state_dict().items()}
    torch.manual_seed(1)
    want = _reference_per_micro_batch(task, batches)
    stats_want = _running_stats(task)
    task.load_state_dict(start)
    torch.manual_seed(1)
    got, _ = _cached(task, batches)
    assert _rel(got, want) <= 1e-5
    stats = _running_stats(task)
    assert stats.keys() == stats_want.keys() and stats
    for k in stats:  # one update per micro-batch, as without the cache
        torch.testing.assert_close(stats[k], stats_want[k], rtol=0, atol=1e-7, msg=k)
    assert int(stats["model.encoders.image.features.0.1.num_batches_tracked"]) == N


def test_per_row_objectives_keep_plain_accumulation(toy_tensors):
    task, _ = _task(toy_tensors, objectives={"classify": 1.0})
    assert not uses_cache(task, N)
    task, _ = _task(toy_tensors, objectives={"contrastive": 1.0})
    assert not uses_cache(task, 1) and uses_cache(task, N)


def test_fuse_train_with_accum_steps_end_to_end(toy_tensors, tmp_path):
    cfg = FuseConfig(
        pairs=[("image", "text")],
        encoders={"image": "convnet:width=4,depth=2,dim=16", "text": "tiny"},
        embed_dim=16,
        val_split="none",
    )
    loop = LoopConfig(epochs=1, lr=1e-3, accum_steps=2, grad_checkpointing=True, log_every=1)
    summary = fuse_train([str(toy_tensors)], str(tmp_path / "run"), cfg, loop, batch_size=8)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert summary["steps"] == len(steps) >= 2
    assert all(x["contrastive"] > 0 and x["loss"] == pytest.approx(x["contrastive"]) for x in steps)


def test_distill_losses_over_the_whole_batch(toy_tensors, tmp_path):
    """distill's similarity, contrastive and relational losses compare rows: cached, with
    feature (per row) computed over the whole batch alongside."""
    from mmcli.train.distill import (
        DistillConfig,
        DistillTask,
        load_teacher,
        setup_student,
    )
    from mmcli.train.distill import setup_data as distill_data

    teacher_cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(TINY), embed_dim=16)
    fuse_train(
        [str(toy_tensors)],
        str(tmp_path / "teacher"),
        teacher_cfg,
        LoopConfig(epochs=1, max_steps=2, lr=1e-3),
        batch_size=8,
    )
    losses = {"similarity": 1.0, "contrastive": 1.0, "feature": 1.0, "relational": 0.5}
    cfg = DistillConfig(
        teacher=str(tmp_path / "teacher" / "last.safetensors"),
        student=["derive:0.5"],
        losses=losses,
        captions_per_item=2,
    )
    cpu = torch.device("cpu")
    teacher = load_teacher(cfg.teacher, cpu)
    data = distill_data([str(toy_tensors)], None, cfg, teacher)
    torch.manual_seed(0)
    task = DistillTask(setup_student(data, cfg, teacher), teacher, cfg, data).train()
    sampler = BatchSampler(
        data.dataset, data.train, B, seed=0, captions_per_item=2, modalities=data.modalities
    )
    batches = [sampler.make_batch(0, s) for s in range(N)]
    assert uses_cache(task, N)
    want, loss = _full(task, batches)
    got, logs = _cached(task, batches)
    assert _rel(got, want) <= 1e-5
    assert logs["loss"] == pytest.approx(loss, rel=1e-6)
    assert set(losses) <= set(logs)


def _common(toy_tensors):
    return [
        "fuse-train",
        str(toy_tensors),
        "--pairs",
        "image-text",
        "--encoder",
        "image=tiny",
        "--encoder",
        "text=transformer:width=16,depth=1,heads=2",
        "--embed-dim",
        "16",
        "--max-steps",
        "3",
        "--device",
        "cpu",
        "--lr",
        "5e-3",
        "--log-every",
        "1",
        "--accum-steps",
        "2",
        "--val-split",
        "none",
    ]


def test_the_cli_flags(cli, toy_tensors, tmp_path):
    r = cli(
        *_common(toy_tensors), "-o", tmp_path / "r", "--batch-size", "8", "--grad-checkpointing"
    )
    assert r.exit_code == 0, r.stderr
    assert "the image encoder (tiny) has no blocks to checkpoint" in r.stderr
    assert "the text encoder checkpoints its blocks" in r.stderr
    assert json.loads(r.stdout)["steps"] == 3


def test_ddp_two_processes_equal_one_with_the_cache(toy_tensors, tmp_path):
    """torchrun 2 processes x batch 6 x --accum-steps 2 == 1 process x batch 12 x 2: the
    cached loss sees the rows of both ranks and of both micro-batches (gloo on the CPU)."""
    assert_torchrun_equals_one([*_common(toy_tensors), "-q"], tmp_path, port=29531, batch=12)
