"""Captioning metrics against published and hand-computed values, and the tokenization."""

from __future__ import annotations

import math

import pytest

from mmcli.evaluate.captioning import caption_metrics, coco_metrics, tokenize, word_error_rate


def test_tokenization_lowercases_drops_punctuation_and_splits_chinese_by_character():
    assert tokenize("On the left, a small RED circle.") == [
        "on", "the", "left", "a", "small", "red", "circle",
    ]  # fmt: skip
    assert tokenize("don't  stop") == ["don't", "stop"]
    assert tokenize("左边是小的红色圆形，右边") == list("左边是小的红色圆形右边")
    assert tokenize("ＡＢＣ 3 cats") == ["abc", "3", "cats"]  # NFKC folds fullwidth letters


def test_bleu_papineni_modified_unigram_precision():
    # Papineni et al. (2002), section 2.1: "the the the the the the the" against two
    # references has modified unigram precision 2/7; the closest reference length is 7
    # ("there is a cat on the mat"), so no brevity penalty: BLEU-1 = 2/7
    m = coco_metrics(
        {"x": "the the the the the the the"},
        {"x": ["The cat is on the mat.", "There is a cat on the mat."]},
    )
    assert m["Bleu_1"] == pytest.approx(2 / 7, abs=1e-6)
    assert m["Bleu_2"] < 1e-6  # no bigram matches


def test_bleu_1_to_4_by_hand():
    # 7 words, one substitution at the end: n-gram matches 6/7, 5/6, 4/5, 3/4
    m = coco_metrics(
        {"x": "a small red circle on the left"}, {"x": ["a small red circle on the right"]}
    )
    p = [6 / 7, 5 / 6, 4 / 5, 3 / 4]
    for n in range(1, 5):
        assert m[f"Bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), abs=1e-6)
    # a short candidate: every n-gram matches, the brevity penalty exp(1 - 7/4) remains
    m = coco_metrics({"x": "a small red circle"}, {"x": ["a small red circle on the left"]})
    for n in range(1, 5):
        assert m[f"Bleu_{n}"] == pytest.approx(math.exp(1 - 7 / 4), abs=1e-6)


def test_rouge_l_by_hand():
    # LCS "a circle" (2): precision 2/2, recall 2/3, F with beta 1.2
    m = coco_metrics({"x": "a circle"}, {"x": ["a red circle", "something else entirely"]})
    p, r, b2 = 1.0, 2 / 3, 1.2**2
    assert m["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-9)


def test_cider_d_by_hand():
    # Two items; document frequencies over the references: "a" in both (idf 0), every
    # other n-gram in one of the two (idf log 2, the same for all, so it cancels).
    # Item 0: unigram vectors {blue, circle} vs {red, circle}: cosine 1/2; no bigram or
    # trigram in common; no 4-grams: (0.5 + 0 + 0 + 0) / 4 * 10 = 1.25.
    # Item 1: candidate = reference, 3 words: uni-, bi-, trigrams 1 each, no 4-gram:
    # (1 + 1 + 1 + 0) / 4 * 10 = 7.5. CIDEr-D: the mean, 4.375.
    m = coco_metrics(
        {"0": "a blue circle", "1": "a blue square"},
        {"0": ["a red circle"], "1": ["a blue square"]},
    )
    assert m["CIDEr"] == pytest.approx(4.375, abs=1e-9)


def test_wer_jiwer_readme_example_and_the_closest_reference():
    # jiwer's README: reference "hello world", hypothesis "hello duck" -> 0.5
    assert word_error_rate({"x": "hello duck"}, {"x": ["hello world"]}) == pytest.approx(0.5)
    # the closest reference counts; errors and words add up over the items
    refs = {"x": ["hello world", "hello duck"], "y": ["a b c d"]}
    assert word_error_rate({"x": "hello duck", "y": "a b"}, refs) == pytest.approx(2 / 6)
    assert word_error_rate({"x": "", "y": "a b c d"}, refs) == pytest.approx(2 / 6)


def test_a_perfect_caption_set():
    refs = {
        "a": ["a small red circle on the left", "on the left a small red circle"],
        "b": ["a large blue cross at the top", "大的蓝色十字形"],
        "c": ["a medium green star in the center"],
    }
    m = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    assert m["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE_L"] == pytest.approx(1.0)
    assert m["WER"] == 0.0
    assert m["CIDEr"] > 3.0
    assert set(m) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "WER"}


def test_missing_scorers_say_how_to_install(monkeypatch):
    import sys

    from mmcli.errors import BadInput

    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(BadInput, match=r'pip install "mmcli\[caption\]"') as e:
        coco_metrics({"x": "a"}, {"x": ["a"]})
    assert "pycocoevalcap is not installed" in str(e.value)
    monkeypatch.setitem(sys.modules, "jiwer", None)
    with pytest.raises(BadInput, match="jiwer is not installed"):
        word_error_rate({"x": "a"}, {"x": ["a"]})
