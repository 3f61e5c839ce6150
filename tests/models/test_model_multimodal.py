"""MultimodalModel: build, encode, heads, checkpoints that rebuild with no code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcli.data.text import ByteTokenizer
from mmcli.errors import BadInput
from mmcli.formats.checkpoint import Checkpoint, save_checkpoint
from mmcli.models import (
    ModelConfig,
    MultimodalModel,
    build_model,
    fusion_kinds,
    register_fusion,
)
from mmcli.models.registry import _FUSION

IMAGES = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
TEXT = torch.from_numpy(ByteTokenizer(20).encode_batch(["a", "bb bb", "ccc ccc ccc"])[0])
AUDIO = torch.randn(3, 2000).half()


def _model(**kw):
    torch.manual_seed(0)
    return build_model(
        {
            "image": "convnet:width=8",
            "text": "transformer:width=32,depth=1,heads=2",
            "audio": "tiny",
        },
        **kw,
    )


def test_encode_normalizes_and_has_stable_keys():
    model = _model()
    assert model.modalities == ["image", "text", "audio"] and model.space == "backbone"
    with torch.no_grad():
        z = model.encode("image", IMAGES)
        assert z.shape == (3, 256) and torch.allclose(z.norm(dim=-1), torch.ones(3))
        raw = model.encode("text", TEXT, normalize=False)
        assert raw.shape == (3, 32) and not torch.allclose(raw.norm(dim=-1), torch.ones(3))
        pooled, tokens, mask = model.encode_tokens("audio", AUDIO)
        assert tokens.shape[0] == 3 and mask.all()
    keys = model.state_dict().keys()
    assert all(k.split(".")[0] == "encoders" for k in keys)
    assert any(k.startswith("encoders.image.features.") for k in keys)
    with pytest.raises(BadInput, match="the model has no video encoder"):
        model.encode("video", IMAGES)


def test_heads_project_to_the_joint_space():
    model = _model(
        heads={
            "image": {"kind": "linear", "in_dim": 256, "out_dim": 64},
            "text": {"kind": "mlp", "in_dim": 32, "out_dim": 64, "hidden": 48},
            "audio": {"kind": "identity"},
        },
        embed_dim=64,
    )
    assert model.space == "joint"
    assert [model.out_dim(m) for m in model.modalities] == [64, 64, 16]
    assert any(k.startswith("heads.text.") for k in model.state_dict())
    with torch.no_grad():
        assert model.encode("text", TEXT).shape == (3, 64)


def test_inputs_decide_sample_rate_and_context_length():
    model = build_model(
        {"audio": "melcnn", "text": "transformer"},
        inputs={"audio": {"sample_rate": 8000, "seconds": 1.0}, "text": {"context_length": 128}},
    )
    assert model.config.encoders["audio"]["config"]["sample_rate"] == 8000
    assert model.config.encoders["text"]["config"]["context_length"] == 128
    assert model.config.inputs["audio"] == {"sample_rate": 8000, "seconds": 1.0}
    short = build_model({"text": "transformer"}, inputs={"text": {"context_length": 16}})
    assert short.config.encoders["text"]["config"]["context_length"] == 77  # default kept
    explicit = build_model(
        {"audio": "melcnn:sample_rate=22050"}, inputs={"audio": {"sample_rate": 8000}}
    )
    assert explicit.config.encoders["audio"]["config"]["sample_rate"] == 22050


def test_checkpoint_round_trip_rebuilds_with_no_code(tmp_path):
    model = _model(heads={"image": {"kind": "linear", "in_dim": 256, "out_dim": 16}}, embed_dim=16)
    path = tmp_path / "model.safetensors"
    model.to_checkpoint(path, train={"lr": 0.1}, state={"step": 7}, metrics={"recall@1": 0.5})
    again = MultimodalModel.from_checkpoint(path)
    assert again.config == ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert again.checkpoint["path"] == str(path) and len(again.checkpoint["sha256"]) == 64
    assert again.checkpoint_meta["state"] == {"step": 7}
    with torch.no_grad():
        for m, x in (("image", IMAGES), ("text", TEXT), ("audio", AUDIO)):
            assert torch.equal(model.encode(m, x), again.encode(m, x))
    # no pickle anywhere: plain safetensors with JSON metadata
    assert set(load_file(str(path))) == set(model.state_dict())


def test_info_shows_the_model_config(tmp_path, cli):
    path = tmp_path / "model.safetensors"
    model = _model()
    model.to_checkpoint(path)
    result = cli("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "model"
    # the convnet's BatchNorm statistics are saved too, but are not parameters
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    image = info["model"]["encoders"]["image"]
    assert image["name"] == "convnet"
    assert {"width": 8, "depth": 4, "dim": 256, "dropout": 0.0}.items() <= image["config"].items()


def test_checkpoint_of_another_architecture_is_one_clear_line(tmp_path):
    a = _model()
    b = build_model({"image": "resnet18"})
    path = tmp_path / "mixed.safetensors"
    save_checkpoint(path, Checkpoint(config=a.config.to_dict(), state_dict=b.state_dict()))
    with pytest.raises(BadInput) as e:
        MultimodalModel.from_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: weights do not match its model config: missing")
    assert "\n" not in msg

    bad = a.config.to_dict()
    bad["encoders"]["image"]["name"] = "resnet1000"
    save_checkpoint(path, Checkpoint(config=bad, state_dict=a.state_dict()))
    with pytest.raises(
        BadInput, match="cannot rebuild the model: unknown image encoder 'resnet1000'"
    ):
        MultimodalModel.from_checkpoint(path)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(BadInput, match="not an mmcli model checkpoint"):
        MultimodalModel.from_checkpoint(plain)


def test_unknown_fusion_kind_and_the_fusion_hook(tmp_path):
    config = _model().config.to_dict()
    config["fusion"] = {"kind": "cross_attention", "dim": 8}
    with pytest.raises(BadInput, match="fusion module of kind 'cross_attention'"):
        MultimodalModel(ModelConfig.from_dict(config))

    @register_fusion("mean_test")
    def build(cfg, model):
        return torch.nn.Linear(cfg["dim"], cfg["dim"])

    try:
        config["fusion"] = {"kind": "mean_test", "dim": 8}
        model = MultimodalModel(ModelConfig.from_dict(config))
        assert any(k.startswith("fusion.") for k in model.state_dict())
        model.to_checkpoint(tmp_path / "f.safetensors")
        assert MultimodalModel.from_checkpoint(tmp_path / "f.safetensors").fusion is not None
    finally:
        del _FUSION["mean_test"]


def test_every_fusion_kind_builds_and_fuses():
    assert fusion_kinds() == ("none", "concat", "attention")
    base = _model()
    for kind in fusion_kinds():
        d = base.config.to_dict()
        del d["encoders"]["audio"]
        d["heads"] = {
            m: {"kind": "linear", "in_dim": base.encoders[m].out_dim, "out_dim": 16}
            for m in ("image", "text")
        }
        d["embed_dim"] = 16
        d["fusion"] = None if kind == "none" else {"kind": kind, "width": 16, "heads": 2}
        model = MultimodalModel(ModelConfig.from_dict(d)).eval()
        assert model.fusion_kind == kind and (model.fusion is None) == (kind == "none")
        with torch.no_grad():
            fused = model.fuse({"image": IMAGES, "text": TEXT})
        assert fused.shape == (3, 16) and torch.allclose(fused.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="means no module"):
        register_fusion("none")


def test_config_from_a_newer_mmcli_is_refused():
    d = _model().config.to_dict()
    with pytest.raises(BadInput, match="unknown entries \\(teleport\\)"):
        ModelConfig.from_dict({**d, "teleport": 1})
    with pytest.raises(BadInput, match="version 9 is newer"):
        ModelConfig.from_dict({**d, "version": 9})
