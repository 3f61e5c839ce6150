"""fuse-train --init: fine-tune a pretrained model; --freeze image is LiT.

A tiny random-init open_clip model (open_clip's own constructors, a custom config, its
state dict as safetensors) on raw photos and captions: the locked image tower ends
exactly as it began, the text tower and the logit scale move, the image tower runs once
per item however many epochs, and the checkpoint rebuilds with no original file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pm = pytest.importorskip("pretrained_models")
open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("lit")
    photos = pm.photos(root / "photos", n=12)
    with open(root / "manifest.jsonl", "w") as f:
        for i, p in enumerate(photos):
            caps = [f"photo {i} of a thing", f"thing number {i}"]
            split = "val" if i >= 9 else "train"
            f.write(
                json.dumps({"id": f"i{i}", "image": str(p), "text": caps, "split": split}) + "\n"
            )
    cfg, weights = pm.open_clip_model(root / "oc", seed=2)
    like = f"open_clip:{cfg}"
    r = cli("preprocess", root / "manifest.jsonl", "-o", root / "t", "--like", like, "-q")
    assert r.exit_code == 0, r.stderr
    return {"root": root, "cfg": cfg, "weights": weights, "like": like, "photos": photos}


class VisualCalls:
    """Rows through open_clip's image tower (a forward hook on its own module)."""

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook

        self.rows = 0

        def hook(module, args, out):
            if isinstance(module, open_clip.transformer.VisionTransformer):
                self.rows += args[0].shape[0]

        self.handle = register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def lit(data, cli):
    run = data["root"] / "run"
    with VisualCalls() as calls:
        r = cli("fuse-train", data["root"] / "t", "-o", run, "--init", data["like"], "--weights",
                data["weights"], "--freeze", "image", "--epochs", "4", "--batch-size", "4",
                "--lr", "1e-3", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return {"run": run, "calls": calls.rows, "summary": json.loads(r.stdout)}


def test_lit_trains_only_what_is_not_frozen(data, lit):
    from safetensors.torch import load_file

    from mmcli.models import MultimodalModel

    start = load_file(str(data["weights"]))
    model = MultimodalModel.from_checkpoint(lit["run"] / "last.safetensors")
    image = model.encoders["image"].visual.state_dict()
    assert image and all(torch.equal(v, start[f"visual.{k}"]) for k, v in image.items())
    text = model.encoders["text"].clip.state_dict()
    changed = [k for k, v in text.items() if not torch.equal(v, start[k])]
    assert "token_embedding.weight" in changed and len(changed) > len(text) // 2
    assert float(model.logit_scale.detach()) != pytest.approx(3.0)  # the init model's, trained


def test_the_frozen_tower_runs_once_per_item_not_per_epoch(lit):
    # 12 items (9 train, 3 val), 4 epochs with validation after each: 12 rows in all
    assert lit["summary"]["epochs"] == 4
    assert lit["calls"] == 12
    assert (lit["run"] / "frozen" / "image").is_dir()


def test_the_checkpoint_rebuilds_without_the_original_files(data, lit, cli, run_mmcli, tmp_path):
    from mmcli.models import MultimodalModel

    away = tmp_path / "away"
    shutil.move(data["root"] / "oc", away)  # the config JSON and the weights file
    try:
        model = MultimodalModel.from_checkpoint(lit["run"] / "model.safetensors")
        pretrained = model.config.extra["pretrained"]
        assert (
            pretrained["library"] == "open_clip" and pretrained["version"] == open_clip.__version__
        )
        assert model.config.extra["init"]["sha256"]  # what it was fine-tuned from
        # a fresh process: no open_clip config registered in memory
        r = run_mmcli("extract", data["root"] / "t", "-o", tmp_path / "joint", "--model",
                             lit["run"] / "model.safetensors", "-q")  # fmt: skip
        assert r.returncode == 0, r.stderr.decode()
        r = cli("retrieve", "--index", tmp_path / "joint", "--image", data["photos"][10], "-k", "1")
        assert r.exit_code == 0, r.stderr
        hit = json.loads(r.stdout)["hits"][0]
        assert hit["id"] == "i10" and hit["score"] == pytest.approx(1.0, abs=1e-4)
        r = cli("retrieve", "--index", tmp_path / "joint", "--text", "thing number 3", "-k", "2")
        assert r.exit_code == 0, r.stderr
    finally:
        shutil.move(away, data["root"] / "oc")


def test_resume_reuses_the_cache(data, lit, cli):
    with VisualCalls() as calls:
        r = cli("fuse-train", data["root"] / "t", "-o", lit["run"], "--init", data["like"],
                "--weights", data["weights"], "--freeze", "image", "--epochs", "4",
                "--batch-size", "4", "--lr", "1e-3", "--resume", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert calls.rows == 0  # the finished shards of the cache are kept


def test_init_refuses_what_it_does_not_train(data, cli, tmp_path):
    base = ("fuse-train", data["root"] / "t", "-o", tmp_path / "x", "--init", data["like"])
    r = cli(*base, "--weights", f"image={data['weights']}")
    assert r.exit_code == 2 and "with --init, --weights is the weights FILE" in r.stderr
    r = cli(*base, "--weights", data["weights"], "--fusion", "attention")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--fusion attention" in r.stderr


def test_lit_from_a_transformers_clip_folder(data, cli, tmp_path):
    """--init hf:DIR: its tokenizer's ids and attention mask feed the text tower; the locked
    vision tower ends as it began; the checkpoint rebuilds after DIR is gone (it carries
    DIR's config and tokenizer)."""
    pytest.importorskip("transformers")
    from mmcli.models import MultimodalModel, load_model

    folder = pm.hf_clip(tmp_path / "clip")
    r = cli("preprocess", data["root"] / "manifest.jsonl", "-o", tmp_path / "t", "--like",
            f"hf:{folder}", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("fuse-train", tmp_path / "t", "-o", tmp_path / "run", "--init", f"hf:{folder}",
            "--freeze", "image", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    start = load_model(f"hf:{folder}").state_dict()
    end = MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors").state_dict()
    image = [k for k in end if k.startswith("encoders.image.")]
    text = [k for k in end if k.startswith("encoders.text.")]
    assert image and all(torch.equal(end[k], start[k]) for k in image)
    assert sum(not torch.equal(end[k], start[k]) for k in text) > len(text) // 2
    shutil.rmtree(folder)
    again = MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors").state_dict()
    assert all(torch.equal(again[k], end[k]) for k in end)
