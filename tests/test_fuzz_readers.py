"""Fuzzing the readers with hypothesis: safetensors headers, metadata and checkpoint
configs, random or mutated from valid ones, fed in-process to ShardFile / TensorSet /
FeatureSet / describe (``mmcli info``) / the checkpoint loader.

The property: each input is either refused with :class:`BadInput` (one line: exit 2) or
read correctly (every accessor works and agrees with the header); never another
exception, never a hang (an alarm per example), never an allocation beyond a stated
bound (tracemalloc for the numpy readers, resident-memory growth for the model loader).
Bounded to a few seconds: fixed example counts, derandomized so the suite is reproducible.
"""

from __future__ import annotations

import json
import resource
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hostile import feature_file, header, no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmcli.errors import BadInput
from mmcli.formats.safetensors_io import DTYPES

FUZZ = settings(
    max_examples=80,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
READ_BOUND = 32 * 2**20  # bytes traced while reading one fuzzed file of < 64 kB
LOAD_BOUND_MB = 512  # resident growth over all fuzzed checkpoint loads
TMP = Path(tempfile.mkdtemp(prefix="mmcli-fuzz-"))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
NAMES = ["image", "text", "audio", "fused", "image.item", "text.item", "audio.item"]
NAMES += ["item.id.bytes", "item.id.offsets", "item.label", "x.y", ""]
dims = st.integers(min_value=-2, max_value=6) | st.sampled_from([2**31, 2**63, 10**30])
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(list(DTYPES)) | json_values,
        "shape": st.lists(dims, max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(min_value=-8, max_value=600), min_size=2, max_size=2)
        | json_values,
    }
)
META_KEYS = ["mmcli.format", "mmcli.kind", "mmcli.tables", "mmcli.labels", "mmcli.source"]
META_KEYS += ["mmcli.shard", "mmcli.stats", "mmcli.errors"]
meta_values = st.sampled_from(
    ["1", "2", "tensors", "features", "model", "[]", "{}"]
) | json_values.map(json.dumps)
metadata = st.dictionaries(st.sampled_from(META_KEYS), meta_values, max_size=8) | json_values


def _file(head, data: bytes) -> bytes:
    text = json.dumps(head, allow_nan=True).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def random_files(draw):
    head = draw(st.dictionaries(st.sampled_from(NAMES), entries | json_values, max_size=6))
    if draw(st.booleans()):
        head["__metadata__"] = draw(metadata)
    return _file(head, draw(st.binary(max_size=600)))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _replace(obj, path, value):
    if not path:
        return value
    out = obj.copy() if isinstance(obj, (dict, list)) else obj
    out[path[0]] = _replace(obj[path[0]], path[1:], value)
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _like(old):
    """Values of the same kind as ``old`` (so that some mutants stay valid)."""
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int):
        return st.integers(min_value=0, max_value=64)
    if isinstance(old, float):
        return st.floats(min_value=-10, max_value=10)
    return st.just(old)


@st.composite
def mutated(draw, head: dict, data: bytes, json_meta: tuple[str, ...] = (), within=()):
    """A valid header with one value (anywhere under the path ``within``, metadata JSON
    included) replaced, and maybe one data byte changed."""
    head = json.loads(json.dumps(head))
    for key in json_meta:  # mutate inside the JSON strings too
        if key in head["__metadata__"]:
            head["__metadata__"][key] = json.loads(head["__metadata__"][key])
    paths = [p for p in list(_paths(head))[1:] if p[: len(within)] == tuple(within)]
    path = draw(st.sampled_from(paths))
    new = draw(json_values | st.integers(min_value=-3, max_value=10**12) | _like(_get(head, path)))
    head = _replace(head, path, new)
    for key in json_meta:
        meta = head.get("__metadata__")
        if isinstance(meta, dict) and key in meta and not isinstance(meta[key], str):
            meta[key] = json.dumps(meta[key], allow_nan=True)
    if data and draw(st.booleans()):
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return _file(head, data)


def _read_everything(raw: bytes) -> None:
    """Open ``raw`` with every reader and use all of it; BadInput is an accepted answer."""
    from mmcli.formats.describe import describe
    from mmcli.formats.features import FeatureSet
    from mmcli.formats.tensorfile import ShardFile, TensorSet

    sf = ShardFile("<fuzz>", data=raw)
    ids = sf.ids()
    assert len(ids) == sf.num_items and len(sf.labels()) == sf.num_items
    for name in sf.tables:
        items = sf.item_index(name)
        assert len(items) == sf.rows(name) and (len(items) == 0 or items.max() < sf.num_items)
        assert tuple(sf.tensor(name).shape) == sf.tensors[name].shape
    path = TMP / "fuzz.safetensors"
    path.write_bytes(raw)
    (summary,) = describe(path)
    assert summary.get("items", summary.get("tensors")) is not None
    ts = TensorSet(path)
    for name in ts.tables:
        data, items = ts.table(name)
        assert len(data) == len(items) == ts.rows(name)
    if sf.kind == "features":
        fs = FeatureSet.open(path)
        for name in fs.tables:
            x, items = fs.table(name)
            assert x.shape == (fs.rows(name), fs.dim(name))


def _check(raw: bytes) -> None:
    tracemalloc.start()
    try:
        with no_hang(20):
            try:
                _read_everything(raw)
            except BadInput as e:
                assert "\n" not in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < READ_BOUND, peak


@FUZZ
@given(random_files())
def test_random_headers_are_bad_input_or_read_correctly(raw):
    _check(raw)


_BASE = feature_file(TMP / "base.safetensors", items=6)
_HEAD, _DATA = header(_BASE)
_META_JSON = ("mmcli.tables", "mmcli.labels", "mmcli.source", "mmcli.shard")


@FUZZ
@given(mutated(_HEAD, _DATA, _META_JSON))
def test_mutated_feature_files_are_bad_input_or_read_correctly(raw):
    _check(raw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mmcli.models import MultimodalModel, build_model
    from mmcli.models.config import ModelConfig

    torch.manual_seed(0)
    head = {"kind": "linear", "in_dim": 16, "out_dim": 8}
    model = build_model(
        {"image": "tiny", "text": "tiny"},
        heads={"image": head, "text": head},
        embed_dim=8,
        inputs={"image": {"image_size": 16}, "text": {"context_length": 12}},
    )
    config = model.config.to_dict()
    config["fusion"] = {"kind": "attention", "width": 8, "depth": 1, "heads": 2}
    config["logit_scale"] = 2.6
    path = tmp_path_factory.mktemp("fuzzckpt") / "model.safetensors"
    MultimodalModel(ModelConfig.from_dict(config)).to_checkpoint(path)
    return header(path)


def test_checkpoint_configs_are_bad_input_or_load_correctly(checkpoint):
    from mmcli.models import MultimodalModel

    head, data = checkpoint
    stored = {k: v for k, v in head.items() if k != "__metadata__"}
    outcomes = {"loaded": 0, "refused": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(FUZZ, max_examples=50)
    @given(mutated(head, data, ("mmcli.model",), within=("__metadata__", "mmcli.model")))
    def load(raw):
        path = TMP / "ckpt.safetensors"
        path.write_bytes(raw)
        with no_hang(30):
            try:
                model = MultimodalModel.from_checkpoint(path)
            except BadInput as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
                return
        outcomes["loaded"] += 1
        state = model.state_dict()
        assert set(state) == set(stored)  # what loaded is what the file holds
        assert all(list(state[k].shape) == stored[k]["shape"] for k in state)

    load()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < LOAD_BOUND_MB, grown_mb
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes
