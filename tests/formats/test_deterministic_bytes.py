"""The same content gives the same bytes: safetensors' own writer emits metadata in hash
order (two saves in one process differ), mmcli writes a canonical header instead, so a
Makefile user gets stable checksums (docs/reliability.md)."""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from mmcli.formats.safetensors_io import canonical
from mmcli.formats.tensorfile import Shard, ShardFile, serialize_shard, write_shard

META = {f"key{i}": {"value": i} for i in range(12)}


def _shard():
    return Shard(
        ids=["a", "b", "中"],
        tables={"image": np.arange(3 * 8, dtype=np.float32).reshape(3, 8)},
        items={"image": np.arange(3)},
        labels=np.array([0, 1, -1]),
    )


def _metadata_keys(data: bytes) -> list[str]:
    (n,) = struct.unpack("<Q", data[:8])
    return list(json.loads(data[8 : 8 + n])["__metadata__"])


def test_safetensors_own_writer_is_not_deterministic():
    """Why mmcli rewrites the header: without it this test's twin below would fail."""
    from safetensors.numpy import save

    metadata = {f"k{i}": str(i) for i in range(12)}
    tensors = {"x": np.zeros(3, np.float32)}
    raw = {save(tensors, metadata=metadata) for _ in range(8)}
    assert len(raw) > 1
    assert len({canonical(r) for r in raw}) == 1


def test_tensor_files_are_byte_identical(tmp_path):
    kw = dict(kind="features", specs={"image": {"dim": 8}}, label_names=["x", "y"], extra=META)
    a, b = (serialize_shard(_shard(), **kw) for _ in range(2))
    assert a == b
    keys = _metadata_keys(a)
    assert keys == sorted(keys) and "mmcli.key11" in keys
    write_shard(tmp_path / "a.safetensors", _shard(), **kw)
    write_shard(tmp_path / "b.safetensors", _shard(), **kw)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    sf = ShardFile(tmp_path / "a.safetensors")  # and it reads back, with safetensors too
    assert sf.ids() == ["a", "b", "中"] and sf.extra("key3") == {"value": 3}
    from safetensors.numpy import load_file

    assert np.array_equal(
        load_file(str(tmp_path / "a.safetensors"))["image"], _shard().tables["image"]
    )


def test_checkpoints_and_train_state_are_byte_identical(tmp_path):
    from mmcli.models import build_model
    from mmcli.train.state import load_state, save_state

    torch.manual_seed(0)
    model = build_model({"image": "tiny", "text": "tiny"})
    meta = dict(train={f"opt{i}": i for i in range(10)}, state={"step": 3}, metrics={"r@1": 0.5})
    model.to_checkpoint(tmp_path / "a.safetensors", **meta)
    model.to_checkpoint(tmp_path / "b.safetensors", **meta)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    state = {"model": model.state_dict(), "rng": torch.get_rng_state(), "step": 7, "lr": [0.1]}
    save_state(tmp_path / "s1.safetensors", state)
    save_state(tmp_path / "s2.safetensors", state)
    assert (tmp_path / "s1.safetensors").read_bytes() == (tmp_path / "s2.safetensors").read_bytes()
    assert load_state(tmp_path / "s1.safetensors")["step"] == 7


def test_two_preprocess_and_extract_runs_give_the_same_bytes(toy_data, tmp_path, cli):
    from mmcli.formats.tensorset import TensorSet
    from mmcli.models import build_model

    out = tmp_path / "tensors"
    args = ["preprocess", toy_data, "-o", out, "--image-size", 16, "--audio-seconds", 0.1, "-q"]
    assert cli(*args).exit_code == 0
    first = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert cli(*args, "--overwrite").exit_code == 0
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))} == first
    torch.manual_seed(0)
    model = tmp_path / "m.safetensors"
    build_model({"image": "tiny", "text": "tiny"}, inputs=TensorSet(out).specs).to_checkpoint(model)
    feats = tmp_path / "feats"
    args = ["extract", out, "-o", feats, "--model", model, "-q"]
    assert cli(*args).exit_code == 0
    first = {p.name: p.read_bytes() for p in sorted(feats.glob("*.safetensors"))}
    assert first and cli(*args, "--overwrite").exit_code == 0
    assert {p.name: p.read_bytes() for p in sorted(feats.glob("*.safetensors"))} == first
