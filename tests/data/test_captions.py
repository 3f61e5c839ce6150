"""Captions travel whole: shards carry the strings beside the byte tokens, and a
pretrained text encoder tokenizes the full caption with its own tokenizer (truncation at
its context length counted); shards from before the strings were kept still work."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pm = pytest.importorskip("pretrained_models")
pytest.importorskip("transformers")

CAPTIONS = [
    "a dog",
    "a very long caption that goes on and on about a red square and a blue circle " * 2,
    "ein Hund läuft über die Wiese",
    "猫が座っている",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mmcli.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("captions")
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(CAPTIONS):
            f.write(
                json.dumps({"id": f"t{i}", "text": [text, text.upper()]}, ensure_ascii=False) + "\n"
            )
    out = root / "tensors"
    preprocess(str(root / "manifest.jsonl"), str(out), config=PreprocessConfig(context_length=16))
    return {"root": root, "tensors": out, "bert": pm.hf_bert(root / "bert", pooling="mean")}


def test_shards_keep_every_caption_whole_beside_the_byte_tokens(data):
    from mmcli.data.captions import caption_rows
    from mmcli.formats.tensorfile import TensorSet

    ts = TensorSet(data["tensors"])
    assert ts.tables == ["text"]  # the string column is not a table
    shard = ts.shards[0]
    want = [c for text in CAPTIONS for c in (text, text.upper())]
    assert caption_rows(shard) == want
    assert shard.extra("stats")["truncated"] == 6  # the byte tokens: all but "a dog" cut at 16


def _expected(folder, captions):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(captions, padding=True, truncation=True, max_length=12, return_tensors="pt")
        states = ref(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((states * m).sum(1) / m.sum(1), dim=-1)


def test_a_pretrained_text_encoder_reads_the_full_captions_and_counts_its_cuts(data, tmp_path):
    from transformers import AutoTokenizer

    from mmcli.extract import extract
    from mmcli.formats.tensorfile import TensorSet

    folder = str(data["bert"])
    summary = extract(
        data["tensors"], tmp_path / "f", encoders={"text": f"hf:{folder}"}, dtype="float32"
    )
    want = [c for text in CAPTIONS for c in (text, text.upper())]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(folder)(want)["input_ids"]]
    assert (
        summary["truncated"] == {"text": sum(n > 12 for n in lengths)}
        and summary["truncated"]["text"] >= 2
    )
    assert summary["context_length"] == {"text": 12}
    got, _ = TensorSet(tmp_path / "f").table("text")
    assert F.cosine_similarity(got, _expected(folder, want)).min() >= 0.9999
    spec = TensorSet(tmp_path / "f").spec("text")
    assert spec["tokenizer"] == {"tokenizer": f"hf:{folder}", "context_length": 12}


def test_old_shards_without_caption_strings_still_work(data, tmp_path, caplog):
    from mmcli.extract import extract
    from mmcli.formats.tensorfile import Shard, ShardFile, TensorSet, write_shard

    src = ShardFile(next(data["tensors"].glob("data-*.safetensors")))
    old = tmp_path / "old" / "data-00000-of-00001.safetensors"
    old.parent.mkdir()
    shard = Shard(
        ids=src.ids(), tables={"text": src.numpy("text")}, items={"text": src.item_index("text")}
    )
    write_shard(old, shard, kind="tensors", specs=src.specs, extra={"stats": src.extra("stats")})
    with caplog.at_level("WARNING", logger="mmcli"):
        extract(
            old.parent, tmp_path / "f", encoders={"text": f"hf:{data['bert']}"}, dtype="float32"
        )
    assert (
        "holds no caption strings" in caplog.text
        and "6 caption(s) stay cut at 16 bytes" in caplog.text
    )
    from mmcli.data.text import ByteTokenizer

    decoded = [ByteTokenizer(16).decode(row) for row in src.numpy("text")]
    assert decoded[0] == "a dog" and len(decoded[2]) < len(CAPTIONS[1])  # the byte cut stays
    got, _ = TensorSet(tmp_path / "f").table("text")
    assert F.cosine_similarity(got, _expected(str(data["bert"]), decoded)).min() >= 0.9999
