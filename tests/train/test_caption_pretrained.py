"""Captioning with pretrained parts: a frozen open_clip image tower end to end through the
commands, and caption decoders that write with a pretrained tokenizer (open_clip's BPE,
an HF tokenizer folder), rebuilt from the checkpoint alone. Tiny random-init models built
with the libraries' own constructors; nothing downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from caption_data import one_caption_items, tensors_of, train_captioner

from mmcli.errors import BadInput
from mmcli.generate import Captioner
from mmcli.models import MultimodalModel
from mmcli.models.tokenizers import caption_tokenizer, tokenizer_from_spec

pm = pytest.importorskip("pretrained_models")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")

CAPTION = "a small red circle to the left of a large blue cross"


@pytest.fixture(scope="module")
def items(toy_data, tmp_path_factory):
    """8 one-caption toy items as 32 px tensors (the tiny open_clip model's size)."""
    root = tmp_path_factory.mktemp("cap-pre")
    manifest = one_caption_items(toy_data, root / "data", n=8)
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
    tensors = tensors_of(manifest, root / "tensors", image_size=32)
    return {"root": root, "tensors": tensors, "rows": rows}


def _truth(items) -> dict[str, str]:
    return {r["id"]: r["text"][0] for r in items["rows"]}


def _losses(run) -> list[float]:
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in logs if "loss" in r]


@pytest.mark.slow  # 200 steps over a live tower and a 49k-token vocabulary: ~2.5 min on 2 cores
def test_a_frozen_open_clip_tower_captions_end_to_end(cli, items, tmp_path):
    """fuse-train over the frozen tower's patch tokens, with its text tower's tokenizer
    (the default), then caption and eval from the checkpoint alone."""
    from safetensors.torch import load_file

    cfg, weights = pm.open_clip_model(tmp_path / "oc", seed=2)
    original = load_file(str(weights))
    run = tmp_path / "run"
    r = cli(
        "fuse-train", items["tensors"], "-o", run, "--objective", "caption",
        "--encoder", f"image=open_clip:{cfg}", "--encoder", f"text=open_clip:{cfg}",
        "--weights", f"image={weights}", "--weights", f"text={weights}", "--freeze", "image",
        "--caption-decoder", "attention:width=32,depth=1,heads=2", "--label-smoothing", "0",
        "--epochs", "200", "--batch-size", "8", "--lr", "1e-2", "--val-split", "none", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    losses = _losses(run)
    assert losses[0] > 3.0 and losses[-1] < 0.05
    model_path = run / "model.safetensors"
    # the frozen tower is the weights file's, to the bit
    state = load_file(str(model_path))
    visual = {k: v for k, v in original.items() if k.startswith("visual.")}
    assert visual
    for k, v in visual.items():
        torch.testing.assert_close(state[f"encoders.image.{k}"], v, rtol=0, atol=0, msg=k)
    # no original file is needed any more: the weights and the config are inside
    shutil.rmtree(tmp_path / "oc")
    spec = json.loads(
        json.dumps(MultimodalModel.from_checkpoint(model_path).config.captioner)
    )  # plain JSON
    assert spec["source_tokens"] == 16  # 4 x 4 patches of the ViT: attention over them
    assert spec["tokenizer"]["tokenizer"].startswith("open_clip:")  # the text tower's
    assert spec["tokenizer"]["context_length"] == 24
    r = cli("caption", items["tensors"], "--model", model_path, "-q")
    assert r.exit_code == 0, r.stderr
    shards = [json.loads(x) for x in r.stdout.splitlines()]
    assert {x["id"]: x["caption"] for x in shards} == _truth(items)
    images = [r["image"] for r in items["rows"]]
    r = cli("caption", *images, "--model", model_path, "-q")
    assert r.exit_code == 0, r.stderr
    files = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["caption"] for x in files] == [x["caption"] for x in shards]
    # eval --task captioning scores the decoded text against the shards' references
    r = cli("eval", items["tensors"], "--task", "captioning", "--model", model_path, "-q")
    assert r.exit_code == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and metrics["WER"] == 0


def _minilm_tokenizer(folder):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(pm.minilm_folder()).save_pretrained(folder)
    return folder


