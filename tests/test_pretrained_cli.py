"""Pretrained models through the commands, against the libraries' own results.

Raw photos and captions -> ``preprocess --like`` -> ``extract --model open_clip:...`` ->
``eval`` / ``retrieve``: the pixels equal the library's transform, the features its
forward, and zero-shot accuracy and retrieval recall equal a reference computed with
open_clip directly on the same files. Tiny random-init models, nothing downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pm = pytest.importorskip("pretrained_models")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("timm")

LABELS = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    photos = pm.photos(root / "photos", n=9)
    with open(root / "manifest.jsonl", "w") as f:
        for i, p in enumerate(photos):
            caps = [
                f"a photo number {i} of a {LABELS[i % 3]}",
                f"picture {i}, very " + "long " * (i * 4),
            ]
            f.write(
                json.dumps({"id": f"i{i}", "image": str(p), "text": caps, "label": LABELS[i % 3]})
                + "\n"
            )
    (root / "templates.txt").write_text("\n".join(TEMPLATES))
    cfg, weights = pm.open_clip_model(root / "open_clip", seed=1)
    return {"root": root, "photos": photos, "cfg": cfg, "weights": weights}


@pytest.fixture(scope="module")
def reference(pipe):
    """open_clip's own features of the raw files and caption strings."""
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(pipe["weights"])
    )
    model.eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    rows = [json.loads(line) for line in (pipe["root"] / "manifest.jsonl").read_text().splitlines()]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(r["image"])) for r in rows])
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tok([c for r in rows for c in r["text"]])), dim=-1)
        prompts = [t.format(c) for c in LABELS for t in TEMPLATES]
        cls = (
            F.normalize(model.encode_text(tok(prompts)), dim=-1).view(3, len(TEMPLATES), -1).mean(1)
        )
    return {
        "image": img,
        "text": txt,
        "classes": F.normalize(cls, dim=-1),
        "pixels": images,
        "rows": rows,
    }


@pytest.fixture(scope="module")
def extracted(pipe, cli_module):
    root = pipe["root"]
    like = f"open_clip:{pipe['cfg']}"
    r = cli_module(
        "preprocess",
        root / "manifest.jsonl",
        "-o",
        root / "tensors",
        "--like",
        like,
        "--context-length",
        16,
    )
    assert r.exit_code == 0, r.stderr
    r = cli_module("extract", root / "tensors", "-o", root / "feats", "--model", like, "--weights", pipe["weights"],
                   "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_preprocess_like_writes_the_pixels_of_open_clips_transform(pipe, reference, extracted):
    from mmcli.formats.tensorfile import TensorSet

    x, _ = TensorSet(pipe["root"] / "tensors").table("image")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    theirs = (reference["pixels"] * std + mean) * 255  # undo ToTensor + Normalize
    assert (theirs - x.float()).abs().max() < 1e-3  # the same uint8 pixels


def test_extract_model_equals_open_clip_on_the_raw_files_and_full_captions(
    pipe, reference, extracted
):
    from mmcli.formats.tensorfile import TensorSet

    feats = TensorSet(pipe["root"] / "feats")
    for table in ("image", "text"):
        got, _ = feats.table(table)
        assert F.cosine_similarity(got, reference[table]).min() >= 0.9999
    assert feats.spec("image")["space"] == "joint"
    # the long captions were cut by open_clip's tokenizer (24 tokens), counted and reported
    assert "row(s) cut at the tokenizer's 24 tokens" in extracted.stderr


def test_zero_shot_accuracy_equals_open_clip(pipe, reference, extracted, cli_module):
    r = cli_module("eval", pipe["root"] / "feats", "--task", "zeroshot", "--model", f"open_clip:{pipe['cfg']}",
                   "--weights", pipe["weights"], "--templates", pipe["root"] / "templates.txt")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    labels = torch.tensor([LABELS.index(row["label"]) for row in reference["rows"]])
    pred = (reference["image"] @ reference["classes"].T).argmax(1)
    assert result["metrics"]["acc1"] == pytest.approx(float((pred == labels).float().mean()))


def test_retrieval_recall_equals_open_clip(pipe, reference, extracted, cli_module):
    r = cli_module("eval", pipe["root"] / "feats", "--task", "retrieval", "--k", "1,3")
    assert r.exit_code == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    sims = reference["text"] @ reference["image"].T  # (captions, images)
    owner = torch.arange(9).repeat_interleave(2)
    for k in (1, 3):
        top = sims.topk(k, dim=1).indices
        t2i = float((top == owner[:, None]).any(1).float().mean())
        top = sims.T.topk(k, dim=1).indices  # images -> captions: any of its own
        i2t = float((owner[top] == torch.arange(9)[:, None]).any(1).float().mean())
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)


