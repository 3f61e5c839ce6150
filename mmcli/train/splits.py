"""What every recipe trains and validates on: the data, its splits and the pairs.

    data = load_splits(["out/tensors"], None, SplitSpec(pairs=None, needs_pairs=True))
    data.train, data.val        # item indices (val None: no validation)
    data.pairs                  # [("image", "text")]: the pairs trained
    data.eval_pairs             # the pairs validated (distill adds cross-modal ones)

Recipes build their own :class:`SplitSpec` from their config: nothing here knows about
objectives or losses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mmcli.errors import BadInput
from mmcli.modalities import pairs_among
from mmcli.train.data import Dataset, load_dataset

log = logging.getLogger("mmcli")


@dataclass
class SplitSpec:
    """How to cut the data: which pairs, which splits, and what the recipe needs of it."""

    pairs: list[tuple[str, str]] | None = None  # None: every pair the data has
    needs_pairs: bool = True  # a pair loss (contrastive, sigmoid, similarity) is trained
    needs_labels: bool = False  # a classification objective is trained
    train_split: str = "train"
    val_split: str | None = None  # None: "val" when the data has it; "none": no validation
    hard_negatives: str | None = None  # manifest field with hard-negative captions


@dataclass
class Data:
    dataset: Dataset
    train: np.ndarray
    val_dataset: Dataset | None
    val: np.ndarray | None
    pairs: list[tuple[str, str]]
    modalities: list[str]
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)  # default: ``pairs``

    def __post_init__(self) -> None:
        if not self.eval_pairs:
            self.eval_pairs = list(self.pairs)

    @property
    def validates(self) -> bool:
        return self.val_dataset is not None and self.val is not None


def parse_pairs(text: str | None) -> list[tuple[str, str]] | None:
    """``image-text,audio-text`` -> [("image", "text"), ("audio", "text")] (None: all)."""
    if not text:
        return None
    pairs = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        if not sep or not a or not b or a == b:
            raise BadInput(f"bad pair {part!r}", hint="write pairs as image-text,audio-text")
        pairs.append((a, b))
    return pairs


def split_names(ds: Dataset) -> str:
    return ", ".join(sorted({s for s in ds.splits if s is not None})) or "none"


def has_splits(ds: Dataset) -> bool:
    return any(s is not None for s in ds.splits)


def select_pairs(present: list[str], spec: SplitSpec) -> list[tuple[str, str]]:
    """The pairs to train: those asked for (each modality must be in the data), else every
    canonical pair of the modalities present."""
    if spec.pairs is None:
        pairs = pairs_among(present)
        if not pairs and spec.needs_pairs:
            raise BadInput(
                f"the data has only {', '.join(present)}: contrastive training needs two modalities",
                hint="pass data with image and text (or audio), or use --objective classify",
            )
        return pairs
    for a, b in spec.pairs:
        for m in (a, b):
            if m not in present:
                raise BadInput(
                    f"--pairs asks for {a}-{b} but the data has no {m}",
                    hint=f"the data has: {', '.join(present)}",
                )
    return list(spec.pairs)


def _train_items(ds: Dataset, spec: SplitSpec) -> np.ndarray:
    if not has_splits(ds):
        train = ds.subset(None)
        log.info("the items have no split: training on all %d of them", len(train))
        return train
    train = ds.subset(spec.train_split)
    if len(train) == 0:
        raise BadInput(
            f"the {spec.train_split!r} split is empty",
            hint=f"the data's splits: {split_names(ds)}; check --train-split",
        )
    return train


def _val_items(
    ds: Dataset, val_sources: list[str] | None, modalities: list[str], spec: SplitSpec
) -> tuple[Dataset | None, np.ndarray | None]:
    if val_sources:
        val_ds = load_dataset(val_sources, modalities=modalities)
        return val_ds, val_ds.subset(None)
    if spec.val_split == "none":
        log.info("--val-split none: no validation, the last model is kept")
        return None, None
    if not has_splits(ds):
        log.warning("no validation data (no splits, no --val): the last model is kept")
        return None, None
    val = ds.subset(spec.val_split or "val")
    if len(val):
        return ds, val
    if spec.val_split is not None:
        raise BadInput(
            f"the {spec.val_split!r} split is empty",
            hint=f"the data's splits: {split_names(ds)}; check --val-split",
        )
    log.warning("the data has no 'val' split: no validation, the last model is kept")
    return None, None


def load_splits(
    sources: list[str],
    val_sources: list[str] | None,
    spec: SplitSpec,
    *,
    dataset: Dataset | None = None,
) -> Data:
    """Join ``sources`` (or take ``dataset``, already loaded from them), pick the pairs and
    the train / validation items."""
    ds = dataset if dataset is not None else load_dataset(sources)
    present = ds.modalities
    pairs = select_pairs(present, spec)
    modalities = [m for m in present if any(m in p for p in pairs)] or present
    train = _train_items(ds, spec)
    val_ds, val = _val_items(ds, val_sources, modalities, spec)
    if spec.hard_negatives:
        n = ds.attach_hard_negatives(spec.hard_negatives)
        log.info("hard negatives: %d items have %r captions", n, spec.hard_negatives)
    if spec.needs_labels and not (ds.labels[train] >= 0).any():
        raise BadInput("--objective classify needs labels, and the training items have none")
    return Data(ds, train, val_ds, val, pairs, modalities)
