"""fp32 CPU inference's linear layers through oneDNN (mmcli.onednn): the same numbers as
torch's own products (float32 rounding), the oneDNN op really runs, and everything it
does not cover (gradients, autocast, other dtypes, attention weights) runs as torch would."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcli import onednn

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN"
)


@pytest.fixture
def calls(monkeypatch):
    """Use oneDNN (as if measured faster) and count its products."""
    monkeypatch.setattr(onednn, "_CHOICE", [True])
    count = [0]
    real = onednn._dnn

    def counted(x, w, b):
        count[0] += 1
        return real(x, w, b)

    monkeypatch.setattr(onednn, "_dnn", counted)
    return count


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def test_linear_layers_match_torch(calls):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    with torch.inference_mode():
        ref, ref_t = lin(x), lin(x.transpose(0, 1).contiguous())
        with onednn.linear():
            got = lin(x)
            got_t = lin(x.transpose(0, 1))  # a strided input
            got_kw = F.linear(input=x, weight=lin.weight)  # by keyword, no bias
    assert calls[0] == 3
    assert _rel(got, ref) < 1e-5 and _rel(got_t, ref_t) < 1e-5
    assert _rel(got_kw, x @ lin.weight.t()) < 1e-5


def test_a_bias_onednn_cannot_read_is_torchs(calls):
    torch.manual_seed(3)
    x, w = torch.randn(5, 4), torch.randn(3, 4)
    strided = torch.randn(3, 2)[:, 0]  # stride 2: oneDNN would read the wrong floats
    with torch.inference_mode(), onednn.linear():
        for b in (strided, torch.tensor(0.5), torch.randn(1), torch.randn(5, 3)):
            assert _rel(F.linear(x, w, b), x @ w.t() + b) < 1e-6
    assert calls[0] == 0


def _attention_case(kind: str, batch_first: bool):
    kv_dim = 24 if kind == "separate" else None
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kv_dim, vdim=kv_dim,
                                bias=kind != "no_bias").eval()  # fmt: skip
    q = torch.randn(3, 10, 32)
    kv = {"cross": torch.randn(3, 12, 32), "separate": torch.randn(3, 12, 24)}.get(kind, q)
    if not batch_first:
        q, kv = q.transpose(0, 1).contiguous(), kv.transpose(0, 1).contiguous()
    L, S = 10, kv.shape[1 if batch_first else 0]
    kw = {}
    if kind == "causal":  # open_clip's text tower: an additive float mask
        kw["attn_mask"] = torch.full((L, S), float("-inf")).triu(1)
    if kind == "boolean":
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
    if kind in ("padding", "padding_and_mask"):
        kw["key_padding_mask"] = torch.tensor([[False] * 8 + [True] * 2] * 3)
    if kind == "padding_and_mask":
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
    if kind == "per_head_mask":  # 3-D: one mask per batch row and head
        kw["attn_mask"] = torch.randn(3 * 4, L, S)
    if kind == "is_causal":
        kw["attn_mask"], kw["is_causal"] = nn.Transformer.generate_square_subsequent_mask(L), True
    value = kv.clone() if kind == "cross" else kv  # key and value apart
    return mha, (q, kv, value), kw


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "kind",
    ["self", "causal", "boolean", "padding", "padding_and_mask", "per_head_mask", "is_causal",
     "cross", "separate", "no_bias"],
)  # fmt: skip
def test_multihead_attention_matches_torch(calls, kind, batch_first):
    torch.manual_seed(1)
    mha, args, kw = _attention_case(kind, batch_first)
    with torch.inference_mode():
        ref = mha(*args, need_weights=False, **kw)[0]
        with onednn.linear():
            got = mha(*args, need_weights=False, **kw)[0]
    assert calls[0] >= 2  # the input and output projections
    assert _rel(got, ref) < 1e-5


def test_what_it_does_not_cover_runs_as_torch_would(calls):
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with onednn.linear():
        lin(x).sum().backward()  # gradients wanted: torch's own product, with its backward
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16  # autocast keeps its bf16 product
        with torch.no_grad():
            assert lin.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert calls[0] == 0
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    with torch.inference_mode(), onednn.linear():
        out, weights = mha(x[None], x[None], x[None])  # need_weights: torch's path, unchanged
    assert weights is not None and out.shape == (1, 4, 16)


def test_empty_and_malformed_attention_is_torchs(calls):
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        with onednn.linear():  # empty batch, empty sequence: torch's empty results
            assert mha(x[:0], x[:0], x[:0], need_weights=False)[0].shape == (0, 5, 16)
            assert mha(x[:, :0], x[:, :0], x[:, :0], need_weights=False)[0].shape == (2, 0, 16)
        bad = [{"key_padding_mask": torch.zeros(5, 2, dtype=torch.bool)},  # (L, N): wrong
               {"attn_mask": torch.zeros(1, 25)}]  # fmt: skip
        for kw in bad:
            with pytest.raises((RuntimeError, AssertionError)):
                mha(x, x, x, need_weights=False, **kw)
            with pytest.raises((RuntimeError, AssertionError)), onednn.linear():
                mha(x, x, x, need_weights=False, **kw)  # refused as torch refuses it
    assert calls[0] == 0


def test_the_choice_follows_the_environment(monkeypatch):
    for value, want in (("blas", False), ("onednn", True)):
        monkeypatch.setattr(onednn, "_CHOICE", [])
        monkeypatch.setenv(onednn.ENV, value)
        assert onednn.choice() is want
    monkeypatch.setattr(onednn, "_CHOICE", [])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # first asked under autocast
        assert onednn.choice() is True
    monkeypatch.setattr(onednn, "_CHOICE", [])
    monkeypatch.setenv(onednn.ENV, "fast")
    assert onednn.choice() in (True, False)  # measured, with a warning
    monkeypatch.setattr(onednn, "_CHOICE", [False])
    assert not isinstance(onednn.linear(), onednn._mode_class())
    monkeypatch.setattr(onednn, "_CHOICE", [True])
    assert not isinstance(onednn.linear(torch.device("cuda")), onednn._mode_class())
    assert isinstance(onednn.linear("cpu:0"), onednn._mode_class())


def test_an_open_clip_model_gives_the_same_embeddings(calls, tmp_path):
    pytest.importorskip("open_clip")
    import open_clip
    from pretrained_models import open_clip_model

    open_clip_model(tmp_path)
    model = open_clip.create_model("tiny-clip").eval()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 24))
    with torch.inference_mode():
        ref = model.encode_image(images), model.encode_text(texts)
        with onednn.linear():
            got = model.encode_image(images), model.encode_text(texts)
    assert calls[0] >= 8
    for a, b in zip(got, ref):
        assert float(F.cosine_similarity(a, b).min()) >= 0.99999


def test_extract_runs_its_fp32_cpu_linears_through_onednn(toy_tensors, tmp_path, monkeypatch):
    from mmcli.extract import extract
    from mmcli.formats.tensorfile import TensorSet

    encoders = {"text": "transformer:width=64,depth=2"}
    out = {}
    for use in (False, True):
        monkeypatch.setattr(onednn, "_CHOICE", [use])
        extract(toy_tensors, tmp_path / str(use), encoders=encoders, device="cpu", dtype="float32")
        out[use] = TensorSet(tmp_path / str(use)).table("text")[0]
    assert float(F.cosine_similarity(out[True], out[False]).min()) >= 0.99999


def test_extract_enters_the_context(toy_tensors, tmp_path, calls):
    from mmcli.extract import extract

    extract(toy_tensors, tmp_path / "f", encoders={"text": "transformer:width=64,depth=2"},
            device="cpu")  # fmt: skip
    assert calls[0] > 0


def test_exact_searchs_float32_product(calls):
    torch.manual_seed(4)
    rows, queries = torch.randn(300, 64), torch.randn(7, 64)
    got = onednn.product(rows, queries)
    assert calls[0] == 1 and got.shape == (300, 7)
    assert _rel(got, rows @ queries.T) < 1e-5
