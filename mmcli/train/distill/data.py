"""distill's data: the splits and pairs that teacher and data share, the final report's items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcli.errors import BadInput
from mmcli.modalities import PAIR_ORDER, ordered, pairs_among
from mmcli.models.multimodal import MultimodalModel
from mmcli.train.data import Dataset, load_dataset
from mmcli.train.distill.config import PAIR_LOSSES, DistillConfig, parse_student
from mmcli.train.splits import Data, SplitSpec, has_splits, load_splits


@dataclass
class DistillData(Data):
    """The shared :class:`~mmcli.train.splits.Data` plus the final report's items. Its
    ``eval_pairs`` are the trained pairs, and for cross-modal runs every pair of the new
    modality with the teacher's others."""

    test_dataset: Dataset | None = None
    test: np.ndarray | None = None
    test_split: str | None = None


def _cross_pairs(cfg: DistillConfig, has: list[str], present: list[str]):
    """(trained, evaluated) pairs of a cross-modal run: FROM-TO, then TO against each of the
    teacher's other modalities, then the teacher's own pairs among those."""
    a, b = cfg.from_modality, cfg.to_modality
    if a not in has:
        raise BadInput(
            f"--from {a}: the teacher has no {a} encoder", hint=f"it has: {', '.join(has)}"
        )
    for flag, m in (("--from", a), ("--to", b)):
        if m not in present:
            raise BadInput(
                f"{flag} {m}: the data has no {m}", hint=f"the data has: {', '.join(present)}"
            )
    others = [m for m in has if m not in (a, b) and m in present]
    eval_pairs = [ordered(a, b)] + [ordered(b, m) for m in others]
    eval_pairs += [p for p in PAIR_ORDER if p[0] in others and p[1] in others]
    return [(a, b)], eval_pairs


def _same_pairs(cfg: DistillConfig, has: list[str], present: list[str]):
    """(trained, evaluated) pairs of a same-modality run: those asked for (the teacher must
    have both), else every pair that teacher and data share."""
    for m in parse_student(cfg.student).encoders:
        if m not in has:
            raise BadInput(
                f"--student {m}=...: the teacher has no {m} encoder to distil from",
                hint=f"it has: {', '.join(has)}; to teach a new modality use --from M --to {m}",
            )
    if cfg.pairs is not None:
        for p in cfg.pairs:
            for m in p:
                if m not in has:
                    raise BadInput(f"--pairs {p[0]}-{p[1]}: the teacher has no {m} encoder")
        pairs = cfg.pairs
    else:
        pairs = [p for p in pairs_among(has) if p[0] in present and p[1] in present]
    need_pair = sorted(set(cfg.losses) & set(PAIR_LOSSES))
    if need_pair and not pairs:
        raise BadInput(
            f"the {need_pair[0]} loss needs two modalities that teacher and data share",
            hint=f"teacher: {', '.join(has)}; data: {', '.join(present)}",
        )
    return pairs, list(pairs)


def _test_items(base: Data, cfg: DistillConfig, val_sources: list[str] | None):
    """The final report's (dataset, items, split name): the test split, else the validation
    data."""
    ds = base.dataset
    test_ds, test = base.val_dataset, base.val
    test_split = "--val" if val_sources else (cfg.val_split or "val")
    if has_splits(ds):
        items = ds.subset(cfg.test_split or "test")
        if len(items):
            test_ds, test, test_split = ds, items, cfg.test_split or "test"
        elif cfg.test_split is not None:
            raise BadInput(f"the {cfg.test_split!r} split is empty", hint="check --test-split")
    elif cfg.test_split is not None:
        raise BadInput(f"--test-split {cfg.test_split}: the items have no splits")
    return test_ds, test, test_split if test is not None else None


def setup_data(
    sources: list[str], val_sources: list[str] | None, cfg: DistillConfig, teacher: MultimodalModel
) -> DistillData:
    """The items and pairs to distil on, checked against what the teacher encodes."""
    has = teacher.modalities
    parse_student(cfg.student)  # a bad --student is refused before the data is read
    loaded = load_dataset(sources)
    present = loaded.modalities
    for ts in loaded.sources:  # raw rows for an end-to-end teacher, features for the other
        for m in ts.tables:
            if m in has:
                teacher.check_input(ts, m)
    pairs, eval_pairs = (_cross_pairs if cfg.cross else _same_pairs)(cfg, has, present)
    spec = SplitSpec(
        pairs=pairs or None,
        needs_pairs=not cfg.classifies,
        needs_labels=cfg.classifies,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
    )
    base = load_splits(sources, val_sources, spec, dataset=loaded)
    modalities = base.modalities
    if not pairs:  # one modality (kd / feature / relational only): those the teacher has
        modalities = [m for m in modalities if m in has]
        if not modalities:
            raise BadInput(
                f"the teacher encodes {', '.join(has)} and the data has {', '.join(present)}: "
                "nothing in common"
            )
    ds, train = base.dataset, base.train
    if cfg.cross:  # only items with both modalities teach anything
        both = ds.has(cfg.from_modality, train) & ds.has(cfg.to_modality, train)
        train = train[both]
        if len(train) == 0:
            raise BadInput(f"no training item has both {cfg.from_modality} and {cfg.to_modality}")
        modalities = [cfg.from_modality, cfg.to_modality]
    test_ds, test, test_split = _test_items(base, cfg, val_sources)
    return DistillData(
        dataset=ds,
        train=train,
        val_dataset=base.val_dataset,
        val=base.val,
        pairs=pairs,
        modalities=modalities,
        eval_pairs=eval_pairs,
        test_dataset=test_ds,
        test=test,
        test_split=test_split,
    )