def test_retrieve_text_and_image_queries_with_the_models_own_tokenizer_and_transform(
    pipe, reference, extracted, cli_module
):
    from open_clip import get_tokenizer

    model_args = ("--model", f"open_clip:{pipe['cfg']}", "--weights", pipe["weights"])
    query = "a photo of a dog on the grass"
    r = cli_module(
        "retrieve", "--index", pipe["root"] / "feats", *model_args, "--text", query, "-k", "3"
    )
    assert r.exit_code == 0, r.stderr
    hits = [h["id"] for h in json.loads(r.stdout)["hits"]]
    ref = open_clip.create_model("tiny-clip", pretrained=str(pipe["weights"])).eval()
    with torch.no_grad():
        q = F.normalize(ref.encode_text(get_tokenizer("tiny-clip")([query])), dim=-1)[0]
    assert hits == [f"i{i}" for i in (reference["image"] @ q).topk(3).indices.tolist()]
    photo = pipe["photos"][4]
    r = cli_module("retrieve", "--index", pipe["root"] / "feats", *model_args, "--image", photo, "--target", "image",
                   "-k", "1")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    hit = json.loads(r.stdout)["hits"][0]
    assert hit["id"] == "i4" and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_hf_clip_model_through_extract(pipe, tmp_path, cli_module):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from mmcli.formats.tensorfile import TensorSet

    folder = pm.hf_clip(tmp_path / "clip")
    r = cli_module("preprocess", pipe["root"] / "manifest.jsonl", "-o", tmp_path / "t", "--like", f"hf:{folder}",
                   "-m", "image")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli_module(
        "extract",
        tmp_path / "t",
        "-o",
        tmp_path / "f",
        "--model",
        f"hf:{folder}",
        "--dtype",
        "float32",
    )
    assert r.exit_code == 0, r.stderr
    ref = AutoModel.from_pretrained(folder).eval()
    px = AutoImageProcessor.from_pretrained(folder)(
        images=[Image.open(p) for p in pipe["photos"]], return_tensors="pt"
    )
    with torch.no_grad():
        want = ref.get_image_features(**px).pooler_output
    got, _ = TensorSet(tmp_path / "f").table("image")
    assert F.cosine_similarity(got, want).min() >= 0.9999


@pytest.mark.parametrize("like", ["hf", "timm"])
def test_preprocess_like_hf_and_timm_write_their_transforms_pixels(pipe, tmp_path, like):
    from PIL import Image

    from mmcli.data.image import preprocess_image_options
    from mmcli.data.like import like as like_settings
    from mmcli.formats.tensorfile import TensorSet
    from mmcli.preprocess import PreprocessConfig, preprocess

    if like == "hf":
        from transformers import AutoImageProcessor

        spec = f"hf:{pm.hf_siglip(tmp_path / 'siglip')}"
        proc = AutoImageProcessor.from_pretrained(spec[3:])
        theirs = [proc(images=[Image.open(p)], do_rescale=False, do_normalize=False,
                       return_tensors="pt").pixel_values[0] for p in pipe["photos"]]  # fmt: skip
    else:
        import timm

        spec = "timm:test_vit"
        cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_vit"))
        t = timm.data.create_transform(**cfg)
        undo = (torch.tensor(cfg["std"]).view(3, 1, 1), torch.tensor(cfg["mean"]).view(3, 1, 1))
        theirs = [
            (t(Image.open(p).convert("RGB")) * undo[0] + undo[1]) * 255 for p in pipe["photos"]
        ]
    options = preprocess_image_options(like_settings(spec))
    config = PreprocessConfig(**options, modalities=["image"])
    preprocess(str(pipe["root"] / "manifest.jsonl"), str(tmp_path / "t"), config=config)
    x, _ = TensorSet(tmp_path / "t").table("image")
    assert (torch.stack(theirs).float() - x.float()).abs().max() < 1e-3


def test_without_the_library_the_command_says_what_to_install(pipe, extracted, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['open_clip'] = None\n"  # as if not installed
        "from mmcli.cli.app import main\n"
        f"sys.argv = ['mmcli', 'extract', {str(pipe['root'] / 'tensors')!r}, '-o', {str(tmp_path / 'f')!r}, "
        "'-e', 'image=open_clip:ViT-B-32', '-q']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        'error: open-clip-torch is not installed (needed for open_clip encoders); install it with: pip install "mmcli[open_clip]"'
    ]
    assert not (tmp_path / "f").exists()
