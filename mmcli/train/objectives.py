"""Loss functions shared by ``fuse-train`` and ``distill``. Pure functions of tensors.

Contrastive losses know about several captions per item: ``item_a``/``item_b`` give the
item of every row, and rows of the same item are positives, never negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives per row, each scored against the row's negatives only.

    For row i and positive j: ``-log(e^{l_ij} / (e^{l_ij} + sum_{k not in P(i)} e^{l_ik}))``,
    averaged over the positives of i, then over the rows that have a positive. With one
    positive per row this is exactly cross-entropy (CLIP).
    """
    neg_lse = torch.logsumexp(logits.masked_fill(pos, float("-inf")), dim=1, keepdim=True)
    per_pair = logits - torch.logaddexp(logits, neg_lse)  # log p(j | j or negatives)
    per_pair = per_pair.masked_fill(~pos, 0.0)
    counts = pos.sum(1)
    valid = counts > 0
    return -(per_pair.sum(1)[valid] / counts[valid]).mean()


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    item_a: torch.Tensor,
    item_b: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) between rows of ``a`` [Na, D] and ``b`` [Nb, D].

    ``logit_scale`` multiplies the cosine similarities (inputs are expected normalized).
    """
    logits = logit_scale * (a @ b.T)  # (Na, Nb)
    pos = item_a[:, None] == item_b[None, :]
    return 0.5 * (_multi_positive_ce(logits, pos) + _multi_positive_ce(logits.T, pos.T))


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    item_a: torch.Tensor,
    item_b: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): every (a_i, b_j) is a binary match / no-match problem.

    ``-1/Na * sum_ij log sigmoid(z_ij * (t * a_i.b_j + bias))`` with z = +1 for the same item.
    """
    logits = logit_scale * (a @ b.T) + logit_bias
    z = (item_a[:, None] == item_b[None, :]).to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / a.shape[0]


def classify_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a label (label -1 = none is ignored)."""
    if not (labels >= 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)


def match_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Image-text matching: binary cross-entropy, positives -> 1 and hard negatives -> 0."""
    logits = torch.cat([pos_logits, neg_logits])
    target = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(neg_logits)])
    return F.binary_cross_entropy_with_logits(logits, target)


def hard_negatives(
    sim: torch.Tensor, pos: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, a negative column sampled in proportion to softmax(sim) (ALBEF-style).

    Rows without any negative get their most similar column (which is then a positive:
    callers drop them with ``pos.all(1)``).
    """
    weights = torch.softmax(sim.detach().float().masked_fill(pos, float("-inf")), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------- distillation


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton distillation: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Student embedding (already projected to the teacher's width) vs the teacher's."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown feature loss {kind!r} (mse or cosine)")


def similarity_loss(
    s_a: torch.Tensor, s_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL between the teacher's and the student's in-batch cross-modal similarity
    distributions, both directions (a->b rows and b->a rows), averaged."""
    s = (s_a @ s_b.T) / temperature
    t = (t_a @ t_b.T) / temperature
    ab = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
    ba = F.kl_div(
        F.log_softmax(s.T, 1), F.log_softmax(t.T, 1), reduction="batchmean", log_target=True
    )
    return 0.5 * (ab + ba)


def _normalized_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)  # (B, B)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    mean = d[off].mean().clamp_min(1e-12)
    return d / mean


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise relational KD (Park et al. 2019): pairwise distances, each normalized by
    its mean over distinct pairs, compared with smooth L1."""
    if len(student) < 2:
        return student.sum() * 0.0
    off = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    with torch.no_grad():
        t = _normalized_distances(teacher.float())
    s = _normalized_distances(student.float())
    return F.smooth_l1_loss(s[off], t[off])


def interactive_contrastive_loss(
    s_a: torch.Tensor,
    s_b: torch.Tensor,
    t_a: torch.Tensor,
    t_b: torch.Tensor,
    item_a: torch.Tensor,
    item_b: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Interactive contrastive learning (CLIP-KD, Yang et al. 2024): the student's rows of one
    modality contrasted with the teacher's rows of the other, both ways, averaged:
    ``(contrastive(s_a, t_b) + contrastive(t_a, s_b)) / 2``. Pulls the student's embeddings
    into the teacher's space (the teacher's rows are targets, given without gradient)."""
    return 0.5 * (
        contrastive_loss(s_a, t_b, item_a, item_b, logit_scale)
        + contrastive_loss(t_a, s_b, item_a, item_b, logit_scale)
    )


def caption_loss(
    logp: torch.Tensor, target: torch.Tensor, pad_id: int, smoothing: float = 0.0
) -> torch.Tensor:
    """Teacher-forced token cross-entropy of captions, averaged over the tokens that are
    not padding.

    ``logp`` [B, L, V]: the decoder's log-probabilities of the token after each input
    position (tokens it never emits are -inf); ``target`` [B, L]: the tokens that follow
    (``pad_id`` where the caption has ended). With label smoothing ``e`` each token's loss
    is ``(1 - e) * -log p(target) + e * mean over the emittable tokens of -log p``.
    """
    valid = target != pad_id
    nll = -logp.gather(-1, target.long().clamp_min(0)[..., None]).squeeze(-1)
    if smoothing:
        allowed = torch.isfinite(logp)
        uniform = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1).clamp_min(1)
        nll = (1 - smoothing) * nll + smoothing * uniform
    nll = nll.masked_fill(~valid, 0.0)
    return nll.sum() / valid.sum().clamp_min(1)