def _word_level(folder, words):
    """A tokenizers-library WordLevel tokenizer saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", "[PAD]", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
    )
    fast.save_pretrained(folder)
    return folder


@pytest.mark.slow  # 45-60 s each on 2 cores; the tokenizers' round trips stay in the default run
@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_a_pretrained_tokenizer_overfits_and_decodes_from_the_checkpoint(items, tmp_path, kind):
    if kind == "open_clip":
        spec = "open_clip:ViT-B-32"  # the CLIP BPE bundled with open_clip
    else:
        spec = f"hf:{_minilm_tokenizer(tmp_path / 'tok')}"
    run = tmp_path / "run"
    train_captioner(items["tensors"], run, steps=150, caption_tokenizer=spec)
    losses = _losses(run)
    assert losses[0] > 5.0 and losses[-1] < 0.05
    if kind == "hf":
        shutil.rmtree(tmp_path / "tok")  # the tokenizer travels in the checkpoint
    model = MultimodalModel.from_checkpoint(run / "last.safetensors")
    c = model.captioner.config
    want = 49408 if kind == "open_clip" else 30522
    assert (c.vocab_size, c.pad_id) == (want + 1, want)  # PAD: an id of its own
    size = len(json.dumps(c.tokenizer))
    assert size < (1000 if kind == "open_clip" else 400_000)  # MiniLM's 466 kB packed
    got = {x["id"]: x["caption"] for x in Captioner(model).caption_tensors([str(items["tensors"])])}
    assert got == _truth(items)


def test_tokenizer_specs_rebuild_the_same_ids(tmp_path):
    for spec in ["open_clip:ViT-B-32", f"hf:{_minilm_tokenizer(tmp_path / 'tok')}"]:
        tok = caption_tokenizer(spec, context_length=16)
        ids, cut = tok.encode_batch([CAPTION, "a " * 20])
        assert cut == 1 and ids.shape == (2, 16)
        assert ids[0, 0] == tok.bos_id and tok.eos_id in ids[0] and ids[0, -1] == tok.pad_id
        again = tokenizer_from_spec(json.loads(json.dumps(tok.spec())))
        assert (again.encode_batch([CAPTION])[0] == ids[:1]).all()
        assert again.decode(ids[0]) == CAPTION


def test_a_tokenizer_without_its_vocabulary_fails_loudly(tmp_path):
    """The trap of CLIPTokenizer.from_pretrained(<hub id>) offline: a few special tokens."""
    folder = _word_level(tmp_path / "tiny", [])
    with pytest.raises(BadInput, match="only 4 tokens") as e:
        caption_tokenizer(f"hf:{folder}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentencepiece", "bad --caption-tokenizer"),
        ("hf:", "bad --caption-tokenizer"),
        ("bytes:x", "bad --caption-tokenizer"),
        ("hf:/no/such/folder", "model folder not found"),
        ("open_clip:no-such-arch", "unknown open_clip architecture"),
    ],
)
def test_a_bad_caption_tokenizer_is_one_line_exit_2(cli, items, tmp_path, spec, message):
    r = cli(
        "fuse-train", items["tensors"], "-o", tmp_path / "run", "--objective", "caption",
        "--encoder", "image=tiny:width=8,dim=32", "--encoder", "text=tiny",
        "--caption-tokenizer", spec, "--max-steps", "1", "--batch-size", "4", "--val-split", "none",
    )  # fmt: skip
    assert r.exit_code == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_coca_with_a_pretrained_tokenizer_validates_in_its_vocabulary(items, tmp_path):
    """The contrastive loss reads the text table's byte ids, the decoder open_clip's BPE ids;
    validation scores the captions in the decoder's vocabulary."""
    from mmcli.train.fuse import FuseConfig, fuse_train
    from mmcli.train.loop import LoopConfig

    cfg = FuseConfig(
        pairs=[("image", "text")],
        objectives={"contrastive": 1.0, "caption": 1.0},
        encoders={"image": "tiny:width=8,dim=32", "text": "tiny"},
        embed_dim=16,
        caption_decoder="attention:width=32,depth=1,heads=2",
        caption_tokenizer="open_clip:ViT-B-32",
        val_split="train",
    )
    loop = LoopConfig(epochs=2, lr=1e-2)
    summary = fuse_train([str(items["tensors"])], str(tmp_path / "run"), cfg, loop, batch_size=4,
                         device="cpu", overwrite=True)  # fmt: skip
    best = summary["final_metrics"]
    assert 0 < best["caption/loss"] < 12 and 0 <= best["caption/token_acc"] <= 1
    assert "image-text/mean_recall@1" in best
