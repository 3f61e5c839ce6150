"""fuse-train's configuration: objectives, fusion, heads, encoders, splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmcli.errors import BadInput
from mmcli.models.decoder import parse_decoder_spec
from mmcli.models.registry import fusion_kinds
from mmcli.models.tokenizers import check_tokenizer_spec
from mmcli.train.splits import SplitSpec
from mmcli.train.task import parse_weights

OBJECTIVES = ("contrastive", "sigmoid", "classify", "match", "caption")
#: the objectives that learn from pairs of modalities
PAIR_OBJECTIVES = ("contrastive", "sigmoid")


@dataclass
class FuseConfig:
    pairs: list[tuple[str, str]] | None = None  # None: every pair the data has
    objectives: dict[str, float] = field(default_factory=lambda: {"contrastive": 1.0})
    fusion: str = "none"
    fusion_width: int = 128
    fusion_depth: int = 2
    fusion_heads: int = 4
    embed_dim: int = 256
    head: str = "linear"  # linear | mlp (projection heads)
    encoders: dict[str, str] = field(default_factory=dict)  # end to end: modality -> spec
    weights: dict[str, str] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # modalities whose encoder stays fixed
    init: str | None = None  # start from this model: a checkpoint, open_clip:ARCH, hf:DIR
    init_weights: str | None = None  # the weights file of --init open_clip:ARCH
    cache_frozen: bool = True  # a frozen tower's outputs computed once (False: every step)
    temperature: float = 0.07  # initial; learned, clamped at 1/100
    captions_per_item: int = 1
    hard_negatives: str | None = None  # manifest field with hard-negative captions (NegCLIP)
    batch_with: str | None = None  # manifest field naming an item to share the batch with
    train_split: str = "train"
    val_split: str | None = None  # None: "val" when the data has it; a named split must exist
    eval_batch_size: int = 256
    # the caption objective (train/fuse/caption.py)
    caption_decoder: str = "attention"  # attention | pooled | prefix [:width=256,depth=2,...]
    caption_from: str | None = None  # the modality captioned (default: image, else audio)
    label_smoothing: float = 0.1
    #: bytes | open_clip:ARCH | hf:DIR (None: the pretrained text tower's, else bytes)
    caption_tokenizer: str | None = None
    #: random resized crops and flips of encoded training images (mmcli.data.encoded)
    augment: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown:
            raise BadInput(
                f"unknown objective {unknown[0]!r}", hint=f"known: {', '.join(OBJECTIVES)}"
            )
        if not any(w > 0 for w in self.objectives.values()):
            raise BadInput("every objective has weight 0", hint="give one a positive weight")
        if "contrastive" in self.objectives and "sigmoid" in self.objectives:
            raise BadInput("choose contrastive or sigmoid, not both")
        if self.fusion not in fusion_kinds():
            raise BadInput(
                f"unknown fusion {self.fusion!r}", hint=f"use {', '.join(fusion_kinds())}"
            )
        if "match" in self.objectives and self.fusion == "none":
            raise BadInput(
                "the match objective needs a fusion module", hint="use --fusion attention or concat"
            )
        if self.augment and "image" in self.freeze and self.cache_frozen:
            raise BadInput(
                "--augment with --freeze image: the frozen image tower's outputs are computed "
                "once, so no augmented image would reach training",
                hint="drop --augment, or train the image tower",
            )
        if not 0 < self.temperature < 1:
            raise BadInput("--temperature must be in (0, 1)")
        if self.head not in ("linear", "mlp"):
            raise BadInput(f"unknown head {self.head!r}", hint="use linear or mlp")
        if "caption" in self.objectives:
            parse_decoder_spec(self.caption_decoder)
            if not 0 <= self.label_smoothing < 1:
                raise BadInput("--label-smoothing must be in [0, 1)")
            check_tokenizer_spec(self.caption_tokenizer)

    @property
    def contrastive(self) -> bool:
        return any(k in self.objectives for k in PAIR_OBJECTIVES)

    def split_spec(self) -> SplitSpec:
        return SplitSpec(
            pairs=self.pairs,
            needs_pairs=self.contrastive,
            needs_labels="classify" in self.objectives,
            train_split=self.train_split,
            val_split=self.val_split,
            hard_negatives=self.hard_negatives,
        )


def parse_objectives(text: str) -> dict[str, float]:
    """``contrastive`` or ``contrastive=1,classify=0.5`` -> {name: weight}."""
    return (
        parse_weights(text, known=None, what="objective", example="contrastive=1,classify=0.5")
        or {}
    )
