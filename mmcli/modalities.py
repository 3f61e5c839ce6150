"""The modalities mmcli knows, in one place: their order, the order of pairs, and the
default encoder of each modality for each use.

    from mmcli.modalities import MODALITIES, ordered, pairs_among
    pairs_among(["text", "image"])   # [("image", "text")]

No torch here: the CLI reads these at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable

#: every modality, in the order tables, pairs and listings show them
MODALITIES: tuple[str, ...] = ("image", "text", "audio", "video")

#: the pairs of modalities in their canonical order (query side first)
PAIR_ORDER: tuple[tuple[str, str], ...] = (
    ("image", "text"),
    ("audio", "text"),
    ("image", "audio"),
    ("video", "text"),
    ("video", "audio"),
)

#: ``extract`` without ``--encoder``: pretrained-capable backbones
EXTRACT_ENCODERS: dict[str, str] = {
    "image": "resnet18",
    "text": "transformer",
    "audio": "melcnn",
    "video": "frames:resnet18",
}

#: the built-in encoders of each modality, in registration order: the CLI's help lists
#: them without importing the registry (that needs torch). The registry
#: (:mod:`mmcli.models.registry`) is the truth; tests/test_extract_cli.py checks that
#: this copy equals it.
BUILTIN_ENCODERS: dict[str, tuple[str, ...]] = {
    "image": ("tiny", "convnet", "resnet18", "resnet50", "vit_b_16"),
    "text": ("tiny", "bow", "transformer"),
    "audio": ("tiny", "melcnn"),
    "video": ("frames",),
}

#: ``fuse-train`` / ``distill`` end to end without ``--encoder``: small encoders that learn
#: from scratch on a CPU in minutes (benchmarks/bench_defaults.py measures them against the
#: registry's full-size ``convnet`` and ``transformer``). The image encoder's stem stride
#: follows the image size: :func:`train_encoder`.
TRAIN_ENCODERS: dict[str, str] = {
    "image": "convnet:width=16,grid=4",
    "text": "transformer:width=128,depth=2",
    "audio": "melcnn",
}
#: a video's frames through the image default, then attention over them (order matters)
TRAIN_ENCODERS["video"] = f"frames:{TRAIN_ENCODERS['image']}:pool=attention"

#: the side of the default image encoder's stem output: its stride is image size / this
STEM_SIDE = 32


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


def train_encoder(modality: str, row_shape: Iterable[int] | None = None) -> str:
    """The default end-to-end encoder spec of ``modality`` (``tiny`` for one mmcli has none
    for). For images of ``row_shape`` ``(3, H, W)`` the convnet's stem stride brings the
    shorter side to about :data:`STEM_SIDE` pixels (64 px: stride 2, 224 px: stride 7), so
    the cost per image hardly depends on the image size; video frames ``(T, 3, H, W)``
    follow the same rule."""
    spec = TRAIN_ENCODERS.get(modality, "tiny")
    shape = tuple(row_shape or ())
    if modality == "image" and len(shape) == 3:
        stride = max(1, round(min(shape[1:]) / STEM_SIDE))
        spec = f"{spec},stem_stride={stride}"
    if modality == "video" and len(shape) == 4:  # frames [T, 3, H, W]: the image rule per frame
        pool = spec.rpartition(":")[2]
        spec = f"frames:{train_encoder('image', shape[1:])}:{pool}"
    return spec


def encoder_name(spec: str) -> str:
    """The registry name of an encoder spec: ``convnet:width=16`` -> ``convnet``."""
    return spec.split(":", 1)[0]
