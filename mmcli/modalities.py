"""The modalities mmcli knows, in one place: their order, the order of pairs, and the
default encoder of each modality for each use.

    from mmcli.modalities import MODALITIES, ordered, pairs_among
    pairs_among(["text", "image"])   # [("image", "text")]

No torch here: the CLI reads these at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable

#: every modality, in the order tables, pairs and listings show them
MODALITIES: tuple[str, ...] = ("image", "text", "audio")

#: the pairs of modalities in their canonical order (query side first)
PAIR_ORDER: tuple[tuple[str, str], ...] = (("image", "text"), ("audio", "text"), ("image", "audio"))

#: ``extract`` without ``--encoder``: pretrained-capable backbones
EXTRACT_ENCODERS: dict[str, str] = {"image": "resnet18", "text": "transformer", "audio": "melcnn"}

#: the built-in encoders of each modality, in registration order: the CLI's help lists
#: them without importing the registry (that needs torch). The registry
#: (:mod:`mmcli.models.registry`) is the truth; tests/test_extract_cli.py checks that
#: this copy equals it.
BUILTIN_ENCODERS: dict[str, tuple[str, ...]] = {
    "image": ("tiny", "convnet", "resnet18", "resnet50", "vit_b_16"),
    "text": ("tiny", "bow", "transformer"),
    "audio": ("tiny", "melcnn"),
}

#: ``fuse-train`` / ``distill`` end to end without ``--encoder``: small encoders that learn
#: from scratch on a CPU
TRAIN_ENCODERS: dict[str, str] = {"image": "convnet", "text": "transformer", "audio": "melcnn"}


def order_key(modality: str) -> int:
    """Sort key: known modalities in :data:`MODALITIES` order, then the others."""
    return MODALITIES.index(modality) if modality in MODALITIES else len(MODALITIES)


def in_order(modalities: Iterable[str]) -> list[str]:
    """``modalities`` sorted as :data:`MODALITIES` (unknown names last, in their order)."""
    return sorted(modalities, key=order_key)


def ordered(a: str, b: str) -> tuple[str, str]:
    """The pair (a, b) in canonical order."""
    return (b, a) if (b, a) in PAIR_ORDER else (a, b)


def pairs_among(present: Iterable[str]) -> list[tuple[str, str]]:
    """Every canonical pair whose two modalities are both ``present``."""
    have = set(present)
    return [p for p in PAIR_ORDER if p[0] in have and p[1] in have]


def train_encoder(modality: str) -> str:
    """The default end-to-end encoder of ``modality`` (``tiny`` for one mmcli has none for)."""
    return TRAIN_ENCODERS.get(modality, "tiny")
