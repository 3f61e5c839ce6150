"""extract (library): exactness vs a direct forward, layout, resume, specs, the fusion hook."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from extract_data import LABELS, SOURCE, make_shards

from mmcli.errors import BadInput
from mmcli.extract import extract
from mmcli.formats.tensorfile import ShardFile, TensorSet
from mmcli.models import MultimodalModel, build_model

ENCODERS = {
    "image": "convnet:width=8",
    "text": "transformer:width=32,depth=1,heads=2",
    "audio": "melcnn:width=4,depth=2",
}


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ENCODERS, inputs={"audio": {"sample_rate": 8000}}, **kw)


def _direct(model, shard_path, table, normalize=True):
    with torch.no_grad():
        return model.encode(table, ShardFile(shard_path).tensor(table), normalize=normalize)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "tensors", shards=3, items=5)


def test_output_equals_a_direct_forward(shards, tmp_path):
    model = _model()
    out = tmp_path / "feats"
    summary = extract(shards, out, model, device="cpu", batch_size=3, dtype="float32")
    assert summary["written"] == 3 and summary["skipped"] == 0
    assert summary["rows"] == {"image": 15, "text": 27, "audio": 15}
    assert sorted(p.name for p in out.iterdir()) == [
        f"features-0000{i}-of-00003.safetensors" for i in range(3)
    ]
    feats = TensorSet(out)
    assert feats.kind == "features" and feats.tables == ["image", "text", "audio"]
    for i, src in enumerate(shards):
        got, want = ShardFile(out / f"features-0000{i}-of-00003.safetensors"), ShardFile(src)
        assert got.ids() == want.ids()
        assert np.array_equal(got.labels(), want.labels()) and got.label_names == LABELS
        assert got.source == SOURCE and got.shard_position == (i, 3)
        for m in ("image", "text", "audio"):
            assert np.array_equal(got.item_index(m), want.item_index(m))
            torch.testing.assert_close(got.tensor(m), _direct(model, src, m), rtol=1e-4, atol=1e-5)


def test_float16_default_and_no_normalize(shards, tmp_path):
    model = _model()
    extract(shards[:1], tmp_path / "a.safetensors", model, device="cpu", normalize=False)
    got = ShardFile(tmp_path / "a.safetensors")
    assert got.tensor("image").dtype == torch.float16
    want = _direct(model, shards[0], "image", normalize=False)
    torch.testing.assert_close(got.tensor("image").float(), want, rtol=2e-3, atol=2e-3)
    assert got.specs["image"]["normalized"] is False


def test_specs_record_how_features_were_made(shards, tmp_path):
    extract(shards, tmp_path / "f", encoders={"image": "tiny", "audio": "tiny"}, device="cpu")
    spec = TensorSet(tmp_path / "f").specs
    assert set(spec) == {"image", "audio"}
    assert spec["image"]["encoder"] == "tiny" and spec["image"]["dim"] == 16
    assert spec["image"]["encoder_config"] == {"width": 8, "dim": 16}
    assert spec["image"]["weights"] is None and spec["image"]["seed"] == 0
    assert spec["image"]["space"] == "backbone" and spec["image"]["model"] is None
    assert spec["image"]["input"]["image_size"] == 32 and spec["image"]["dtype"] == "float16"
    assert spec["audio"]["encoder_config"]["sample_rate"] == 8000  # taken from the input


def test_random_init_is_reproducible_from_the_seed(shards, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        extract(
            shards[:1], tmp_path / f"{name}.safetensors", encoders={"image": "convnet"}, seed=seed
        )
    a, b, c = (ShardFile(tmp_path / f"{n}.safetensors").tensor("image") for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_after_a_killed_run(shards, tmp_path):
    """Interrupt after the first shard; --resume keeps it and does the rest."""
    out = tmp_path / "feats"

    @contextlib.contextmanager
    def dies_after_first_shard(*a, **k):
        class Bar:
            rows = 0

            def update(self, n=1, **fields):
                self.rows += n
                if self.rows > 5 + 9 + 5:  # the first shard's image, text, audio rows
                    raise KeyboardInterrupt

        yield Bar()

    with pytest.raises(KeyboardInterrupt):
        extract(shards, out, encoders=ENCODERS, batch_size=5, progress=dies_after_first_shard)
    assert [p.name for p in out.iterdir()] == ["features-00000-of-00003.safetensors"]
    first = (out / "features-00000-of-00003.safetensors").read_bytes()

    with pytest.raises(BadInput, match="already holds 1 features shard.*--resume"):
        extract(shards, out, encoders=ENCODERS)
    with pytest.raises(BadInput, match="different extract run"):
        extract(shards, out, encoders={**ENCODERS, "image": "convnet:width=16"}, resume=True)

    summary = extract(shards, out, encoders=ENCODERS, resume=True)
    assert summary["skipped"] == 1 and summary["written"] == 2
    assert (out / "features-00000-of-00003.safetensors").read_bytes() == first
    fresh = tmp_path / "fresh"
    extract(shards, fresh, encoders=ENCODERS)
    for name in sorted(p.name for p in fresh.iterdir()):
        a, b = ShardFile(out / name), ShardFile(fresh / name)
        for m in ENCODERS:
            assert torch.equal(a.tensor(m), b.tensor(m))
    again = extract(shards, out, encoders=ENCODERS, resume=True)
    assert again["skipped"] == 3 and again["written"] == 0


def test_stale_temp_files_of_a_killed_run_are_removed(shards, tmp_path):
    out = tmp_path / "feats"
    out.mkdir()
    stale = out / ".features-00001-of-00003.safetensors.abc123.tmp"
    stale.write_bytes(b"half")
    extract(shards, out, encoders={"image": "tiny"}, resume=True)
    assert not stale.exists() and len(list(out.iterdir())) == 3


def test_model_checkpoint_gives_joint_embeddings(shards, tmp_path):
    model = _model(
        heads={
            "image": {"kind": "linear", "in_dim": 256, "out_dim": 24},
            "text": {"kind": "mlp", "in_dim": 32, "out_dim": 24},
        },
        embed_dim=24,
    )
    ckpt = tmp_path / "model.safetensors"
    model.to_checkpoint(ckpt)
    summary = extract(shards[:2], tmp_path / "joint", str(ckpt), dtype="float32")
    assert summary["space"] == "joint" and summary["dims"]["image"] == 24
    feats = TensorSet(tmp_path / "joint")
    spec = feats.specs["text"]
    assert spec["space"] == "joint" and spec["model"]["path"] == str(ckpt)
    assert len(spec["model"]["sha256"]) == 64 and spec["head"]["kind"] == "mlp"
    torch.testing.assert_close(
        feats.shards[1].tensor("text"), _direct(model, shards[1], "text"), rtol=1e-4, atol=1e-5
    )


def test_model_modalities_missing_from_the_input(tmp_path):
    only_text = make_shards(tmp_path / "t", shards=1, modalities=("text",))
    model = _model()
    summary = extract(only_text, tmp_path / "o.safetensors", model)
    assert list(summary["rows"]) == ["text"]
    only_image = build_model({"image": "tiny"})
    with pytest.raises(BadInput, match="the model encodes image but the input has text"):
        extract(only_text, tmp_path / "p.safetensors", only_image)


def test_shard_with_no_rows_of_a_table(tmp_path):
    from mmcli.formats.tensorfile import Shard, write_shard

    src = tmp_path / "empty.safetensors"
    shard = Shard(
        ids=["a"],
        tables={"text": np.zeros((0, 8), dtype=np.int32)},
        items={"text": np.zeros(0, dtype=np.int64)},
    )
    write_shard(src, shard, kind="tensors", specs={"text": {"context_length": 8}})
    extract(src, tmp_path / "out.safetensors", encoders={"text": "bow"})
    assert ShardFile(tmp_path / "out.safetensors").tensor("text").shape == (0, 256)


def test_inputs_that_are_not_tensor_shards(shards, tmp_path):
    extract(shards[:1], tmp_path / "f.safetensors", encoders={"image": "tiny"})
    with pytest.raises(BadInput, match="the input is a features file, extract reads tensor shards"):
        extract(tmp_path / "f.safetensors", tmp_path / "g.safetensors", encoders={"image": "tiny"})
    with pytest.raises(BadInput, match="holds one file but the input has 3 shards"):
        extract(shards, tmp_path / "g.safetensors", encoders={"image": "tiny"})
    with pytest.raises(BadInput, match="no audio table in the input \\(it has: image, text\\)"):
        two = make_shards(tmp_path / "two", shards=1, modalities=("image", "text"))
        extract(two, tmp_path / "h", encoders={"audio": "tiny"})
    with pytest.raises(BadInput, match="--weights .* say which encoder"):
        extract(
            shards, tmp_path / "i", encoders={"image": "tiny", "text": "tiny"}, weights={"": "w.pt"}
        )
    assert not (tmp_path / "h").exists() and not (tmp_path / "i").exists()


def test_model_from_checkpoint_is_a_multimodal_model(tmp_path):
    model = _model()
    model.to_checkpoint(tmp_path / "m.safetensors")
    assert isinstance(MultimodalModel.from_checkpoint(tmp_path / "m.safetensors"), MultimodalModel)


def test_model_over_features_projects_a_features_file(shards, tmp_path):
    """A fuse-train model over frozen features (``features`` encoders) reads features files."""
    pytest.importorskip("mmcli.models.passthrough")
    from mmcli.models import ModelConfig

    extract(
        shards[:1], tmp_path / "backbone.safetensors", encoders={"image": "tiny"}, dtype="float32"
    )
    config = ModelConfig(
        encoders={"image": {"name": "features", "config": {"dim": 16}}},
        heads={"image": {"kind": "linear", "in_dim": 16, "out_dim": 8}},
        embed_dim=8,
    )
    torch.manual_seed(0)
    model = MultimodalModel(config)
    model.to_checkpoint(tmp_path / "m.safetensors")
    extract(
        tmp_path / "backbone.safetensors",
        tmp_path / "joint.safetensors",
        str(tmp_path / "m.safetensors"),
    )
    got = ShardFile(tmp_path / "joint.safetensors")
    feats = ShardFile(tmp_path / "backbone.safetensors").tensor("image")
    with torch.no_grad():
        want = model.encode("image", feats)
    torch.testing.assert_close(got.tensor("image").float(), want, rtol=2e-3, atol=2e-3)
    assert got.specs["image"]["input"]["encoder"] == "tiny"  # the backbone spec travels along

    with pytest.raises(BadInput, match="takes 16-d features, the input image table is uint8"):
        extract(shards[:1], tmp_path / "x.safetensors", str(tmp_path / "m.safetensors"))
    raw = _model()
    with pytest.raises(BadInput, match=r"the image table is float32 \[5, 16\] \(features\)"):
        extract(tmp_path / "backbone.safetensors", tmp_path / "y.safetensors", raw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_matches_cpu(shards, tmp_path, precision):
    """pinned memory, non-blocking copies, channels_last and autocast on the GPU (pytest -m cuda)."""
    extract(shards, tmp_path / "cpu", encoders=ENCODERS, device="cpu", dtype="float32")
    extract(
        shards,
        tmp_path / "gpu",
        encoders=ENCODERS,
        device="cuda",
        precision=precision,
        dtype="float32",
    )
    tol = 1e-3 if precision == "fp32" else 3e-2
    for name in sorted(p.name for p in (tmp_path / "cpu").iterdir()):
        a, b = ShardFile(tmp_path / "cpu" / name), ShardFile(tmp_path / "gpu" / name)
        for m in ENCODERS:
            torch.testing.assert_close(b.tensor(m), a.tensor(m), rtol=tol, atol=tol)
