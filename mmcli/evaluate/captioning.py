"""Captioning metrics: generated captions against every reference caption of an item.

    metrics = caption_metrics({"a": "a red circle"}, {"a": ["a red circle", "红色圆形"]})
    metrics["CIDEr"], metrics["Bleu_4"], metrics["WER"]

BLEU-1..4, ROUGE-L and CIDEr-D are pycocoevalcap's scorers (the COCO caption
evaluation code, as CLIP_benchmark's captioning task runs it; its ``Cider`` is CIDEr-D:
clipped n-gram counts, a Gaussian length penalty, x10), keyed as CLIP_benchmark keys them:
``Bleu_1`` ... ``Bleu_4``, ``ROUGE_L``, ``CIDEr``. ``WER`` (jiwer) is the word error rate
against the closest reference of each item: the errors (substitutions, deletions,
insertions) summed over the items, divided by the words of those references; the closest
reference is the one with the fewest errors.

Tokenization (:func:`tokenize`), the same for every metric, instead of COCO's PTB
tokenizer (Stanford CoreNLP, which needs Java): NFKC, lowercase, each CJK ideograph, kana
or fullwidth character is one token (so Chinese captions are scored by character, as
COCO-CN does), other tokens are runs of letters and digits (an apostrophe inside a word is
kept: "don't"); punctuation and whitespace only separate tokens.

References come from tensor shards: the captions as given (the ``text.raw`` strings
preprocess keeps beside the byte tokens, so a caption longer than ``--context-length`` is
scored whole, not at its byte cut; shards from before mmcli kept the strings fall back to
decoding the byte tokens, with a warning), grouped by item through the ``text.item``
column (five COCO captions, four toy captions: every one a reference).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmcli.data.captions import caption_rows
from mmcli.errors import BadInput, MissingDependency
from mmcli.formats.tensorfile import TensorSet, open_tensors, where_paths

_CJK = (
    "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00020000-\U0002fa1f"
)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:'[^\W_{_CJK}]+)*")
KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "WER")
TOKENIZATION = (
    "NFKC, lowercase; CJK characters one token each; else runs of letters and digits; "
    "punctuation dropped"
)


def tokenize(text: str) -> list[str]:
    """The metric tokens of a caption (see the module docstring)."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise MissingDependency("pycocoevalcap", "caption", "captioning metrics") from None
    return Bleu, Rouge, Cider


