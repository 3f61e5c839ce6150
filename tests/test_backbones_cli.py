"""A model trained on frozen features takes raw queries: the backbones its features came
from are rebuilt from what the features record (encoder + weights and their sha256, or
the seed of a random init) and chained before its features encoders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from feature_files import make_pipeline

ENCODERS = ("--encoder", "image=convnet:width=8", "--encoder", "text=transformer:width=32,depth=1")


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli):
    """toy data -> backbone features (random init) -> fuse-train on them -> joint index."""
    p = make_pipeline(tmp_path_factory.mktemp("bb"), cli)
    root = p["root"]
    r = cli("extract", p["tensors"], "-o", root / "bb", *ENCODERS, "--seed", "3", "-q")
    assert r.exit_code == 0, r.stderr
    r = cli("fuse-train", root / "bb", "-o", root / "run", "--max-steps", "5", "--batch-size", "4",
            "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    p["ckpt"] = root / "run" / "last.safetensors"
    r = cli("extract", root / "bb", "-o", root / "joint", "--model", p["ckpt"], "-q")
    assert r.exit_code == 0, r.stderr
    return p


def manual_text_embedding(p, caption: str) -> torch.Tensor:
    """extract's backbone (rebuilt by hand: the same seed and encoders), fp16 rounding as
    stored, then the trained model: what extract + extract --model give a caption."""
    from mmcli.data.text import tokenizer_from_spec
    from mmcli.formats.tensorfile import TensorSet
    from mmcli.models import MultimodalModel, build_model

    specs = TensorSet(p["tensors"]).specs
    torch.manual_seed(3)
    bb = build_model({"image": "convnet:width=8", "text": "transformer:width=32,depth=1"},
                     inputs=specs).eval()  # fmt: skip
    ids, _ = tokenizer_from_spec(specs["text"]).encode_batch([caption])
    model = MultimodalModel.from_checkpoint(p["ckpt"])
    with torch.no_grad():
        feats = bb.encode("text", torch.from_numpy(ids)).half().float()
        return model.encode("text", feats)[0]


def test_retrieve_text_with_a_model_trained_on_features(run, cli):
    from mmcli.formats.features import FeatureSet

    r = cli("retrieve", "--index", run["root"] / "joint", "--model", run["ckpt"],
            "--text", "a red circle", "-k", "12")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    fs = FeatureSet.open(run["root"] / "joint")
    x, items = fs.table("image")
    scores = x.float() @ manual_text_embedding(run, "a red circle")
    want = [fs.ids[int(items[i])] for i in torch.argsort(scores, descending=True, stable=True)]
    assert [h["id"] for h in hits] == want
    np.testing.assert_allclose([h["score"] for h in hits], scores.sort(descending=True).values,
                               atol=1e-5)  # fmt: skip
    assert "the text backbone rebuilt: transformer" in r.stderr


def test_retrieve_image_file_and_extract_on_raw_tensors(run, cli):
    from mmcli.formats.features import FeatureSet

    r = cli(
        "extract", run["tensors"], "-o", run["root"] / "raw-joint", "--model", run["ckpt"], "-q"
    )
    assert r.exit_code == 0, r.stderr
    a, b = FeatureSet.open(run["root"] / "joint"), FeatureSet.open(run["root"] / "raw-joint")
    for table in ("image", "text"):  # raw tensors through the chain == features then the model
        xa, xb = a.table(table)[0].float(), b.table(table)[0].float()
        assert torch.nn.functional.cosine_similarity(xa, xb).min() > 0.999
    assert b.spec("image")["model"]["sha256"] == a.spec("image")["model"]["sha256"]
    photo = run["root"] / "raw" / "imgs" / "4.png"
    r = cli("retrieve", "--index", run["root"] / "raw-joint", "--image", photo, "-k", "1")
    assert r.exit_code == 0, r.stderr  # (the model the index names)
    hit = json.loads(r.stdout)["hits"][0]
    assert hit["id"] == "x4" and hit["score"] == pytest.approx(1.0, abs=2e-3)


def test_a_missing_or_changed_weights_file_is_one_line(run, cli, tmp_path):
    from safetensors.torch import save_file

    from mmcli.models import create

    weights = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_file(create("tiny", modality="text").state_dict(), str(weights))
    r = cli("extract", run["tensors"], "-o", tmp_path / "bb", "--encoder", "image=tiny",
            "--encoder", "text=tiny", "--weights", f"text={weights}", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("fuse-train", tmp_path / "bb", "-o", tmp_path / "run", "--max-steps", "1",
            "--batch-size", "4", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    args = ("retrieve", "--index", tmp_path / "bb", "--queries", tmp_path / "bb", "-k", "1")
    assert cli(*args).exit_code == 0  # features need no backbone
    query = (
        "extract",
        run["tensors"],
        "-o",
        tmp_path / "j",
        "--model",
        tmp_path / "run" / "last.safetensors",
    )
    shutil.move(weights, tmp_path / "away.safetensors")
    r = cli(*query)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert (
        f"the weights file {weights} that the features were extracted with is not there" in r.stderr
    )
    save_file({k: v + 1 for k, v in create("tiny", modality="text").state_dict().items()},
              str(weights))  # fmt: skip
    r = cli(*query)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "its sha256 changed" in r.stderr
    shutil.move(tmp_path / "away.safetensors", weights)
    r = cli(*query, "-q")
    assert r.exit_code == 0, r.stderr


def test_open_clip_backbones_take_raw_captions_and_images(tmp_path, cli):
    """Features of a tiny open_clip model's towers (its own tokenizer and transform) ->
    fuse-train -> retrieve --text / --image: the query goes through open_clip again."""
    pm = pytest.importorskip("pretrained_models")
    open_clip = pytest.importorskip("open_clip")
    from mmcli.formats.features import FeatureSet
    from mmcli.models import MultimodalModel

    photos = pm.photos(tmp_path / "photos", n=8)
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for i, p in enumerate(photos):
            f.write(
                json.dumps({"id": f"i{i}", "image": str(p), "text": f"photo {i} of a thing"}) + "\n"
            )
    cfg, weights = pm.open_clip_model(tmp_path / "oc", seed=2)
    like = f"open_clip:{cfg}"
    r = cli("preprocess", tmp_path / "manifest.jsonl", "-o", tmp_path / "t", "--like", like, "-q")
    assert r.exit_code == 0, r.stderr
    r = cli("extract", tmp_path / "t", "-o", tmp_path / "bb", "--encoder", f"image={like}",
            "--encoder", f"text={like}", "--weights", f"image={weights}", "--weights",
            f"text={weights}", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("fuse-train", tmp_path / "bb", "-o", tmp_path / "run", "--max-steps", "3",
            "--batch-size", "4", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ckpt = tmp_path / "run" / "last.safetensors"
    r = cli("extract", tmp_path / "bb", "-o", tmp_path / "joint", "--model", ckpt, "-q")
    assert r.exit_code == 0, r.stderr
    query = "a photo of a thing on a table"
    r = cli("retrieve", "--index", tmp_path / "joint", "--text", query, "-k", "8")
    assert r.exit_code == 0, r.stderr
    ref = open_clip.create_model("tiny-clip", pretrained=str(weights)).eval()
    model = MultimodalModel.from_checkpoint(ckpt)
    with torch.no_grad():
        t = ref.encode_text(open_clip.get_tokenizer("tiny-clip")([query]))
        q = model.encode("text", torch.nn.functional.normalize(t, dim=-1).half().float())[0]
    fs = FeatureSet.open(tmp_path / "joint")
    x, items = fs.table("image")
    want = [
        fs.ids[int(items[i])] for i in torch.argsort(x.float() @ q, descending=True, stable=True)
    ]
    assert [h["id"] for h in json.loads(r.stdout)["hits"]] == want
    r = cli("retrieve", "--index", tmp_path / "joint", "--image", photos[5], "-k", "1")
    assert r.exit_code == 0, r.stderr
    hit = json.loads(r.stdout)["hits"][0]
    assert hit["id"] == "i5" and hit["score"] == pytest.approx(1.0, abs=2e-3)
