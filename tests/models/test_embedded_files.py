"""A checkpoint of an hf:DIR model carries DIR's config and tokenizer: it rebuilds, with the
same outputs, after DIR is gone (or changed), and a tampered file is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pm = pytest.importorskip("pretrained_models")
pytest.importorskip("transformers")

from mmcli.errors import BadInput  # noqa: E402
from mmcli.models import MultimodalModel, load_model  # noqa: E402
from mmcli.models.adapters import embedded  # noqa: E402

CAPTIONS = ["a dog runs on the beach", "two red circles", "Zebra crossing at night!"]


def _text(model, captions=CAPTIONS):
    with torch.no_grad():
        return model.encode("text", captions)


def test_a_sentence_encoder_checkpoint_rebuilds_without_its_folder(tmp_path):
    """The real all-MiniLM-L6-v2 (tokenizer, 1_Pooling, max_seq_length): saved, its folder
    deleted, rebuilt from the checkpoint alone: the same sentence embeddings."""
    folder = tmp_path / "minilm"
    shutil.copytree(pm.minilm_folder(), folder)
    model = load_model(f"hf:{folder}")
    before = _text(model)
    model.to_checkpoint(tmp_path / "m.safetensors")
    shutil.rmtree(folder)
    again = MultimodalModel.from_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(_text(again), before)
    files = again.encoders["text"].hf_files
    assert "tokenizer.json" in files and "1_Pooling/config.json" in files
    assert not any(n.endswith(".safetensors") for n in files)  # the weights are the checkpoint's
    # saved again from the rebuilt model: the same files travel on
    again.to_checkpoint(tmp_path / "m2.safetensors")
    third = MultimodalModel.from_checkpoint(tmp_path / "m2.safetensors")
    assert torch.equal(_text(third), before)


def test_a_clip_checkpoint_uses_its_own_files_not_a_changed_folder(tmp_path):
    """Both towers of a CLIP folder; DIR is then replaced by another model with another
    tokenizer setting: the checkpoint still rebuilds the saved model."""
    folder = pm.hf_clip(tmp_path / "clip", seed=1)
    model = load_model(f"hf:{folder}")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        before = _text(model), model.encode("image", images)
    model.to_checkpoint(tmp_path / "c.safetensors")
    shutil.rmtree(folder)
    pm.hf_clip(folder, seed=7)  # another model at the same path
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 12  # a change the rebuild must not see
    (folder / "config.json").write_text(json.dumps(cfg))
    again = MultimodalModel.from_checkpoint(tmp_path / "c.safetensors")
    with torch.no_grad():
        after = _text(again), again.encode("image", images)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def _tampered(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        keys = f.keys()
        tensors = {k: f.get_tensor(k) for k in keys}
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_tampered_or_unsafe_embedded_files_are_refused(tmp_path):
    folder = pm.hf_bert(tmp_path / "bert")
    load_model(f"hf:{folder}").to_checkpoint(tmp_path / "b.safetensors")

    def flip(tensors):
        key = next(k for k in tensors if k.endswith("/config.json"))
        tensors[key] = tensors[key].clone()
        tensors[key][3] ^= 1

    _tampered(tmp_path / "b.safetensors", tmp_path / "flip.safetensors", flip)
    with pytest.raises(BadInput, match="do not match their digest"):
        MultimodalModel.from_checkpoint(tmp_path / "flip.safetensors")

    def escape(tensors):
        key = next(k for k in tensors if k.endswith("/config.json"))
        tensors[key.replace("config.json", "../../evil.json")] = tensors.pop(key)

    _tampered(tmp_path / "b.safetensors", tmp_path / "escape.safetensors", escape)
    with pytest.raises(BadInput, match="embedded file .* is not valid"):
        MultimodalModel.from_checkpoint(tmp_path / "escape.safetensors")
    assert not (tmp_path / "evil.json").exists()

    def drop(tensors):
        for k in [k for k in tensors if k.startswith(embedded.PREFIX)]:
            del tensors[k]

    _tampered(tmp_path / "b.safetensors", tmp_path / "drop.safetensors", drop)
    with pytest.raises(BadInput, match="names embedded files it does not hold"):
        MultimodalModel.from_checkpoint(tmp_path / "drop.safetensors")


def test_the_files_are_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCLI_CACHE_DIR", str(tmp_path / "cache"))
    folder = pm.hf_bert(tmp_path / "bert")
    load_model(f"hf:{folder}").to_checkpoint(tmp_path / "b.safetensors")
    MultimodalModel.from_checkpoint(tmp_path / "b.safetensors")
    unpacked = list((tmp_path / "cache" / "hf").iterdir())
    assert len(unpacked) == 1 and (unpacked[0] / "1_Pooling" / "config.json").is_file()
    MultimodalModel.from_checkpoint(tmp_path / "b.safetensors")
    assert list((tmp_path / "cache" / "hf").iterdir()) == unpacked


def test_info_counts_weights_not_files(tmp_path, cli):
    folder = pm.hf_bert(tmp_path / "bert")
    model = load_model(f"hf:{folder}")
    model.to_checkpoint(tmp_path / "b.safetensors")
    r = cli("info", tmp_path / "b.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(info["embedded_files"]) == {
        "config.json", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json",
        "1_Pooling/config.json",
    }  # fmt: skip
