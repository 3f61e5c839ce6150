"""Linear probe: logistic regression on frozen features.

Features are standardised with the training split's mean and standard deviation. A
multinomial logistic regression (weights + bias, L2 penalty ``wd * |W|^2`` on the
weights) is fitted full-batch by L-BFGS in torch, so it runs on CPU and CUDA alike. The
weight decay is chosen on the validation split (best ``acc1``; the smaller decay wins a
tie), the probe is refitted on train + val with it, and the metrics are those of the
test split: ``lp_acc1``, ``lp_acc5`` (5 classes or more), ``lp_mean_per_class_recall``.

Splits, as a user would give them (``mmcli eval --task linear-probe``):

* one set of FEATURES whose items carry a ``split`` in their manifest (``train``; ``val``
  / ``valid`` / ``validation`` / ``dev``; ``test``), read through ``mmcli.source``;
* or ``--train FEATURES --test FEATURES`` (and optionally ``--val FEATURES``).

Without a validation split, a seeded 20% of the training *items* (all rows of an item
stay together) is held out to choose the weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcli.errors import BadInput
from mmcli.evaluate.classification import classification_metrics
from mmcli.search.numerics import SMALL_WORK, few_threads

WEIGHT_DECAYS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
VAL_SHARE = 0.2


@dataclass
class Split:
    """Rows of one split: features [n, D], labels [n] (class numbers), item numbers [n]."""

    x: Any
    y: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def fit_logistic_regression(
    x, y, n_classes: int, weight_decay: float, *, device: Any = "cpu", max_iter: int = 100
):
    """Weights [D, C] and bias [C] minimising mean cross-entropy + wd |W|^2.

    Full-batch L-BFGS (two-loop recursion, backtracking Armijo line search) on the
    analytic gradient: a convex problem, deterministic, no autograd, any device.
    """
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    y = torch.as_tensor(y, dtype=torch.int64, device=device)
    n, d = x.shape
    onehot = torch.nn.functional.one_hot(y, n_classes).float()

    def loss_grad(theta):
        w, b = theta[: d * n_classes].view(d, n_classes), theta[d * n_classes :]
        logits = x @ w + b  # (N, C)
        logp = torch.log_softmax(logits, dim=1)
        loss = -(logp * onehot).sum() / n + weight_decay * (w * w).sum()
        err = (logp.exp() - onehot) / n  # (N, C)
        gw = x.T @ err + 2 * weight_decay * w
        return loss, torch.cat([gw.reshape(-1), err.sum(0)])

    with few_threads(x.numel() * n_classes < SMALL_WORK and x.device.type == "cpu"):
        theta = _lbfgs(loss_grad, torch.zeros(d * n_classes + n_classes, device=device), max_iter)
    return theta[: d * n_classes].view(d, n_classes), theta[d * n_classes :]


def _lbfgs(
    loss_grad,
    theta,
    max_iter: int,
    history: int = 20,
    tol_grad: float = 1e-6,
    tol_change: float = 1e-9,
):
    f, g = loss_grad(theta)
    pairs: list[tuple[Any, Any, float]] = []
    for it in range(max_iter):
        if float(g.abs().max()) <= tol_grad:
            break
        q = g.clone()
        alphas = []
        for s, yv, rho in reversed(pairs):
            a = rho * float(s @ q)
            q -= a * yv
            alphas.append(a)
        if pairs:
            s, yv, _ = pairs[-1]
            q *= float(s @ yv) / float(yv @ yv)
        for (s, yv, rho), a in zip(pairs, reversed(alphas)):
            q += s * (a - rho * float(yv @ q))
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0 if pairs or it else min(1.0, 1.0 / float(g.abs().sum()))
        while True:
            new = theta + step * direction
            f_new, g_new = loss_grad(new)
            if float(f_new) <= float(f) + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, yv = new - theta, g_new - g
        sy = float(s @ yv)
        if sy > 1e-12:
            pairs.append((s, yv, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        done = abs(float(f) - float(f_new)) <= tol_change * max(1.0, abs(float(f)))
        theta, f, g = new, f_new, g_new
        if done:
            break
    return theta


def _standardize(train_x, *others):
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)]


def linear_probe(
    train: Split,
    val: Split | None,
    test: Split,
    n_classes: int,
    *,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    device: Any = "cpu",
    seed: int = 0,
    max_iter: int = 100,
    details: dict | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Choose the weight decay on ``val`` (or a held-out part of ``train``), refit on
    train + val, report on ``test``. Returns ``(metrics, info)``."""
    if len(train) == 0 or len(test) == 0:
        raise BadInput(
            "the linear probe needs labelled train and test rows",
            hint="check the splits (--train/--test or the manifest's split field)",
        )
    held_out = val is None or len(val) == 0
    if held_out:
        train, val = _hold_out(train, seed)
    fit, sel = train, val
    x_fit, x_val = _standardize(fit.x.float(), sel.x.float())
    scores = {}
    for wd in weight_decays:
        w, b = fit_logistic_regression(
            x_fit, fit.y, n_classes, wd, device=device, max_iter=max_iter
        )
        logits = x_val.to(device) @ w + b
        scores[wd] = classification_metrics(logits.cpu(), sel.y, n_classes)["acc1"]
    best = max(weight_decays, key=lambda wd: (scores[wd], -wd))
    full_x = torch.cat([train.x.float(), val.x.float()])
    full_y = np.concatenate([train.y, val.y])
    x_all, x_test = _standardize(full_x, test.x.float())
    w, b = fit_logistic_regression(x_all, full_y, n_classes, best, device=device, max_iter=max_iter)
    logits = (x_test.to(device) @ w + b).cpu()
    metrics = classification_metrics(logits, test.y, n_classes, prefix="lp_", details=details)
    info = {
        "weight_decay": best,
        "val_acc1": {str(wd): v for wd, v in scores.items()},
        "val": "held out 20% of train items" if held_out else "val split",
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "classes": n_classes,
    }
    return metrics, info


