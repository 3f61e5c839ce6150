"""``preprocess --like SPEC``: a pretrained model's image transform settings, by spec.

    like("open_clip:ViT-B-32")     # {"image_size": 224, "resize_mode": "shortest", ...}
    like("hf:path/to/clip"); like("timm:resnet50")

Outside ``mmcli.models`` so that a plain ``open_clip:ARCH`` is answered without importing
it (and torch).
"""

from __future__ import annotations

from typing import Any

from mmcli.data.model_transforms import open_clip_files_like
from mmcli.errors import BadInput


def like(spec: str) -> dict[str, Any]:
    """The image settings of ``open_clip:ARCH[,pretrained=TAG]``, ``hf:DIR`` or ``timm:NAME``.

    A built-in open_clip architecture without a pretrained tag is read from open_clip's
    files (:func:`open_clip_files_like`): a plain ``open_clip:ARCH`` without importing
    ``mmcli.models`` either (which imports torch: a second of preprocess's start-up, and a
    decode pool that is then a forkserver instead of a fork). Anything else asks the model's
    adapter, whose library is imported for it."""
    lib, _, arch = spec.strip().partition(":")
    if lib == "open_clip" and arch.strip() and "," not in arch:
        settings = open_clip_files_like(arch.strip())
        if settings is not None:
            return settings
    from mmcli.models.pretrained import split_spec
    from mmcli.models.registry import parse_encoder_spec

    lib, rest = split_spec(spec)
    if lib is None or not rest:
        raise BadInput(
            f"--like {spec}: expected open_clip:ARCH, hf:DIR or timm:NAME",
            hint="e.g. --like open_clip:ViT-B-32",
        )
    _, options = parse_encoder_spec(f"{lib}:{rest}", modality="image")
    if lib == "open_clip":
        if not options.get("pretrained") and options.get("arch"):
            settings = open_clip_files_like(options["arch"])  # without importing open_clip
            if settings is not None:
                return settings
        from mmcli.models.adapters.open_clip import open_clip_transform

        return open_clip_transform(options["arch"], options.get("pretrained"))
    if lib == "hf":
        from mmcli.models.adapters.hf import hf_transform

        return hf_transform(options["path"])
    from mmcli.models.adapters.timm import timm_transform

    return timm_transform(options["arch"])
