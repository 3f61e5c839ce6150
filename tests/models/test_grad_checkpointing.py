"""``--grad-checkpointing``: the encoders that have blocks recompute them in backward with
the same gradients (dropout replayed, batch-norm statistics updated once), keeping fewer
activations; the adapters switch on their library's own mechanism; encoders without
blocks say so."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from mmcli import models
from mmcli.data.text import ByteTokenizer

BUILTIN = {
    "convnet": ("image", "convnet:width=4,depth=3,dim=16,dropout=0.3"),
    "resnet18": ("image", "resnet18"),
    "vit_b_16": ("image", "vit_b_16:image_size=32,dropout=0.1"),
    "transformer": ("text", "transformer:width=16,depth=2,heads=2,dropout=0.2"),
    "melcnn": ("audio", "melcnn:width=4,depth=2,dim=16,dropout=0.3"),
}


def _input(modality: str, b: int = 3):
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)
    if modality == "text":
        captions = ["a dog on the grass", "二只猫 sleeping", "x"][:b]
        return torch.from_numpy(ByteTokenizer(context_length=20).encode_batch(captions)[0])
    return (torch.randn(b, 4000, generator=g) * 0.3).to(torch.float16)


def _step(enc, x, seed: int = 1):
    """Gradients, running statistics and the bytes autograd saved in forward."""
    enc.train()
    enc.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pooled, tokens, _ = enc.forward_tokens(x)
    (pooled.square().mean() + tokens.float().mean()).backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in enc.named_buffers() if "running" in n or "num_batches" in n}
    return grads, stats, saved[0]


def _same(a: dict, b: dict, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_encoders_checkpoint_with_equal_gradients(name):
    modality, spec = BUILTIN[name]
    from mmcli.models.registry import parse_encoder_spec

    torch.manual_seed(0)
    enc_name, options = parse_encoder_spec(spec, modality)
    plain = models.create(enc_name, modality=modality, **options)
    ckpt = copy.deepcopy(plain)
    assert ckpt.set_grad_checkpointing(True)
    x = _input(modality)
    g0, s0, saved0 = _step(plain, x)
    g1, s1, saved1 = _step(ckpt, x)
    _same(g1, g0)
    if s0:  # batch norm: updated once per forward, not again when a block is recomputed
        _same(s1, s0, rtol=0, atol=0)
    assert saved1 < saved0  # the blocks' activations are not kept
    # evaluation and no-grad passes run the blocks as before
    with torch.no_grad():
        assert torch.equal(ckpt.eval()(x), plain.eval()(x))


def test_encoders_without_blocks_say_so(caplog):
    from mmcli.train.fuse import FuseTask

    assert not models.create("tiny", modality="image").set_grad_checkpointing(True)
    task = FuseTask.__new__(FuseTask)
    torch.nn.Module.__init__(task)
    task.model = models.build_model(
        {"image": "tiny", "text": "transformer:width=16,depth=1,heads=2"}
    )
    with caplog.at_level(logging.INFO, logger="mmcli"):
        task.set_grad_checkpointing()
    lines = [r.getMessage() for r in caplog.records]
    assert any("image encoder (tiny) has no blocks to checkpoint" in x for x in lines)
    assert any("text encoder checkpoints its blocks" in x for x in lines)
    assert task.model.encoders["text"].grad_checkpointing


# ---------------------------------------------------------------------------- adapters

pm = pytest.importorskip("pretrained_models")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "open_clip": pm.open_clip_model(root / "open_clip"),
        "clip": pm.hf_clip(root / "hf_clip"),
        "timm": pm.timm_model(root / "timm", arch="test_vit"),
    }


def _adapter(name: str, files):
    if name == "open_clip-image":
        enc = models.create("open_clip", "image", arch=str(files["open_clip"][0]))
        return enc, torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    if name == "open_clip-text":
        enc = models.create("open_clip", "text", arch=str(files["open_clip"][0]))
        return enc, ["a photo of a dog", "a red square", "ein Foto"]
    if name == "hf-image":
        enc = models.create("hf", "image", path=str(files["clip"]))
        size = enc.image_size
        return enc, torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)
    if name == "hf-text":
        return models.create("hf", "text", path=str(files["clip"])), ["a dog", "a cat", "x y"]
    enc = models.create("timm", "image", arch="test_vit")
    models.load_weights(enc, files["timm"])
    return enc, torch.randint(0, 256, (3, 3, *enc.image_size), dtype=torch.uint8)


@pytest.mark.parametrize(
    "name", ["open_clip-image", "open_clip-text", "hf-image", "hf-text", "timm-image"]
)
def test_adapters_use_their_library_switch(files, name):
    torch.manual_seed(0)
    plain, x = _adapter(name, files)
    ckpt = copy.deepcopy(plain)
    assert ckpt.set_grad_checkpointing(True)
    g0, _, saved0 = _step(plain, x)
    g1, _, saved1 = _step(ckpt, x)
    _same(g1, g0, rtol=1e-4, atol=1e-6)
    assert saved1 < saved0


def test_a_packed_pretrained_text_tower_checkpoints_its_library_blocks(files):
    """fuse-train wraps a text tower with its own tokenizer in PackedText (captions
    tokenized once): --grad-checkpointing reaches the tower inside."""
    from types import SimpleNamespace

    from mmcli.train.fuse.tokens import PackedText

    inner = models.create("open_clip", "text", arch=str(files["open_clip"][0]))
    packed = PackedText(inner, SimpleNamespace(keys=[], dtypes=[]))
    assert packed.set_grad_checkpointing(True)
    assert inner.grad_checkpointing
