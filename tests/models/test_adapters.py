"""Encoders backed by open_clip, transformers and timm equal the library's own forward.

Tiny random-init models built with each library's constructors and saved in its own
format (tests/pretrained_models.py). mmcli's side: its image transform settings taken from
the model (what ``preprocess --like`` writes) applied to the raw files, the uint8 pixels
through the encoder; the captions as strings through the model's own tokenizer. The
library's side: its own preprocessing / tokenizer on the same files and strings, then its
own forward. Per-row cosine >= 0.9999 in fp32. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pm = pytest.importorskip("pretrained_models")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

CAPTIONS = [
    "a photo of a dog",
    "A red square next to a small blue circle, seen from above on a sunny day " * 3,
    "ein Foto",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "root": root,
        "photos": pm.photos(root / "photos"),
        "open_clip": pm.open_clip_model(root / "open_clip"),
        "clip": pm.hf_clip(root / "hf_clip"),
        "siglip": pm.hf_siglip(root / "hf_siglip"),
        "bert": pm.hf_bert(root / "hf_bert"),
        "wav2vec2": pm.hf_wav2vec2(root / "hf_wav2vec2"),
        "timm": pm.timm_model(root / "timm"),
    }


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def pixels(spec: dict, paths) -> torch.Tensor:
    from mmcli.data.image import image_transform_from_spec

    t = image_transform_from_spec(spec)
    return torch.from_numpy(np.stack([t(p) for p in paths]))


def test_like_open_clip_reads_its_files_the_same_as_importing_it():
    """--like open_clip:ARCH (no tag) reads the transform from open_clip's files without
    importing open_clip (8 s); for every architecture open_clip ships it equals what the
    import gives, and a fresh process is left without open_clip."""
    import subprocess

    from mmcli.data.model_transforms import open_clip_files_like
    from mmcli.models.adapters.open_clip import open_clip_transform

    shipped = Path(open_clip.__file__).parent / "model_configs"  # not configs other tests add
    names = [n for n in open_clip.list_models() if (shipped / f"{n}.json").exists()]
    assert len(names) > 100
    assert [n for n in names if open_clip_files_like(n) != open_clip_transform(n)] == []
    assert open_clip_files_like("no-such-arch") is None
    assert open_clip_files_like("../model_configs/ViT-B-32") is None  # names only, no paths
    code = (
        "import sys; from mmcli.data.like import like; "
        "print(like('open_clip:ViT-B-32')['image_size'], 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["224", "False"]


def test_preprocess_like_open_clip_imports_no_torch(tmp_path):
    """preprocess --like open_clip:ARCH takes the settings from open_clip's files: the
    command imports neither torch nor open_clip (its pool then forks, not a forkserver),
    and writes the same settings like() gives."""
    import json
    import subprocess

    from PIL import Image

    from mmcli.data.like import like

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "image": "a.jpg"}) + "\n")
    code = (
        "import sys\nfrom mmcli.cli.app import main\n"
        f"sys.argv = ['mmcli', 'preprocess', {str(tmp_path / 'm.jsonl')!r}, '-o',"
        f" {str(tmp_path / 't')!r}, '--like', 'open_clip:ViT-B-32', '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["0", "False", "False"], r.stderr
    from mmcli.formats.tensorfile import TensorSet

    spec = TensorSet(tmp_path / "t").spec("image")
    want = like("open_clip:ViT-B-32")
    assert spec["image_size"] == want["image_size"] == 224
    assert spec["interpolation"] == want["interpolation"]


def test_open_clip_towers_equal_open_clip(files):
    from PIL import Image

    from mmcli import models
    from mmcli.models.adapters.open_clip import open_clip_transform as transform_like

    cfg, weights = files["open_clip"]
    image = models.create("open_clip", "image", arch=str(cfg))
    text = models.create("open_clip", "text", arch=str(cfg))
    assert models.load_weights(image, weights)["sha256"]
    models.load_weights(text, weights)
    ref, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(weights))
    ref.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    x = pixels(transform_like(str(cfg)), files["photos"])
    with torch.no_grad():
        want = ref.encode_image(torch.stack([preprocess(Image.open(p)) for p in files["photos"]]))
        assert cos(image(x), want).min() >= 0.9999
        want = ref.encode_text(tokenizer(CAPTIONS))
        assert cos(text(CAPTIONS), want).min() >= 0.9999
    assert text.tokenize(CAPTIONS).truncated == 1  # the long caption, at 24 tokens


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_towers_equal_transformers(files, kind):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from mmcli import models
    from mmcli.models.adapters.hf import hf_transform as transform_like

    folder = str(files[kind])
    image = models.create("hf", "image", path=folder)
    text = models.create("hf", "text", path=folder)
    ref = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    x = pixels(transform_like(folder), files["photos"])
    with torch.no_grad():
        px = processor(images=[Image.open(p) for p in files["photos"]], return_tensors="pt")
        want = ref.get_image_features(**px).pooler_output
        assert cos(image(x), want).min() >= 0.9999
        limit = ref.config.text_config.max_position_embeddings
        padding = "max_length" if kind == "siglip" else True  # as each model is meant to be used
        enc = tokenizer(
            CAPTIONS, padding=padding, truncation=True, max_length=limit, return_tensors="pt"
        )
        want = ref.get_text_features(**enc).pooler_output
        assert cos(text(CAPTIONS), want).min() >= 0.9999
    assert text.tokenize(CAPTIONS).truncated == 1


def test_hf_sentence_encoder_pools_as_its_1_pooling_config(files):
    from transformers import AutoModel, AutoTokenizer

    from mmcli import models

    folder = str(files["bert"])  # 1_Pooling: cls; sentence_bert_config: max_seq_length 12
    enc = models.create("hf", "text", path=folder)
    assert enc.pooling == ["cls"] and enc.context_length == 12
    ref = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        inputs = tok(CAPTIONS, padding=True, truncation=True, max_length=12, return_tensors="pt")
        want = ref(**inputs).last_hidden_state[:, 0]
        assert cos(enc(CAPTIONS), want).min() >= 0.9999
        mean = models.create("hf", "text", path=folder, pooling="mean")
        states = ref(**inputs).last_hidden_state
        m = inputs["attention_mask"].unsqueeze(-1).float()
        assert cos(mean(CAPTIONS), (states * m).sum(1) / m.sum(1)).min() >= 0.9999
    assert enc.tokenize(CAPTIONS).truncated == 1


def test_hf_audio_equals_the_feature_extractor_and_model(files):
    from transformers import AutoFeatureExtractor, AutoModel

    from mmcli import models

    folder = str(files["wav2vec2"])
    enc = models.create("hf", "audio", path=folder)
    fe = AutoFeatureExtractor.from_pretrained(folder)
    ref = AutoModel.from_pretrained(folder).eval()
    wave = torch.randn(3, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        inputs = fe(list(wave.numpy()), sampling_rate=16000, return_tensors="pt")
        want = ref(**inputs).last_hidden_state.mean(1)
        assert cos(enc(wave), want).min() >= 0.9999


def test_timm_equals_timm_with_its_eval_transform(files):
    from PIL import Image

    from mmcli import models
    from mmcli.models.adapters.timm import timm_transform as transform_like

    enc = models.create("timm", "image", arch="test_resnet")
    info = models.load_weights(enc, files["timm"])  # the classifier in the file is dropped
    assert info["path"] == str(files["timm"])
    ref = timm.create_model("test_resnet", num_classes=0)
    from mmcli.models.weights import read_state_dict

    state = {k: v for k, v in read_state_dict(files["timm"]).items() if not k.startswith("fc.")}
    ref.load_state_dict(state)
    ref.eval()
    cfg = timm.data.resolve_data_config({}, model=ref)
    transform = timm.data.create_transform(**cfg)
    x = pixels(transform_like("test_resnet"), files["photos"])
    with torch.no_grad():
        want = ref(torch.stack([transform(Image.open(p).convert("RGB")) for p in files["photos"]]))
        assert cos(enc(x), want).min() >= 0.9999


def test_whole_models_have_both_towers_and_the_logit_scale(files):
    from mmcli import models

    cfg, weights = files["open_clip"]
    model = models.load_model(f"open_clip:{cfg}", weights=str(weights))
    assert model.space == "joint" and model.modalities == ["image", "text"]
    assert float(model.logit_scale.detach()) == pytest.approx(3.0) and model.logit_bias is None
    siglip = models.load_model(f"hf:{files['siglip']}")
    assert float(siglip.logit_bias.detach()) == pytest.approx(-2.5)
    n_ref = sum(p.numel() for p in open_clip.create_model("tiny-clip").parameters())
    assert sum(p.numel() for p in model.parameters()) == n_ref  # nothing duplicated


def test_mismatched_weights_and_unknown_names_are_one_line(files, tmp_path):
    from mmcli import models
    from mmcli.errors import BadInput

    cfg, _ = files["open_clip"]
    image = models.create("open_clip", "image", arch=str(cfg))
    with pytest.raises(BadInput, match="weights do not match the image tower of open_clip"):
        models.load_weights(image, files["timm"])
    with pytest.raises(BadInput, match="unknown open_clip architecture"):
        models.create("open_clip", "image", arch="ViT-Q-99")
    with pytest.raises(BadInput, match="model folder not found"):
        models.create("hf", "text", path=str(tmp_path / "nowhere"))
    with pytest.raises(BadInput, match="timm models are image backbones"):
        models.load_model("timm:resnet18")


def test_offline_names_what_to_download(monkeypatch):
    from mmcli import models
    from mmcli.errors import BadInput

    monkeypatch.setenv("MMCLI_OFFLINE", "1")
    with pytest.raises(BadInput, match=r"offline; download .*huggingface.co/timm.* --weights"):
        models.create("open_clip", "image", arch="RN50", pretrained="openai")
    with pytest.raises(
        BadInput, match=r"hf:org/model .*offline; download it .*huggingface-cli download org/model"
    ):
        models.create("hf", "text", path="org/model")


def test_a_tokenizer_without_its_vocabulary_fails_loudly(files, tmp_path):
    from transformers import CLIPTokenizer

    from mmcli import models
    from mmcli.errors import BadInput

    # what CLIPTokenizer.from_pretrained(<hub id>) can return offline: 2 special tokens
    folder = tmp_path / "broken"
    import shutil

    shutil.copytree(files["clip"], folder)
    CLIPTokenizer().save_pretrained(folder)
    with pytest.raises(BadInput, match="the tokenizer has only 2 tokens"):
        models.create("hf", "text", path=str(folder))


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    from mmcli import models
    from mmcli.errors import BadInput

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(BadInput) as e:
        models.load_model("open_clip:ViT-B-32")
    assert str(e.value) == (
        "open-clip-torch is not installed (needed for open_clip encoders); "
        'install it with: pip install "mmcli[open_clip]"'
    )
    assert e.value.exit_code == 2
