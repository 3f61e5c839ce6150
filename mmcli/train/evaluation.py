"""Validation during training: retrieval both ways for every pair, accuracy, binding.

Keys (per trained pair ``a-b``, e.g. ``image-text``):

* ``image-text/image_retrieval_recall@k``: text -> image, every caption a query (CLIP_benchmark's
  convention); ``image-text/text_retrieval_recall@k``: image -> text, a hit when any of
  the image's captions is in its top k; ``image-text/mean_recall@k`` their mean;
* ``acc1``: the classifier head's accuracy on the fused embedding (when trained);
* ``binding/...``: on two-shape items whose colour-swapped partner (manifest ``swap_id``) is
  also in the validation set, how often an image scores its own caption above the
  partner's caption with the colours swapped (``i2t``), and a caption scores its own
  image above the partner's image (``t2i``). The score is the matching head on the fused
  pair when the model has one, else the cosine of the joint embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmcli.evaluate.retrieval import pair_ranks
from mmcli.train.data import Dataset

KS = (1, 5, 10)


@torch.no_grad()
def embed_rows(
    model,
    ds: Dataset,
    items: np.ndarray,
    modality: str,
    batch_size: int = 256,
    tokens: bool = False,
) -> tuple[torch.Tensor, np.ndarray, list | None]:
    """Normalized embeddings of every row of ``modality`` of ``items``, and each row's
    position in ``items``. With ``tokens`` also the encoder tokens per row (for fusion)."""
    device = next(model.parameters()).device
    rows = [ds.rows_of[modality][i] for i in items]
    owner = (
        np.concatenate([np.full(len(r), k, dtype=np.int64) for k, r in enumerate(rows)])
        if rows
        else np.zeros(0, np.int64)
    )
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    out, toks = [], []
    for start in range(0, len(flat), batch_size):
        # a pretrained text tower (its own tokenizer): the full captions, not the byte tokens
        x = ds.tables[modality].model_input(
            model.encoders[modality], flat[start : start + batch_size]
        )
        x = x.to(device)
        if tokens:
            pooled, tok, mask = model.encoders[modality].forward_tokens(x)
            toks.append((tok, mask))
        else:
            pooled = model.encoders[modality](x)
        z = model.heads[modality](pooled) if modality in model.heads else pooled
        out.append(torch.nn.functional.normalize(z.float(), dim=-1))
    emb = torch.cat(out) if out else torch.zeros(0, model.out_dim(modality), device=device)
    return emb, owner, (toks if tokens else None)


def _recall_keys(a: str, b: str, k: int) -> tuple[str, str, str]:
    """Names of (b -> a recall, a -> b recall, their mean) at k for the pair a-b."""
    return (
        f"{a}-{b}/{a}_retrieval_recall@{k}",
        f"{a}-{b}/{b}_retrieval_recall@{k}",
        f"{a}-{b}/mean_recall@{k}",
    )


def metric_names(pairs: list[tuple[str, str]], classifier: bool) -> list[str]:
    """Every name :func:`evaluate_model` can report for these pairs (what ``--best-metric``
    may pick; recall@k for a k above the validation set's size is left out at run time)."""
    names = [name for a, b in pairs for k in KS for name in _recall_keys(a, b, k)]
    if classifier:
        names.append("acc1")
    return names + ["binding/acc", "binding/i2t_acc", "binding/t2i_acc"]


@torch.no_grad()
def evaluate_model(
    model, ds: Dataset, items: np.ndarray, pairs: list[tuple[str, str]], batch_size: int = 256
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    cache: dict[str, tuple[torch.Tensor, np.ndarray]] = {}

    def get(m: str):
        if m not in cache:
            emb, owner, _ = embed_rows(model, ds, items, m, batch_size)
            cache[m] = (emb, owner)
        return cache[m]

    for a, b in pairs:
        ea, oa = get(a)
        eb, ob = get(b)
        if len(ea) == 0 or len(eb) == 0:
            continue
        k = tuple(x for x in KS if x <= max(1, min(len(np.unique(oa)), len(np.unique(ob)))))
        rev, res = _ranks(ea, oa, eb, ob, k)  # a -> b, and b queries -> a targets
        for kk in k:
            to_a, to_b = res[f"recall@{kk}"], rev[f"recall@{kk}"]
            metrics.update(zip(_recall_keys(a, b, kk), (to_a, to_b, 0.5 * (to_a + to_b))))
    if model.classifier is not None:
        metrics.update(_accuracy(model, ds, items, batch_size))
    metrics.update(binding_accuracy(model, ds, items, batch_size, embedded=get))
    return metrics


def _ranks(
    a: torch.Tensor, a_items: np.ndarray, b: torch.Tensor, b_items: np.ndarray, ks
) -> tuple[dict[str, float], dict[str, float]]:
    """recall@k both ways (a -> b, b -> a), a hit when any positive ranks within k.

    The ranks are ``mmcli eval``'s: exact, with its tie rule (equal scores are ordered by
    candidate, never in the query's favour), so a collapsed model scores at chance here
    too. A query whose item has no row in the other table is left out.
    """
    out = []
    for r in pair_ranks(a, a_items, b, b_items, device=a.device, exact_up_to=max(ks)):
        first = r.first() if r.n_queries else np.zeros(0)
        out.append({f"recall@{k}": float((first <= k).mean()) if len(first) else float("nan")
                    for k in ks})  # fmt: skip
    return out[0], out[1]


@torch.no_grad()
def fused_first_rows(model, ds: Dataset, items: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The fused embedding of each item from the first row of each of its modalities."""
    device = next(model.parameters()).device
    out = []
    modalities = [m for m in model.encoders if m in ds.tables]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs, present = {}, {}
        for m in modalities:
            has = np.array([len(ds.rows_of[m][i]) > 0 for i in chunk])
            rows = np.array(
                [
                    ds.rows_of[m][i][0]
                    if h
                    else ds.rows_of[m][chunk[has][0]][0]
                    if has.any()
                    else 0
                    for i, h in zip(chunk, has)
                ]
            )
            if has.any():
                inputs[m] = ds.tables[m].fetch(rows).to(device)
                present[m] = torch.from_numpy(has).to(device)
        out.append(model.fuse(inputs, present))
    return torch.cat(out)


def _accuracy(model, ds: Dataset, items: np.ndarray, batch_size: int) -> dict[str, float]:
    labels = torch.from_numpy(ds.labels[items])
    keep = labels >= 0
    if not keep.any():
        return {}
    logits = model.classifier(fused_first_rows(model, ds, items, batch_size)).cpu()
    pred = logits.argmax(1)
    return {"acc1": float((pred[keep] == labels[keep]).float().mean())}


@torch.no_grad()
def binding_accuracy(
    model, ds: Dataset, items: np.ndarray, batch_size: int = 256, embedded=None
) -> dict[str, Any]:
    """Own caption vs the colour-swapped partner's caption (and own vs partner image).

    ``embedded(m)``: (embeddings, owner) of every row of ``items`` already computed (by
    :func:`evaluate_model`); reused when the score is the cosine (no match head)."""
    if not ds.manifest or "image" not in ds.tables or "text" not in ds.tables:
        return {}
    pos = {ds.ids[i]: k for k, i in enumerate(items)}
    pairs = []
    for k, i in enumerate(items):
        partner = ds.manifest.get(ds.ids[i], {}).get("swap_id")
        if partner in pos and ds.ids[i] < partner:
            pairs.append((k, pos[partner]))
    if not pairs:
        return {}
    sel = np.array(sorted({x for p in pairs for x in p}))
    local = {k: j for j, k in enumerate(sel)}
    sub = items[sel]
    if embedded is not None and model.matcher is None:  # rows of the pairs' items, in order

        def rows_of(m: str):
            emb, owner = embedded(m)
            keep = np.isin(owner, sel)
            return emb[torch.from_numpy(keep)], np.searchsorted(sel, owner[keep]), None

        img, _, img_tok = rows_of("image")
        txt, txt_owner, txt_tok = rows_of("text")
    else:
        img, _, img_tok = embed_rows(
            model, ds, sub, "image", batch_size, tokens=model.matcher is not None
        )
        txt, txt_owner, txt_tok = embed_rows(
            model, ds, sub, "text", batch_size, tokens=model.matcher is not None
        )
    # the k-th caption of an item and the k-th caption of its partner are colour swaps of each other
    first_row = {}
    for r, o in enumerate(txt_owner):
        first_row.setdefault(int(o), r)
    n_caps = np.bincount(txt_owner, minlength=len(sub))
    i2t, t2i = [], []
    for x, y in pairs:
        for u, v in ((local[x], local[y]), (local[y], local[x])):
            for c in range(min(n_caps[u], n_caps[v])):
                tu, tv = first_row[u] + c, first_row[v] + c
                own = _score(model, img, img_tok, u, txt, txt_tok, tu)
                i2t.append(own > _score(model, img, img_tok, u, txt, txt_tok, tv))
                t2i.append(own > _score(model, img, img_tok, v, txt, txt_tok, tu))
    return {
        "binding/i2t_acc": float(np.mean(i2t)),
        "binding/t2i_acc": float(np.mean(t2i)),
        "binding/acc": float(np.mean(i2t + t2i)),
        "binding/pairs": float(len(pairs)),
    }


def _token_row(tok_batches: list, row: int, batch_size: int = 256):
    tok, mask = tok_batches[row // batch_size]
    r = row % batch_size
    return tok[r : r + 1], mask[r : r + 1]


def _score(model, img, img_tok, i, txt, txt_tok, t) -> float:
    if model.matcher is None:
        return float(img[i] @ txt[t])
    toks = {}
    if img_tok is not None and model.config.fusion["kind"] == "attention":
        toks = {"image": _token_row(img_tok, i), "text": _token_row(txt_tok, t)}
    emb = {"image": img[i : i + 1], "text": txt[t : t + 1]}
    return float(model.match_score((toks, emb)))