def _hold_out(train: Split, seed: int) -> tuple[Split, Split]:
    items = np.unique(train.items)
    if len(items) < 2:
        raise BadInput(
            "too few training items to hold out a validation part",
            hint="give a val split (--val FEATURES or split: val in the manifest)",
        )
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(VAL_SHARE * len(items))))
    val_items = rng.permutation(items)[:n_val]
    is_val = np.isin(train.items, val_items)
    return _subset(train, ~is_val), _subset(train, is_val)


def _subset(s: Split, mask: np.ndarray) -> Split:
    return Split(s.x[torch.from_numpy(mask)], s.y[mask], s.items[mask])


def _rows(features, table: str, names: list[str]) -> Split:
    """All rows of ``table`` whose item has a label, labels mapped onto ``names``."""
    labels = features.labels()
    mapping = np.array([names.index(n) for n in features.label_names] or [0], dtype=np.int64)
    x, items = features.table(table)
    items = items.numpy()
    own = labels[items]
    keep = own >= 0
    y = np.where(keep, mapping[np.where(keep, own, 0)], -1)
    return Split(x[torch.from_numpy(keep)], y[keep], items[keep])


def probe_table(features, table: str | None) -> str:
    """The table to probe: ``table`` or the only one / ``fused`` / ``image`` / the first."""
    if table:
        features.require(table)
        return table
    tables = features.tables
    for name in ("fused", "image", "video", "audio", "text"):
        if name in tables:
            return name
    return tables[0]


def evaluate_linear_probe(
    features=None,
    table: str | None = None,
    *,
    train=None,
    val=None,
    test=None,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    device: Any = "cpu",
    seed: int = 0,
    details: dict | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Linear-probe metrics from one FeatureSet with manifest splits, or from separate
    ``train`` / ``val`` / ``test`` FeatureSets (see the module docstring)."""
    if train is not None or test is not None:
        if train is None or test is None:
            raise BadInput("--train and --test go together", hint="add the missing one")
        sets = {"train": train, "val": val, "test": test}
        table = probe_table(train, table)
        names: list[str] = []
        for fs in (train, val, test):
            if fs is not None:
                names += [n for n in fs.label_names if n not in names]
        if not names:
            raise BadInput(
                "the features have no labels",
                where=train.paths[0],
                hint='labels come from the manifest\'s "label" field',
            )
        splits = {
            k: (_rows(fs, table, names) if fs is not None else None) for k, fs in sets.items()
        }
    else:
        if features is None:
            raise BadInput("no features given")
        table = probe_table(features, table)
        names = list(features.label_names)
        if not names or not (features.labels() >= 0).any():
            raise BadInput(
                "the features have no labels",
                where=features.paths[0],
                hint='labels come from the manifest\'s "label" field; a linear probe needs them',
            )
        rows = _rows(features, table, names)
        item_split = features.splits()
        split_of = np.array([_split_kind(s) for s in item_split], dtype=object)
        kinds = split_of[rows.items] if len(rows) else np.array([], dtype=object)
        splits = {k: _subset(rows, kinds == k) for k in ("train", "val", "test")}
        missing = [k for k in ("train", "test") if len(splits[k]) == 0]
        if missing:
            raise BadInput(
                f"no labelled {' or '.join(missing)} items (the manifest's split field)",
                where=features.paths[0],
                hint="set split: train/val/test in the manifest, or pass --train/--val/--test FEATURES",
            )
    metrics, info = linear_probe(
        splits["train"],
        splits["val"],
        splits["test"],
        len(names),
        weight_decays=weight_decays,
        device=device,
        seed=seed,
        details=details,
    )
    if details is not None:
        details["classes"] = list(names)
    info["table"] = table
    return metrics, info


def _split_kind(name: str | None) -> str | None:
    if name is None:
        return None
    low = str(name).lower()
    for kind, names in SPLIT_NAMES.items():
        if low in names:
            return kind
    return None
