"""FAISS backend: built once next to the features, reused, rebuilt when they change;
candidates re-scored exactly."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from feature_files import write_features

from mmcli.errors import MissingDependency
from mmcli.formats.features import FeatureSet
from mmcli.search.exact import ExactIndex
from mmcli.search.faiss_backend import FaissIndex, FaissParams, import_faiss

pytest.importorskip("faiss")


def make(path, n=3000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).numpy()
    write_features(path, [str(i) for i in range(n)], {"image": (x, np.arange(n))})
    return torch.from_numpy(x)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "IVF8,SQ8"])
def test_built_once_saved_reused(tmp_path, kind):
    x = make(tmp_path / "f.safetensors")
    fs = FeatureSet.open(tmp_path / "f.safetensors")
    params = FaissParams(kind=kind, nlist=16, nprobe=16)
    first = FaissIndex.open(fs, "image", params)
    assert first.built and first.path.exists() and first.path.with_suffix(".json").exists()
    assert first.path.parent == tmp_path and first.path.name.startswith("faiss-")
    again = FaissIndex.open(fs, "image", params)
    assert not again.built
    q = x[:20] + 0.05 * torch.randn(20, x.shape[1], generator=torch.Generator().manual_seed(1))
    exact = ExactIndex.from_features(fs, "image").search(q, 10)
    approx = again.search(q, 10)
    # scores of what faiss returns are exact; recall is high on this easy setting
    for i in range(20):
        e = dict(exact.hits(i))
        for row, score in approx.hits(i):
            if row in e:
                assert score == e[row]
    recall = np.mean(
        [
            len(set(approx.indices[i].tolist()) & set(exact.indices[i].tolist())) / 10
            for i in range(20)
        ]
    )
    assert recall > 0.8
    assert approx.indices[0, 0] == 0  # the query's own row first


def test_rebuilt_when_the_features_change(tmp_path):
    make(tmp_path / "f.safetensors")
    params = FaissParams(kind="ivf", nlist=8)
    assert FaissIndex.open(FeatureSet.open(tmp_path / "f.safetensors"), "image", params).built
    make(tmp_path / "f.safetensors", n=2000, seed=3)
    st = os.stat(tmp_path / "f.safetensors")
    os.utime(tmp_path / "f.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = FaissIndex.open(FeatureSet.open(tmp_path / "f.safetensors"), "image", params)
    assert rebuilt.built and rebuilt.index.ntotal == 2000
    assert not FaissIndex.open(FeatureSet.open(tmp_path / "f.safetensors"), "image", params).built
    assert FaissIndex.open(
        FeatureSet.open(tmp_path / "f.safetensors"), "image", params, rebuild=True
    ).built


def test_missing_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependency) as e:
        import_faiss()
    assert 'pip install "mmcli[faiss]"' in str(e.value)


def test_only_kept_items_are_hits(tmp_path):
    x = make(tmp_path / "f.safetensors", n=2000)
    fs = FeatureSet.open(tmp_path / "f.safetensors")
    fs.keep = np.arange(2000) % 4 == 0  # what select_split sets
    index = FaissIndex.open(fs, "image", FaissParams(kind="hnsw"))
    res = index.search(x[:8], 5)
    assert (res.indices >= 0).all() and (res.indices % 4 == 0).all()
    assert res.indices[0, 0] == 0


def test_more_lists_than_rows_names_an_option_that_exists(tmp_path):
    from mmcli.errors import BadInput

    make(tmp_path / "f.safetensors", n=40)
    fs = FeatureSet.open(tmp_path / "f.safetensors")
    with pytest.raises(BadInput, match="fewer than the 64 IVF lists") as e:
        FaissIndex.open(fs, "image", FaissParams(kind="IVF64,Flat"))
    assert "--faiss-index" in str(e.value) and "--nlist" not in str(e.value)


def test_ivfpq_compresses_and_reports_its_recall_and_size(tmp_path):
    """--faiss-index ivfpq: OPQ + IVF + PQ codes of dim/8 bytes; the build checks itself
    against exact search and keeps the figures beside the index."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 64, generator=g) * 2
    x = centres[torch.randint(40, (4000,), generator=g)] + torch.randn(4000, 64, generator=g)
    x = torch.nn.functional.normalize(x, dim=1).numpy()
    write_features(
        tmp_path / "f.safetensors", [str(i) for i in range(4000)], {"image": (x, np.arange(4000))}
    )
    fs = FeatureSet.open(tmp_path / "f.safetensors")
    params = FaissParams(kind="ivfpq", nlist=16, nprobe=16)
    assert params.factory(4000, 64) == "OPQ8,IVF16,PQ8"
    index = FaissIndex.open(fs, "image", params)
    check = index.check
    assert check["queries"] == 256 and check["float16_bytes_per_vector"] == 128
    # 8 bytes of codes + 8 of id a vector, plus the OPQ matrix and centroids, amortised
    assert check["bytes_per_vector"] < 64
    # the figure is what a search gives: recompute it independently
    rows = np.sort(np.random.default_rng(0).choice(4000, size=256, replace=False))
    q = torch.from_numpy(x[rows])
    truth = ExactIndex.from_features(fs, "image").search(q, 11).indices.numpy()
    found = index.search(q, 11).indices.numpy()
    mine = np.mean(
        [len((set(t) - {r}) & (set(f) - {r})) / 10 for r, t, f in zip(rows, truth, found)]
    )
    assert check["recall@10"] == round(float(mine), 4) and mine > 0.5
    again = FaissIndex.open(fs, "image", params)
    assert not again.built and again.check == check
    # --rescore: more candidates re-scored exactly from the same saved index, more recall
    wider = FaissIndex.open(
        fs, "image", FaissParams(kind="ivfpq", nlist=16, nprobe=16, candidates=40)
    )
    assert not wider.built
    found = wider.search(q, 11).indices.numpy()
    more = np.mean(
        [len((set(t) - {r}) & (set(f) - {r})) / 10 for r, t, f in zip(rows, truth, found)]
    )
    assert more > mine
