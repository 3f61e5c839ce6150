"""Every registered encoder: forward, backward, shapes, determinism, weights round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmcli import models
from mmcli.data.text import ByteTokenizer
from mmcli.models.weights import load_weights

# the built-in encoders (other modules, e.g. the fuse-train passthrough, register more)
BUILTIN = ("mmcli.models.image", "mmcli.models.text", "mmcli.models.audio", "mmcli.models.video")
ENCODERS = [n for n in models.list() if models.resolve(n)[2].__module__ in BUILTIN]


def _batch(modality: str, *, size=(32, 32), length=20, samples=4000, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        return torch.randint(0, 256, (b, 3, *size), dtype=torch.uint8, generator=g)
    if modality == "video":  # 3 frames of the image size
        return torch.randint(0, 256, (b, 3, 3, *size), dtype=torch.uint8, generator=g)
    if modality == "text":
        captions = ["a dog on the grass", "二只猫 sleeping"][:b] + ["x"] * max(0, b - 2)
        return torch.from_numpy(ByteTokenizer(context_length=length).encode_batch(captions)[0])
    return (torch.randn(b, samples, generator=g) * 0.3).to(torch.float16)


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return models.create(name)


def test_the_registry_holds_the_documented_encoders():
    assert ENCODERS == [
        "image/tiny",
        "image/convnet",
        "image/resnet18",
        "image/resnet50",
        "image/vit_b_16",
        "text/tiny",
        "text/bow",
        "text/transformer",
        "audio/tiny",
        "audio/melcnn",
        "video/frames",
    ]


@pytest.mark.parametrize("name", ENCODERS)
def test_forward_backward_shapes_and_determinism(name):
    modality = name.split("/")[0]
    x = _batch(modality)
    # same seed -> same weights -> same outputs; forward() == forward_tokens()[0]
    enc, twin = _build(name).eval(), _build(name).eval()
    assert enc.modality == modality and enc.name == name.split("/")[1]
    with torch.no_grad():
        y = enc(x)
        assert torch.equal(y, twin(x))
        torch.testing.assert_close(enc.forward_tokens(x)[0], y, rtol=1e-5, atol=1e-5)
    del twin
    if sum(p.numel() for p in enc.parameters()) < 5e6:  # the seed matters (cheap ones only)
        with torch.no_grad():
            assert not torch.equal(_build(name, seed=1).eval()(x), y)

    enc.train()
    pooled, tokens, mask = enc.forward_tokens(x)
    assert pooled.shape == (2, enc.out_dim)
    assert tokens.shape[0] == 2 and tokens.shape[2] == enc.token_dim
    assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool and mask.any(1).all()
    assert torch.isfinite(pooled).all() and torch.isfinite(tokens).all()
    (pooled.square().mean() + tokens.square().mean()).backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ENCODERS)
def test_weights_round_trip_through_safetensors(name, tmp_path):
    a, b = _build(name, seed=0).eval(), _build(name, seed=1).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    info = load_weights(b, path)
    assert info["path"] == str(path) and len(info["sha256"]) == 64
    x = _batch(name.split("/")[0])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    ("name", "inputs"),
    [
        ("image/convnet", [(64, 64), (48, 80), (224, 160)]),
        ("image/resnet18", [(40, 56)]),
        ("image/vit_b_16", [(32, 48)]),
        ("text/transformer", [5, 77]),
        ("text/bow", [3, 100]),
        ("audio/melcnn", [100, 16000]),
        ("audio/tiny", [50, 9000]),
    ],
)
def test_any_input_size(name, inputs):
    enc = _build(name).eval()
    modality = name.split("/")[0]
    for shape in inputs:
        kw = (
            {"size": shape}
            if modality == "image"
            else {"length": shape}
            if modality == "text"
            else {"samples": shape}
        )
        with torch.no_grad():
            y = enc(_batch(modality, **kw))
        assert y.shape == (2, enc.out_dim) and torch.isfinite(y).all()


def test_text_padding_is_masked():
    """Extra padding must not change the features of a caption."""
    for name in ("text/transformer", "text/bow", "text/tiny"):
        enc = _build(name).eval()
        short, long = _batch("text", length=24), _batch("text", length=60)
        with torch.no_grad():
            torch.testing.assert_close(enc(short), enc(long), rtol=1e-4, atol=1e-5)


def test_transformer_pooling_options():
    x = _batch("text")
    eos = models.create("text/transformer", pool="eos").eval()
    mean = models.create("text/transformer", pool="mean").eval()
    mean.load_state_dict(eos.state_dict())
    with torch.no_grad():
        pooled, tokens, mask = eos.forward_tokens(x)
        eos_index = (x == 2).int().argmax(1)
        torch.testing.assert_close(pooled, tokens[torch.arange(2), eos_index])
        m = mask.unsqueeze(-1).float()
        torch.testing.assert_close(mean(x), (tokens * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-5)


def test_image_normalisation_happens_in_the_encoder():
    """uint8 in [0, 255] and float in [0, 1] give the same features."""
    enc = _build("image/convnet").eval()
    x = _batch("image")
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x.float() / 255), rtol=1e-4, atol=1e-5)
    assert "mean" not in enc.state_dict()  # constants, not weights


def test_audio_front_end_matches_torchaudio():
    import torchaudio

    enc = models.create("audio/melcnn", sample_rate=8000, n_mels=32)
    wave = _batch("audio", samples=3000).float()
    ref = torchaudio.transforms.MelSpectrogram(8000, n_fft=400, hop_length=160, n_mels=32)(wave)
    torch.testing.assert_close(enc.logmel(wave)[:, 0], torch.log(ref + 1e-6), rtol=1e-4, atol=1e-4)
