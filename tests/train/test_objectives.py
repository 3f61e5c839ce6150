"""Losses against values computed by hand (math module, no torch) on tiny tensors."""

import math

import pytest
import torch

from mmcli.train.objectives import (
    classify_loss,
    contrastive_loss,
    feature_loss,
    kd_loss,
    match_loss,
    relational_loss,
    sigmoid_loss,
    similarity_loss,
)


def softplus(x):
    return math.log1p(math.exp(x))


def test_contrastive_one_positive_is_clip():
    a = torch.eye(2)
    loss = contrastive_loss(a, a, torch.tensor([0, 1]), torch.tensor([0, 1]), 1.0)
    # each row: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1), both directions alike
    assert loss.item() == pytest.approx(softplus(-1.0), rel=1e-6)
    # and equals the usual CLIP formulation
    logits = a @ a.T
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(2)) * 2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_contrastive_with_scale():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss = contrastive_loss(a, a, torch.tensor([0, 1]), torch.tensor([0, 1]), 10.0)
    assert loss.item() == pytest.approx(softplus(-10.0), rel=1e-5)


def test_contrastive_multi_caption_rows_are_not_negatives():
    image = torch.tensor([[1.0, 0.0]])  # item 0
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # items 0, 0, 1
    loss = contrastive_loss(image, text, torch.tensor([0]), torch.tensor([0, 0, 1]), 1.0)
    # image->text: positives 1.0 and 0.6, the only negative is 0.0:
    #   mean(-log(e^1/(e^1+e^0)), -log(e^.6/(e^.6+e^0))) = mean(softplus(-1), softplus(-.6))
    # text->image: the only image is each caption's positive (or it has no positive): 0
    expected = 0.5 * (0.5 * (softplus(-1.0) + softplus(-0.6)) + 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # treating the second caption as a negative would give a larger loss
    naive = -math.log(math.e / (math.e + math.exp(0.6) + 1.0))
    assert loss.item() < 0.5 * naive


def test_sigmoid_loss():
    a = torch.eye(2)
    loss = sigmoid_loss(a, a, torch.tensor([0, 1]), torch.tensor([0, 1]), 1.0, 0.0)
    # -(1/2) * (2 log s(1) + 2 log s(0)) = softplus(-1) + log 2
    assert loss.item() == pytest.approx(softplus(-1.0) + math.log(2), rel=1e-6)
    loss_b = sigmoid_loss(a, a, torch.tensor([0, 0]), torch.tensor([0, 0]), 2.0, -1.0)
    # all four pairs positive: logits 2*I - 1 -> (2 softplus(-1) + 2 softplus(1)) / 2
    assert loss_b.item() == pytest.approx(softplus(-1.0) + softplus(1.0), rel=1e-6)


def test_classify_ignores_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    loss = classify_loss(logits, torch.tensor([0, 1, -1]))
    expected = 0.5 * (softplus(-2.0) + math.log(2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert classify_loss(logits, torch.tensor([-1, -1, -1])).item() == 0.0


def test_match_loss():
    loss = match_loss(torch.tensor([2.0]), torch.tensor([-1.0]))
    assert loss.item() == pytest.approx(0.5 * (softplus(-2.0) + softplus(-1.0)), rel=1e-6)


def test_kd_loss_includes_t_squared():
    s, t, temp = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 2.0
    pt = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    assert kd_loss(s, t, temp).item() == pytest.approx(kl * temp**2, rel=1e-6)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_loss():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert feature_loss(s, t, "mse").item() == pytest.approx((1 + 4) / 2)
    assert feature_loss(s, t, "cosine").item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        feature_loss(s, t, "l1")


def test_similarity_loss():
    s_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s_b = s_a.clone()
    t_a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t_b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # student rows: softmax([1,0]), softmax([0,1]); teacher rows: softmax([1,0]) twice
    p1 = [math.e / (math.e + 1), 1 / (math.e + 1)]
    q = [p1, p1[::-1]]
    row = sum(sum(p1[k] * math.log(p1[k] / q[i][k]) for k in range(2)) for i in range(2)) / 2
    # columns: student S^T = I-like, teacher T^T = [[1,1],[0,0]] -> rows softmax([1,1]) and softmax([0,0])
    pt_cols = [[0.5, 0.5], [0.5, 0.5]]
    col = (
        sum(
            sum(pt_cols[i][k] * math.log(pt_cols[i][k] / q[i][k]) for k in range(2))
            for i in range(2)
        )
        / 2
    )
    got = similarity_loss(s_a, s_b, t_a, t_b, 1.0).item()
    assert got == pytest.approx(0.5 * (row + col), rel=1e-5)


def test_relational_loss():
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5: mean 4
    assert relational_loss(2 * t, t).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    s = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    )  # distances 1, 1, sqrt2: mean (2+sqrt2)/3
    m = (2 + math.sqrt(2)) / 3
    diffs = [1 / m - 3 / 4, 1 / m - 4 / 4, math.sqrt(2) / m - 5 / 4]

    def smooth_l1(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    assert relational_loss(s, t).item() == pytest.approx(
        sum(smooth_l1(d) for d in diffs) / 3, rel=1e-5
    )


def test_gradients_flow():
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(6, 8, requires_grad=True)
    loss = contrastive_loss(
        torch.nn.functional.normalize(a, dim=-1),
        torch.nn.functional.normalize(b, dim=-1),
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([0, 0, 1, 2, 3, 3]),
        10.0,
    )
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
