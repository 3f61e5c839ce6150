"""The training loop's parts: schedule, weight-decay groups, accumulation, clipping,
frozen encoders, the sigmoid objective end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mmcli.models import MultimodalModel
from mmcli.train.fuse import FuseConfig, FuseTask, fuse_train, setup_data, setup_model
from mmcli.train.loop import LoopConfig, decay_groups, fit, lr_at
from mmcli.train.sampler import BatchSampler
from mmcli.train.state import RunDir

TINY = {"image": "tiny", "text": "tiny"}


def test_warmup_then_cosine_by_hand():
    cfg = LoopConfig(lr=1.0, warmup=10, min_lr=0.1)
    # linear warmup over 10 steps: (step + 1) / 10
    assert [lr_at(s, 110, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    # then cosine from 1.0 down to min_lr over the remaining 100 steps
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    # a fraction of the run
    frac = LoopConfig(lr=2.0, warmup=0.25)
    assert lr_at(0, 8, frac) == pytest.approx(1.0) and lr_at(1, 8, frac) == pytest.approx(2.0)
    assert lr_at(5, 8, frac) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_weight_decay_only_on_matrices():
    model = nn.ModuleDict(
        {
            "proj": nn.Linear(4, 4),
            "norm": nn.LayerNorm(4),
            "frozen": nn.Linear(4, 4).requires_grad_(False),
        }
    )
    model.pos_embed = nn.Parameter(torch.zeros(3, 4))
    model.logit_scale = nn.Parameter(torch.zeros(()))
    groups = decay_groups(list(model.named_parameters()), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]  # proj.weight only
    assert len(no_decay["params"]) == 5  # proj.bias, norm.weight/bias, pos_embed, logit_scale


@pytest.fixture(scope="module")
def image_only(toy_data, tmp_path_factory):
    """The toy data's images and labels only: a batch's content depends on its items alone
    (no caption drawn per batch)."""
    from mmcli.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("loop") / "images"
    preprocess(
        str(toy_data), str(out), config=PreprocessConfig(image_size=32, modalities=["image"])
    )
    return out


def _fit(toy_tensors, run_dir, batch, accum=1, clip=None, objectives=None, freeze=()):
    torch.manual_seed(0)
    image_only = objectives is None
    cfg = FuseConfig(
        pairs=None if image_only else [("image", "text")],
        encoders={"image": "tiny"} if image_only else dict(TINY),
        embed_dim=16,
        objectives=objectives or {"classify": 1.0},
        freeze=list(freeze),
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg)
    task = FuseTask(model, cfg, data, seed=0)
    sampler = BatchSampler(data.dataset, data.train, batch, seed=0, modalities=data.modalities)
    loop = LoopConfig(epochs=1, lr=5e-3, accum_steps=accum, grad_clip=clip, log_every=1)
    run = RunDir(run_dir, command="fuse-train", args={}, resume=False, overwrite=False)
    fit(task, sampler, loop, run, device=torch.device("cpu"))
    return model


def test_accumulation_of_two_half_batches_equals_one_full_batch(image_only, tmp_path):
    """With a loss that is a mean over samples (cross-entropy of the label head; the tiny
    image encoder, no batch statistics), 2 micro-batches of 6 accumulate to one step on 12."""
    full = _fit(image_only, tmp_path / "full", 12)
    accum = _fit(image_only, tmp_path / "accum", 6, accum=2)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, accum.state_dict()[k], rtol=1e-4, atol=1e-6, msg=k)

    def steps(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["step"] for x in lines if '"loss"' in x]

    assert steps("accum") == steps("full") == list(range(1, len(steps("full")) + 1))


def test_gradient_clipping_bounds_the_update(toy_tensors, tmp_path, monkeypatch):
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        total = original(params, max_norm, *a, **kw)
        after = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append((float(total), float(after), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    _fit(toy_tensors, tmp_path / "r", 12, clip=0.01, objectives={"contrastive": 1.0})
    assert norms and all(after <= m * 1.001 for _, after, m in norms)
    assert any(before > m for before, _, m in norms)  # clipping did act


def test_a_frozen_encoder_does_not_change(toy_tensors, tmp_path):
    torch.manual_seed(0)
    before = None
    model = _fit(toy_tensors, tmp_path / "r", 12, objectives={"contrastive": 1.0}, freeze=["image"])
    torch.manual_seed(0)
    cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(TINY), embed_dim=16)
    before = setup_model(setup_data([str(toy_tensors)], None, cfg), cfg)
    for k, v in before.encoders["image"].state_dict().items():
        torch.testing.assert_close(model.encoders["image"].state_dict()[k], v, msg=k)
    changed = [
        k
        for k, v in before.encoders["text"].state_dict().items()
        if not torch.equal(model.encoders["text"].state_dict()[k], v)
    ]
    assert changed  # the other encoder trained


def test_sigmoid_objective_end_to_end_lowers_the_loss(toy_tensors, tmp_path):
    cfg = FuseConfig(
        pairs=[("image", "text")], encoders=dict(TINY), embed_dim=16, objectives={"sigmoid": 1.0}
    )
    summary = fuse_train(
        [str(toy_tensors)],
        str(tmp_path / "run"),
        cfg,
        LoopConfig(epochs=4, lr=1e-2, log_every=1),
        batch_size=16,
        device="cpu",
    )
    losses = [
        json.loads(x)["sigmoid"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"sigmoid"' in x
    ]
    assert summary["steps"] == len(losses) and losses[-1] < losses[0]
    model = MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.logit_bias is not None  # SigLIP's learned bias is part of the checkpoint
