import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import (
    Shard,
    ShardFile,
    TensorSet,
    decode_ids,
    encode_ids,
    serialize_shard,
    shard_name,
    write_shard,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=50))
def test_id_column_round_trip(ids):
    data, offsets = encode_ids(ids)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and len(offsets) == len(ids) + 1
    assert decode_ids(data.tobytes(), offsets.tolist()) == ids


def _shard(ids, rng, label=True):
    n = len(ids)
    text_items = np.repeat(np.arange(n), 2)
    return Shard(
        ids=list(ids),
        tables={
            "image": rng.integers(0, 255, (n, 3, 4, 4), dtype=np.uint8),
            "text": rng.integers(0, 259, (2 * n, 7), dtype=np.int32),
        },
        items={"image": np.arange(n), "text": text_items},
        labels=np.arange(n) % 2 if label else None,
    )


def _write_set(folder, shards, **kw):
    kw = {"kind": "tensors", "specs": {"image": {"image_size": 4}}, "label_names": ["a", "b"], **kw}
    for i, s in enumerate(shards):
        write_shard(
            folder / shard_name("data", i, len(shards)), s, index=i, count=len(shards), **kw
        )


def test_shard_set_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    shards = [_shard(["a", "b", "中文"], rng), _shard(["d"], rng), _shard([], rng)]
    _write_set(tmp_path, shards)
    ts = TensorSet(tmp_path)
    assert ts.num_items == 4 and ts.ids() == ["a", "b", "中文", "d"]
    assert ts.labels().tolist() == [0, 1, 0, 0]
    assert ts.label_names == ["a", "b"] and ts.kind == "tensors"
    assert ts.tables == ["image", "text"] and ts.spec("image") == {"image_size": 4}
    images, image_items = ts.table("image")
    assert torch.equal(
        images, torch.from_numpy(np.concatenate([s.tables["image"] for s in shards]))
    )
    assert image_items.tolist() == [0, 1, 2, 3]
    _, text_items = ts.table("text")
    assert text_items.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # global item index across shards
    # the same set through a glob, a list of files, and a single file
    assert TensorSet(str(tmp_path / "data-*.safetensors")).ids() == ts.ids()
    assert TensorSet(sorted(tmp_path.iterdir())).ids() == ts.ids()
    assert TensorSet(tmp_path / shard_name("data", 1, 3)).ids() == ["d"]


def test_tables_are_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    _write_set(tmp_path, [_shard(["a", "b"], rng)])
    arr = ShardFile(tmp_path / shard_name("data", 0, 1)).numpy("image")
    assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap)


def test_bfloat16_and_float16_tables(tmp_path):
    x = torch.randn(3, 5).to(torch.bfloat16)
    write_shard(
        tmp_path / "f.safetensors",
        Shard(ids=["a", "b", "c"], tables={"image": x}, items={"image": np.arange(3)}),
        kind="features",
        specs={},
    )
    got, _ = TensorSet(tmp_path / "f.safetensors").table("image")
    assert got.dtype == torch.bfloat16 and torch.equal(got, x)


def test_incomplete_shard_set_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    _write_set(tmp_path, [_shard(["a"], rng), _shard(["b"], rng), _shard(["c"], rng)])
    (tmp_path / shard_name("data", 1, 3)).unlink()
    with pytest.raises(BadInput, match=r"incomplete shard set: missing data-00001-of-00003"):
        TensorSet(tmp_path)


def test_inconsistent_shards_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(
        tmp_path / "a.safetensors",
        _shard(["a"], rng),
        kind="tensors",
        specs={"image": {"image_size": 4}},
    )
    write_shard(
        tmp_path / "b.safetensors",
        _shard(["b"], rng),
        kind="tensors",
        specs={"image": {"image_size": 8}},
    )
    with pytest.raises(BadInput, match="table specs differ"):
        TensorSet(tmp_path)


def test_not_an_mmcli_file(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(BadInput, match="not an mmcli tensor file"):
        TensorSet(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(BadInput, match="not a safetensors file"):
        TensorSet(tmp_path / "junk.safetensors")
    with pytest.raises(BadInput, match="file not found"):
        TensorSet(tmp_path / "nope.safetensors")
    with pytest.raises(BadInput, match="matches no files"):
        TensorSet(str(tmp_path / "zzz*.safetensors"))


@pytest.mark.parametrize(
    "header",
    [b"[1, 2]", b'{"x": 3}', b'{"x": {"dtype": "F32", "shape": [1]}}', b'{"x": {"dtype": "F32"}}'],
)
def test_malformed_headers_are_bad_input(tmp_path, header):
    """A JSON header that is not safetensors' layout: one line (exit 2), not a crash."""
    import struct

    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(BadInput, match="not a safetensors file|unsupported dtype"):
        TensorSet(path)


def test_a_truncated_file_is_one_clear_line(tmp_path):
    """A shard cut short (an interrupted copy) is refused up front, from a path or from
    memory (stdin), not by an mmap or offset error later."""
    rng = np.random.default_rng(0)
    _write_set(tmp_path, [_shard(["a", "b", "c"], rng)])
    path = tmp_path / shard_name("data", 0, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(BadInput, match="truncated file: tensor .* but the file has"):
        TensorSet(path)
    with pytest.raises(BadInput, match="truncated file"):
        ShardFile("<stdin>", data=data[:-1])
    assert ShardFile("<stdin>", data=data).ids() == ["a", "b", "c"]


def test_serialized_bytes_read_back_from_memory():
    rng = np.random.default_rng(0)
    data = serialize_shard(
        _shard(["x", "y"], rng), kind="tensors", specs={}, source={"manifest": "m.jsonl"}
    )
    f = ShardFile("<stdin>", data=data)
    assert f.ids() == ["x", "y"] and f.source == {"manifest": "m.jsonl"}
    assert f.tensor("text").shape == (4, 7)


def test_invalid_table_names():
    with pytest.raises(ValueError):
        serialize_shard(
            Shard(ids=[], tables={"item.label": np.zeros(0)}, items={"item.label": np.zeros(0)}),
            kind="tensors",
            specs={},
        )


def test_where_paths_names_a_set_of_files_once():
    from mmcli.formats.tensorfile import where_paths

    assert where_paths(["a.safetensors"]) == "a.safetensors"
    assert where_paths(["a", "b", "c"]) == "a (+2 more)"
