"""Hostile and corrupt files: every reader refuses them with one line (BadInput, exit 2)
before using them; nothing hangs, nothing is silently wrong (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest
from hostile import (
    DEEP,
    feature_file,
    fifo,
    header,
    no_hang,
    rewrite,
    rewrite_column,
    set_meta,
    write,
)

from mmcli.errors import BadInput
from mmcli.formats.features import FeatureSet
from mmcli.formats.tensorfile import ShardFile, TensorSet


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return feature_file(tmp_path_factory.mktemp("hostile") / "f.safetensors")


def _shift(name, new_dtype=None, **fields):
    def change(h):
        if new_dtype:
            h[name]["dtype"] = new_dtype
        h[name].update(fields)

    return change


def _overlap(h):  # the image table's bytes start where the text table's do
    n = h["image"]["data_offsets"][1] - h["image"]["data_offsets"][0]
    b = h["text"]["data_offsets"][0]
    h["image"]["data_offsets"] = [b, b + n]


def _as_int16(h):  # float32 [rows, D] read as int16 [rows, 2D]: same bytes, wrong kind
    for t in ("image", "text"):
        h[t]["dtype"] = "I16"
        h[t]["shape"] = [h[t]["shape"][0], h[t]["shape"][1] * 2]


HEADER_CASES = {
    "overlapping offsets": (_overlap, "tensors 'image' and 'text' overlap"),
    "item column float64": (_shift("image.item", "F64"), "image.item is float64"),
    "features int16": (_as_int16, "column image is int16 .* floating"),
    "item column too short": (
        lambda h: h["text.item"].update(
            shape=[1],
            data_offsets=[h["text.item"]["data_offsets"][0], h["text.item"]["data_offsets"][0] + 8],
        ),
        "text.item is int64 \\[1\\], the format says int64 \\[\\d+\\]",
    ),
    "dtype a list": (_shift("image", ["F32"]), "unsupported dtype \\['F32'\\]"),
    "negative shape": (_shift("image", shape=[-30, -8]), "negative dimension"),
    "shape of floats": (_shift("image", shape=[30.0, 8]), "bad shape"),
    "offsets of strings": (_shift("image", data_offsets=["0", "9"]), "bad data_offsets"),
    "label names a dict": (set_meta("mmcli.labels", '{"a": 1}'), "mmcli.labels"),
    "label names repeated": (set_meta("mmcli.labels", '["a", "a", "b"]'), "without repeats"),
    "tables spec a list": (set_meta("mmcli.tables", "[1]"), "mmcli.tables"),
    "metadata nested 100k deep": (set_meta("mmcli.tables", DEEP), "nested deeper than 100"),
    "labels nested deep": (set_meta("mmcli.labels", DEEP), "nested deeper than 100"),
    "metadata value an object": (
        lambda h: h["__metadata__"].__setitem__("mmcli.tables", {"a": 1}),
        "map of strings to strings",
    ),
    "shard index a string": (
        set_meta("mmcli.shard", '{"index": "x", "count": 1}'),
        "mmcli.shard",
    ),
    "format version a number": (set_meta("mmcli.format", "2"), "unsupported mmcli format"),
    "labels column of floats": (_shift("item.label", "F64"), "item.label is float64"),
    "id offsets int32": (
        _shift("item.id.offsets", "I32", shape=[62]),
        "item.id.offsets is int32",
    ),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_corrupt_headers_are_refused_on_open(base, tmp_path, cli, case):
    change, message = HEADER_CASES[case]
    bad = rewrite(base, tmp_path / "bad.safetensors", change)
    with pytest.raises(BadInput, match=message):
        FeatureSet.open(bad)
    r = cli("info", bad)  # and the CLI: one line, exit 2
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_header_nested_100k_deep_is_one_line(base, tmp_path, cli):
    head, data = header(base)
    raw = json.dumps(head).encode()[:-1] + b', "deep": ' + DEEP.encode() + b"}"
    bad = write(tmp_path / "deep.safetensors", None, data, raw_header=raw)
    with pytest.raises(BadInput, match="not a safetensors file .*nested deeper than 100"):
        ShardFile(bad)
    r = cli("info", bad)
    assert r.exit_code == 2 and "nested deeper" in r.stderr and r.stderr.count("\n") == 1


def _set(i, value):
    def change(a):
        a[i] = value

    return change


def _swap(a):
    a[5], a[6] = a[6], a[5]


COLUMN_CASES = {
    "id offset out of range": ("item.id.offsets", _set(5, 10**6), "corrupt item id column"),
    "id offsets going back": ("item.id.offsets", _swap, "corrupt item id column"),
    "id bytes not UTF-8": ("item.id.bytes", _set(0, 0xFF), "not valid UTF-8"),
    "item index out of range": ("text.item", _set(3, 10**6), "points to item 1000000"),
    "item index negative": ("image.item", _set(0, -1), "points to item -1"),
    "label index out of range": ("item.label", _set(0, 7), "label index 7 out of range"),
    "label index below -1": ("item.label", _set(0, -2), "label index -2 out of range"),
    "duplicate id": ("item.id.bytes", _set(5, ord("0")), "appears twice"),
}


@pytest.mark.parametrize("case", COLUMN_CASES)
def test_corrupt_columns_are_refused_before_use(base, tmp_path, cli, case):
    column, change, message = COLUMN_CASES[case]
    bad = rewrite_column(base, tmp_path / "bad.safetensors", column, change)
    with pytest.raises(BadInput, match=message):
        fs = FeatureSet.open(bad)  # ids and labels are read on open
        fs.table("image"), fs.table("text")
    r = cli("info", bad)
    assert r.exit_code == 2 and message.split()[0] in r.stderr and r.stderr.count("\n") == 1


def test_item_column_declared_float64_no_longer_gives_perfect_recall(tmp_path, cli):
    """The issue's case: int64 item indices read as float64 were all 0, so every caption
    matched item 0 and eval reported recall@1 = 1.0 on features whose truth is ~0.0."""
    from feature_files import toy_pairs, write_features

    img, ii, txt, ti = toy_pairs(300, 16, captions=(1, 1), noise=3.0)
    good = write_features(
        tmp_path / "f.safetensors",
        [f"it{i}" for i in range(300)],
        {"image": (img, ii), "text": (txt, ti)},
    )
    r = cli("eval", good, "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["metrics"]["image_retrieval_recall@1"] < 0.1
    bad = rewrite(good, tmp_path / "bad.safetensors", _shift("image.item", "F64"))
    r = cli("eval", bad, "-q")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "image.item is float64 [300]" in r.stderr


def test_tensor_tables_follow_the_contract(tmp_path, cli):
    """After preprocess: image uint8 [N,3,H,W], text ids inside the vocabulary."""
    from extract_data import make_shards

    (path,) = make_shards(tmp_path / "t", shards=1, items=4, modalities=("image", "text"))
    assert TensorSet(path).table("text")[0].max() < 259  # a valid file reads
    as_f16 = rewrite(
        path,
        tmp_path / "f16.safetensors",
        lambda h: h["image"].update(dtype="F16", shape=[*h["image"]["shape"][:-1], 16]),
    )
    with pytest.raises(BadInput, match="column image is float16 .* uint8 \\[rows, 3, H, W\\]"):
        TensorSet(as_f16)
    vocab = rewrite_column(path, tmp_path / "v.safetensors", "text", _set(1, 5000))
    with pytest.raises(BadInput, match="token id 5000 .* outside the tokenizer's vocabulary"):
        TensorSet(vocab).table("text")
    model = tmp_path / "m.safetensors"
    from mmcli.models import build_model

    build_model({"text": "tiny"}, inputs=TensorSet(path).specs).to_checkpoint(model)
    r = cli("extract", vocab, "-o", tmp_path / "out", "--model", model, "-q")
    assert r.exit_code == 2 and "token id 5000" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))


def test_non_regular_files_are_refused_before_opening(base, tmp_path):
    """A FIFO (or a device, or a folder) where a file is expected: one line, never a hang."""
    from mmcli.data.audio import AudioDecodeError, load_audio
    from mmcli.data.image import ImageDecodeError, load_image
    from mmcli.evaluate.summarize import load_results
    from mmcli.evaluate.zeroshot import load_templates
    from mmcli.formats.describe import describe
    from mmcli.formats.manifest import file_sha256, read_manifest
    from mmcli.models import MultimodalModel

    pipe = fifo(tmp_path / "pipe.safetensors")
    readers = {
        "ShardFile": lambda p: ShardFile(p),
        "TensorSet": lambda p: TensorSet(p),
        "FeatureSet": lambda p: FeatureSet.open(p),
        "describe": lambda p: describe(p),
        "checkpoint": lambda p: MultimodalModel.from_checkpoint(p),
        "manifest": lambda p: list(read_manifest(p)),
        "templates": lambda p: load_templates(p),
        "results": lambda p: load_results([p]),
        "sha256": lambda p: file_sha256(p),
    }
    with no_hang(60):
        for name, read in readers.items():
            for path, kind in ((pipe, "named pipe"), ("/dev/zero", "character device")):
                with pytest.raises(BadInput, match=kind):
                    read(path)
            if name not in ("describe", "TensorSet", "FeatureSet", "results"):  # take folders
                with pytest.raises(BadInput, match="got a folder"):
                    read(tmp_path)
        with pytest.raises(ImageDecodeError, match="named pipe"):
            load_image(pipe)
        with pytest.raises(AudioDecodeError, match="named pipe"):
            load_audio(pipe)
        # a folder of shards holding a FIFO: the FIFO is named, not opened
        folder = tmp_path / "shards"
        folder.mkdir()
        (folder / "a.safetensors").write_bytes(base.read_bytes())
        fifo(folder / "b.safetensors")
        with pytest.raises(BadInput, match="b.safetensors: the file is a named pipe"):
            FeatureSet.open(folder)


def _string_shard(tmp_path):
    """A tensor shard with a text table and its captions as given (``text.raw``)."""
    import numpy as np

    from mmcli.formats.tensorfile import Shard, write_shard

    captions = ["a dog", "ein Hund läuft", "猫"]
    shard = Shard(ids=["a", "b"])
    shard.tables["text"] = np.zeros((3, 4), dtype=np.int64)
    shard.items["text"] = np.asarray([0, 1, 1], dtype=np.int64)
    shard.strings["text.raw"] = captions
    path = tmp_path / "s.safetensors"
    write_shard(path, shard, kind="tensors", specs={"text": {"tokenizer": "bytes"}})
    return path, captions


def test_string_columns_follow_the_contract(tmp_path):
    """text.raw.bytes uint8 / text.raw.offsets int64 [rows + 1]: read like the item ids
    (offsets in order and in bounds, UTF-8); they are columns, never tables."""
    path, captions = _string_shard(tmp_path)
    sf = ShardFile(path)
    assert sf.tables == ["text"] and sf.has_strings("text.raw")
    assert sf.strings("text.raw") == captions
    short = rewrite(
        path,
        tmp_path / "short.safetensors",
        lambda h: h["text.raw.offsets"].update(
            shape=[3],
            data_offsets=[
                h["text.raw.offsets"]["data_offsets"][0],
                h["text.raw.offsets"]["data_offsets"][0] + 24,
            ],
        ),
    )
    with pytest.raises(BadInput, match=r"text.raw.offsets is int64 \[3\].* int64 \[4\]"):
        ShardFile(short)
    alone = rewrite(path, tmp_path / "alone.safetensors", lambda h: h.pop("text.raw.bytes"))
    with pytest.raises(BadInput, match="text.raw.offsets without text.raw.bytes"):
        ShardFile(alone)
    as_f32 = rewrite(path, tmp_path / "f.safetensors", _shift("text.raw.offsets", "F64"))
    with pytest.raises(BadInput, match="text.raw.offsets is float64"):
        ShardFile(as_f32)
    past = rewrite_column(path, tmp_path / "p.safetensors", "text.raw.offsets", _set(3, 999))
    with pytest.raises(BadInput, match="corrupt string column text.raw"):
        ShardFile(past).strings("text.raw")
    back = rewrite_column(path, tmp_path / "b.safetensors", "text.raw.offsets", _set(2, 3))
    with pytest.raises(BadInput, match="corrupt string column text.raw .*go back at item 1"):
        ShardFile(back).strings("text.raw")
    not_utf8 = rewrite_column(path, tmp_path / "u.safetensors", "text.raw.bytes", _set(0, 0xFF))
    with pytest.raises(BadInput, match="corrupt string column text.raw .*not valid UTF-8"):
        ShardFile(not_utf8).strings("text.raw")