def coco_metrics(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of ``candidates[id]`` against ``references[id]``
    (the same ids; each item needs a reference with a token)."""
    Bleu, Rouge, Cider = _scorers()
    res = {k: [" ".join(tokenize(v))] for k, v in candidates.items()}
    gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in candidates}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print; stdout is data
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["ROUGE_L"] = float(rouge)
    out["CIDEr"] = float(cider)
    return out


def word_error_rate(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> float:
    """Corpus WER against the closest reference of each item (the fewest word errors by
    jiwer's alignment; a tie goes to the longer reference)."""
    try:
        import jiwer
    except ImportError:
        raise MissingDependency("jiwer", "caption", "word error rate") from None
    errors = words = 0
    for k, hyp in candidates.items():
        hyp_text = " ".join(tokenize(hyp))
        best: tuple[int, int] | None = None
        for ref in references[k]:
            ref_tokens = tokenize(ref)
            if not ref_tokens:
                continue
            if hyp_text:
                o = jiwer.process_words(" ".join(ref_tokens), hyp_text)
                e = o.substitutions + o.deletions + o.insertions
            else:
                e = len(ref_tokens)  # everything deleted
            key = (e, -len(ref_tokens))
            best = key if best is None or key < best else best
        if best is not None:
            errors, words = errors + best[0], words - best[1]
    return errors / words if words else float("nan")


def caption_metrics(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Every captioning metric (:data:`KEYS`) over the items with a usable reference."""
    usable = {k: v for k, v in candidates.items() if any(tokenize(r) for r in references[k])}
    if not usable:
        raise BadInput("no captioned item has a reference caption with a word")
    refs = {k: [r for r in references[k] if tokenize(r)] for k in usable}
    out = coco_metrics(usable, refs)
    out["WER"] = word_error_rate(usable, refs)
    return out


# ----------------------------------------------------------------------- inputs


def references_from_tensors(ts: TensorSet, keep: np.ndarray | None = None) -> dict[str, list[str]]:
    """Every item's reference captions, as given (module docstring), grouped by ``text.item``."""
    ts.require("text", hint="the references are the text table of the tensor shards")
    if ts.kind != "tensors":
        raise BadInput(
            "captioning references are captions in tensor shards, got feature files",
            where=where_paths(ts.paths),
            hint="pass the preprocess output (tensor shards) of the items",
        )
    ids = ts.ids()
    refs: dict[str, list[str]] = {}
    for shard, offset in zip(ts.shards, ts.item_offsets):
        items = (shard.item_index("text") + offset).tolist()
        for caption, item in zip(caption_rows(shard, "text"), items):
            if keep is None or keep[item]:
                refs.setdefault(ids[item], []).append(caption)
    return refs


def read_captions(path: str) -> dict[str, str]:
    """``{"id", "caption"}`` JSON lines (``mmcli caption``'s output; ``-``: stdin)."""
    from mmcli.formats.atomic import is_stdio

    out: dict[str, str] = {}
    try:
        if is_stdio(path):
            import sys

            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise BadInput("file not found", where=path) from None
    except UnicodeDecodeError:
        raise BadInput("not valid UTF-8", where=path) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno} of {path}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"bad JSON ({e.msg} at column {e.colno})", where=where) from None
        if not isinstance(obj, dict) or "error" in obj:
            continue  # an error line of mmcli caption: that item has no caption
        item, caption = obj.get("id"), obj.get("caption")
        if not isinstance(item, str) or not isinstance(caption, str):
            raise BadInput(
                'a caption line needs a string "id" and "caption"',
                where=where,
                hint="pass the output of mmcli caption",
            )
        out[item] = caption
    return out


def evaluate_captioning(
    sources: Sequence[str],
    *,
    captions: str | None = None,
    model: str | None = None,
    split: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[dict[str, float], dict[str, Any], TensorSet]:
    """(metrics, info, the reference shards) for ``eval --task captioning``: the captions
    of a file (``captions``) or generated now with ``model`` (greedy), against the
    references of the tensor shards ``sources`` (their ``split`` items only)."""
    from mmcli.generate.captioner import Captioner, select_items

    if (captions is None) == (model is None):
        raise BadInput(
            "--task captioning needs --captions FILE (mmcli caption's output) or --model CKPT",
            hint="not both",
        )
    ts = open_tensors(list(sources))
    keep = select_items(ts, split)
    references = references_from_tensors(ts, keep)
    info: dict[str, Any] = {"tokenization": TOKENIZATION}
    if model is not None:
        cap = Captioner.load(model, device=device, batch_size=batch_size)
        info.update(source=cap.source, decoding="greedy")
        generated = {line["id"]: line["caption"] for line in cap.caption_tensors(sources, split)}
    else:
        generated = read_captions(captions)
        all_ids = set(ts.ids())
        unknown = sorted(set(generated) - all_ids)
        if unknown:
            raise BadInput(
                f"{len(unknown)} captions are of items not in the shards (e.g. {unknown[0]!r})",
                where=captions,
                hint="caption the same tensor shards you evaluate against",
            )
    scored = {k: v for k, v in generated.items() if k in references}
    if not scored:
        raise BadInput("no item has both a caption and reference captions", where=captions)
    metrics = caption_metrics(scored, references)
    info.update(
        items=len(scored),
        uncaptioned=len(set(references) - set(scored)),
        references_per_item=round(float(np.mean([len(references[k]) for k in scored])), 3),
    )
    return metrics, info, ts
