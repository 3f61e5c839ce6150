"""Exact search: identical to a full float64 scoring + full sort, for every pass and dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcli.search.bounds as bounds_mod
import mmcli.search.candidates as candidates_mod
import mmcli.search.exact as exact_mod
from mmcli.errors import BadInput
from mmcli.search.exact import ExactIndex, exact_search_reference


def normalized(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def assert_exact(parts, queries, k, **kw):
    index = ExactIndex(parts, chunk_rows=kw.pop("chunk_rows", None))
    rows, scores = exact_search_reference(queries, torch.cat([p.float() for p in parts]), k)
    kk = rows.shape[1]
    out = {}
    for scoring in ("fp32", "bf16"):
        res = index.search(queries, k, scoring=scoring, **kw)
        np.testing.assert_array_equal(res.indices[:, :kk].numpy(), rows, err_msg=scoring)
        np.testing.assert_array_equal(res.scores[:, :kk].numpy(), scores, err_msg=scoring)
        assert (res.indices[:, kk:] == -1).all()
        out[scoring] = res
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_full_sort_across_shards_and_chunks(dtype):
    x = normalized(3000, 32, 0).to(dtype)
    q = normalized(40, 32, 1)
    assert_exact([x[:1100], x[1100:1101], x[1101:]], q, 10, chunk_rows=256)
    assert_exact([x], q, 1)


def test_index_smaller_than_k():
    x = normalized(4, 8, 0)
    res = assert_exact([x], normalized(3, 8, 1), 10)["fp32"]
    assert res.hits(0)[-1][0] >= 0 and len(res.hits(0)) == 4


def test_adversarial_near_ties_below_bf16_resolution():
    """Rows that differ by far less than bfloat16 can see: the fast pass cannot order
    them, the bound must keep them all, and the float64 re-rank must order them."""
    d = 64
    base = normalized(1, d, 3)[0]
    g = torch.Generator().manual_seed(4)
    near = base.repeat(600, 1) + 1e-6 * torch.randn(600, d, generator=g)
    far = normalized(2000, d, 5) * 0.5
    far[100] = far[3]  # exact duplicates: a real tie, broken by row
    far[1500] = far[3]
    x = torch.cat([far[:1000], near, far[1000:]])
    q = torch.stack([base, near[5], base + 1e-7 * torch.randn(d, generator=g), far[3]])
    res = assert_exact([x], q, 10, chunk_rows=128)
    assert res["bf16"].indices[3, :3].tolist() == [3, 100, 2100]  # tie: lower row first
    assert res["bf16"].candidates >= 3 * 600 - 10  # nothing could be discarded


def test_float16_storage_differs_from_float32_only_by_storage_rounding():
    x = normalized(2000, 32, 6)
    q = normalized(20, 32, 7)
    r32 = ExactIndex([x]).search(q, 5, scoring="fp32")
    r16 = ExactIndex([x.half()]).search(q, 5, scoring="bf16")
    # exact with respect to the stored float16 vectors ...
    ref, _ = exact_search_reference(q, x.half().float(), 5)
    np.testing.assert_array_equal(r16.indices.numpy(), ref)
    # ... and (on this data) the same hits as the float32 original
    assert (r16.indices == r32.indices).float().mean() > 0.95


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 24),
    k=st.integers(1, 12),
    chunk=st.integers(4, 128),
    dup=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_exact_for_any_shape(n, d, k, chunk, dup, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    if dup and n > 3:
        x[n // 2] = x[1]
        x[n - 1] = x[1]
    q = torch.cat([torch.randn(4, d, generator=torch.Generator().manual_seed(seed + 1)), x[1:2]])
    assert_exact([x], q, k, chunk_rows=chunk)


def test_threshold_drops_low_hits():
    x = normalized(500, 16, 8)
    q = x[:3]
    res = ExactIndex([x]).search(q, 10, threshold=0.5)
    assert (res.scores[res.indices >= 0] >= 0.5).all()
    assert res.indices[0, 0] == 0 and res.scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert ((res.indices == -1) == torch.isinf(res.scores)).all()


def test_bf16_probe_failure_falls_back(monkeypatch):
    monkeypatch.setattr(bounds_mod, "_BF16_OK", {})
    monkeypatch.setattr(bounds_mod, "_bf16_probe", lambda: False)
    assert exact_mod.resolve_scoring("auto") == "fp32"
    monkeypatch.setattr(bounds_mod, "_BF16_OK", {})


def test_bad_queries():
    index = ExactIndex([normalized(10, 8, 0)])
    with pytest.raises(BadInput, match="dimensions"):
        index.search(torch.zeros(2, 4), 3)
    with pytest.raises(BadInput, match="NaN"):
        index.search(torch.full((1, 8), float("nan")), 3)
    with pytest.raises(BadInput):
        index.search(torch.zeros(1, 8), 3, scoring="int8")


def test_torch_filter_path_is_exact_too(monkeypatch):
    """The code path GPUs take (torch ops on the pass scores), run on CPU."""
    monkeypatch.setattr(candidates_mod, "HOST_NUMPY", False)
    x = normalized(2000, 16, 11)
    x[500] = x[7]
    assert_exact([x.half()], torch.cat([normalized(5, 16, 12), x[7:8]]), 10, chunk_rows=300)


def test_non_finite_index_is_bad_input():
    x = normalized(100, 8, 0)
    x[42, 3] = float("nan")
    with pytest.raises(BadInput, match="rows 0 to 99"):
        ExactIndex([x]).search(normalized(1, 8, 1), 3)


def test_row_mask_restricts_hits_exactly():
    x = normalized(3000, 16, 13)
    q = normalized(6, 16, 14)
    mask = np.zeros(3000, dtype=bool)
    mask[::7] = True
    mask[100:700] = False  # whole chunks with no allowed row
    index = ExactIndex([x[:1500], x[1500:]], chunk_rows=256, row_mask=mask)
    allowed = np.flatnonzero(mask)
    rows, scores = exact_search_reference(q, x[torch.from_numpy(allowed)], 10)
    for scoring in ("fp32", "bf16"):
        res = index.search(q, 10, scoring=scoring)
        np.testing.assert_array_equal(res.indices.numpy(), allowed[rows])
        np.testing.assert_array_equal(res.scores.numpy(), scores)
    few = ExactIndex([x], row_mask=np.arange(3000) < 3).search(q, 10)
    assert (few.indices[:, :3] >= 0).all() and (few.indices[:, 3:] == -1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_above_reads_a_transposed_score_view_like_a_contiguous_one(seed):
    """The CPU pass scores rows x queries and hands over the transposed view: the hits,
    their order (query, then column) and the floors' ties are those of a copy."""
    rng = np.random.default_rng(seed)
    s = torch.from_numpy(rng.integers(-8, 9, size=(300, 7)).astype(np.float32) / 8)
    view = s.T  # (7 queries, 300 columns), not contiguous
    floor = rng.integers(-4, 8, size=7) / 8.0
    floor[seed] = 2.0  # a query with no hit
    got = candidates_mod.above(view, floor)
    want = candidates_mod.above(view.contiguous(), floor)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    x = view.numpy()
    qi, ci = np.nonzero(x >= floor[:, None])
    np.testing.assert_array_equal(got[0], qi)
    np.testing.assert_array_equal(got[1], ci)
    assert not view.is_contiguous() and len(qi)


def test_bfloat16_rounding_through_the_reused_buffers_equals_torchs():
    """The bf16 pass rounds 16- and 32-bit rows through reused buffers (a float32 scratch
    of PIECE rows): the same bits as ``x.to(torch.bfloat16)``, for chunks longer and
    shorter than the scratch, one after another, subnormals and extremes included."""
    g = torch.Generator().manual_seed(0)
    q = normalized(4, 48, 1)
    sp = bounds_mod.ScoringPass.prepare(q, q.double(), "bf16", 48, torch.device("cpu"))
    specials = torch.tensor([6.0e-8, -6.0e-8, 1.0e-5, 65504.0, -65504.0, 0.0, -0.0, 1 / 3])
    for n, dtype in [(2500, torch.float16), (300, torch.float16), (1024, torch.float32)]:
        x = torch.randn(n, 48, generator=g) * torch.logspace(-7, 4, 48)
        x = x.clamp(-65504, 65504).to(dtype)
        x[0, : len(specials)] = specials.to(dtype)
        got = sp._bfloat16(x)
        want = x.to(torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (n, dtype)
    x = normalized(5000, 48, 2).half()  # chunks of 2,000 rows: longer than the scratch
    assert_exact([x], q, 10, chunk_rows=2000)
