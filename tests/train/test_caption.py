"""The caption objective and its decoders: overfitting, decoding (greedy, beam, KV cache),
masks, checkpoints, CoCa, a frozen tower, audio, bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from caption_data import one_caption_items, tensors_of, train_captioner

from mmcli.data.text import ByteTokenizer
from mmcli.errors import BadInput
from mmcli.generate import Captioner, DecodeOptions, beam_search, greedy
from mmcli.models import MultimodalModel
from mmcli.models.decoder import KINDS, CaptionDecoder, DecoderConfig, parse_decoder_spec
from mmcli.train.fuse import FuseConfig
from mmcli.train.objectives import caption_loss

TOKENIZER = ByteTokenizer(context_length=24).spec()


@pytest.fixture(scope="module")
def small(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    manifest = one_caption_items(toy_data, root / "data", n=8)
    return tensors_of(manifest, root / "tensors")


@pytest.fixture(scope="module")
def overfit(small, tmp_path_factory):
    """An attention captioner fitted to the 8 items (one caption each), with its logs."""
    run = tmp_path_factory.mktemp("overfit") / "run"
    summary = train_captioner(small, run, steps=150)
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return run, summary, [r["loss"] for r in logs if "loss" in r]


def _captions(tensors) -> dict[str, str]:
    from mmcli.evaluate.captioning import references_from_tensors
    from mmcli.formats.tensorfile import open_tensors

    return {k: v[0] for k, v in references_from_tensors(open_tensors(str(tensors))).items()}


def test_overfit_loss_near_zero_and_greedy_reproduces_every_caption(small, overfit):
    run, _, losses = overfit
    assert losses[0] > 3.0 and losses[-1] < 0.05
    cap = Captioner(MultimodalModel.from_checkpoint(run / "last.safetensors"))
    lines = list(cap.caption_tensors([str(small)]))
    truth = _captions(small)
    assert {line["id"]: line["caption"] for line in lines} == truth
    # the score is the caption's log-probability: near 0 for a memorised caption
    assert all(-1.0 < line["score"] <= 0 for line in lines)


@pytest.mark.parametrize("kind", ["pooled:width=32,depth=1,heads=2", "prefix:width=32,depth=1"])
def test_pooled_and_prefix_decoders_overfit_too(small, tmp_path, kind):
    train_captioner(small, tmp_path / "run", kind=kind, steps=150)
    cap = Captioner(MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors"))
    got = {line["id"]: line["caption"] for line in cap.caption_tensors([str(small)])}
    assert got == _captions(small)


def _random_decoder(kind: str, seed: int = 0) -> tuple[CaptionDecoder, object]:
    torch.manual_seed(seed)
    name, options = parse_decoder_spec(f"{kind}:width=32,depth=2,heads=4")
    config = DecoderConfig(
        kind=name,
        source="image",
        pooled_dim=12,
        token_dim=10 if name == "attention" else 0,
        source_tokens=9 if name == "attention" else 0,
        tokenizer=TOKENIZER,
        **options,
    )
    dec = CaptionDecoder(config).double().eval()
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[2, 6:] = False  # a source with fewer tokens
    memory = dec.memory(
        torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 9, 10, dtype=torch.float64), mask
    )
    return dec, memory


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_gives_the_tokens_of_recomputation(kind):
    dec, memory = _random_decoder(kind)
    for beam in (1, 3):
        cached = (greedy if beam == 1 else beam_search)(dec, memory, DecodeOptions(beam=beam))
        recomputed = (greedy if beam == 1 else beam_search)(
            dec, memory, DecodeOptions(beam=beam, cache=False)
        )
        assert [g.tokens for g in cached] == [g.tokens for g in recomputed]
        assert [g.score for g in cached] == pytest.approx([g.score for g in recomputed], abs=1e-9)
        assert all(len(g.tokens) > 3 for g in cached)  # a random model writes on


@pytest.mark.parametrize("kind", KINDS)
def test_beam_of_one_is_greedy_and_scores_are_log_probabilities(kind):
    dec, memory = _random_decoder(kind, seed=1)
    g = greedy(dec, memory, DecodeOptions(max_tokens=12))
    b = beam_search(dec, memory, DecodeOptions(beam=1, max_tokens=12))
    assert [x.tokens for x in g] == [x.tokens for x in b]
    assert [x.score for x in g] == pytest.approx([x.score for x in b], abs=1e-9)
    # a wider beam finds captions at least as probable here, and every score is the
    # decoder's own log-probability of the caption it returns
    wide = beam_search(dec, memory, DecodeOptions(beam=4, max_tokens=12))
    for out in (g, wide):
        for row, x in enumerate(out):
            end = [TOKENIZER["eos_id"]] if x.finished else []
            ids = torch.tensor([[TOKENIZER["bos_id"], *x.tokens, *end]])
            with torch.no_grad():
                logp = dec.caption_logprob(memory.index(torch.tensor([row])), ids)
            assert float(logp) == pytest.approx(x.score, abs=1e-9)


def test_a_padded_caption_scores_as_the_unpadded_one():
    dec, memory = _random_decoder("attention", seed=2)
    tok = ByteTokenizer(context_length=24)
    ids = torch.tensor(tok.encode_batch(["a red circle", "a small blue cross on top"])[0])
    short = ids[:, :14]  # the first caption unpadded (BOS + 12 bytes + EOS), the second cut
    with torch.no_grad():
        full = dec.caption_logprob(memory.index(torch.tensor([0, 1])), ids)
        cut = dec.caption_logprob(memory.index(torch.tensor([0])), short[:1])
    assert float(full[0]) == pytest.approx(float(cut[0]), abs=1e-9)
    # and the training loss: the same tokens scored, whatever the padding
    with torch.no_grad():
        logp_full = dec.log_probs(dec(memory.index(torch.tensor([0])), ids[:1, :-1]))
        logp_cut = dec.log_probs(dec(memory.index(torch.tensor([0])), short[:1, :-1]))
        a = caption_loss(logp_full, ids[:1, 1:], pad_id=0, smoothing=0.1)
        b = caption_loss(logp_cut, short[:1, 1:], pad_id=0, smoothing=0.1)
    assert float(a) == pytest.approx(float(b), abs=1e-9)


def test_caption_loss_by_hand():
    # vocabulary of 4: PAD (never emitted), then tokens 1..3; two positions, one padded
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    logp = torch.log_softmax(
        logits.masked_fill(torch.tensor([True, False, False, False]), -1e30), -1
    )
    logp = logp.masked_fill(torch.tensor([True, False, False, False]), float("-inf"))
    target = torch.tensor([[2, 0]])
    z = torch.log(torch.exp(torch.tensor([1.0, 2.0, 3.0])).sum())
    nll = z - 2.0  # -log p(token 2)
    assert float(caption_loss(logp, target, pad_id=0)) == pytest.approx(float(nll), abs=1e-6)
    uniform = z - 2.0  # mean of -log p over tokens 1..3: z - mean(1, 2, 3)
    want = 0.9 * nll + 0.1 * uniform
    assert float(caption_loss(logp, target, 0, smoothing=0.1)) == pytest.approx(float(want), 1e-6)
    target = torch.tensor([[3, 0]])
    want = 0.8 * (z - 3.0) + 0.2 * (z - 2.0)
    assert float(caption_loss(logp, target, 0, smoothing=0.2)) == pytest.approx(float(want), 1e-6)


def test_the_decoder_is_rebuilt_from_the_checkpoint_alone(overfit, small, tmp_path):
    from mmcli.formats.checkpoint import load_checkpoint

    run, _, _ = overfit
    ckpt = load_checkpoint(run / "last.safetensors")
    spec = ckpt.config["captioner"]
    assert spec["kind"] == "attention" and spec["source"] == "image"
    assert spec["tokenizer"]["tokenizer"] == "bytes" and spec["source_tokens"] == 16
    assert any(k.startswith("captioner.") for k in ckpt.state_dict)
    a = MultimodalModel.from_checkpoint(run / "last.safetensors")
    a.to_checkpoint(tmp_path / "again.safetensors")
    b = MultimodalModel.from_checkpoint(tmp_path / "again.safetensors")
    x = list(Captioner(a).caption_tensors([str(small)]))
    assert x == list(Captioner(b).caption_tensors([str(small)]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "lstm"}, "unknown caption decoder"),
        ({"width": 33}, "not divisible by heads"),
        ({"surprise": 1}, "unknown entries"),
        ({"source": "text"}, "not a source encoder"),
        ({"pooled_dim": 7}, "expects image features"),
        ({"tokenizer": {"vocab_size": 4}}, "tokenizer spec"),
    ],
)
def test_a_bad_decoder_config_in_a_checkpoint_is_one_line(overfit, tmp_path, change, message):
    from mmcli.formats.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    run, _, _ = overfit
    ckpt = load_checkpoint(run / "last.safetensors")
    ckpt.config["captioner"].update(change)
    save_checkpoint(tmp_path / "bad.safetensors", Checkpoint(ckpt.config, ckpt.state_dict))
    with pytest.raises(BadInput, match=message) as e:
        MultimodalModel.from_checkpoint(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_coca_trains_both_losses_into_one_model(small, tmp_path):
    summary = train_captioner(
        small,
        tmp_path / "run",
        steps=20,
        objectives={"contrastive": 1.0, "caption": 2.0},
    )
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logs if "loss" in r][-1]
    assert last["loss"] == pytest.approx(last["contrastive"] + 2 * last["caption"], rel=1e-5)
    model = MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.captioner is not None and model.logit_scale is not None
    assert summary["steps"] == 20


def test_a_frozen_tower_stays_as_it_was(small, tmp_path):
    train_captioner(small, tmp_path / "a", steps=3, freeze=["image"], lr=1e-2)
    train_captioner(small, tmp_path / "b", steps=12, freeze=["image"], lr=1e-2)
    a = MultimodalModel.from_checkpoint(tmp_path / "a" / "last.safetensors").state_dict()
    b = MultimodalModel.from_checkpoint(tmp_path / "b" / "last.safetensors").state_dict()
    for k in a:
        if k.startswith("encoders.image."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("captioner."))


def test_audio_transcripts_overfit(small, tmp_path):
    train_captioner(small, tmp_path / "run", source="audio", steps=150)
    cap = Captioner(MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors"))
    assert cap.source == "audio"
    got = {line["id"]: line["caption"] for line in cap.caption_tensors([str(small)])}
    assert got == _captions(small)


def test_chinese_captions_through_the_byte_tokenizer(toy_data, tmp_path):
    rows = [json.loads(x) for x in toy_data.read_text(encoding="utf-8").splitlines()[:6]]
    for r in rows:
        r["text"] = [r["text"][-1]]  # the Chinese caption
        r["image"] = str(toy_data.parent / r["image"])
        r["split"] = "train"
        r.pop("audio")
    (tmp_path / "zh").mkdir()
    manifest = tmp_path / "zh" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tensors = tensors_of(manifest, tmp_path / "t")
    train_captioner(tensors, tmp_path / "run", steps=150, batch_size=6)
    cap = Captioner(MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors"))
    got = {line["id"]: line["caption"] for line in cap.caption_tensors([str(tensors)])}
    assert got == {r["id"]: r["text"][0] for r in rows}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"caption_decoder": "lstm"}, "unknown caption decoder"),
        ({"caption_decoder": "attention:depth=two"}, "not a number"),
        ({"caption_decoder": "attention:size=3"}, "bad caption decoder option"),
        ({"label_smoothing": 1.0}, "label-smoothing"),
    ],
)
def test_bad_caption_options(kw, message):
    with pytest.raises(BadInput, match=message):
        FuseConfig(objectives={"caption": 1.0}, **kw)


def test_caption_from_must_be_a_trained_source(small, tmp_path):
    with pytest.raises(BadInput, match="--caption-from text"):
        train_captioner(small, tmp_path / "run", steps=1, source="text")
