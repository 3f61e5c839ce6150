"""Encoders by name, projection heads and the multimodal model.

    from mmcli import models
    models.list()                                  # ["image/tiny", "image/convnet", ...]
    enc = models.create("resnet18")                # random init; see load_weights
    z = enc(images_uint8)                          # [B, 512]
    model = models.build_model({"image": "convnet", "text": "transformer"})
    model.encode("text", ids, normalize=True)      # [B, 256]

Importing this package registers every built-in encoder (torchvision itself is only
imported when a torchvision architecture is built; open_clip, transformers and timm when
one of their encoders is: :mod:`mmcli.models.adapters`). ``load_model(spec)`` resolves
a ``--model`` argument: an mmcli checkpoint or ``open_clip:ARCH`` / ``hf:DIR``.
"""

from mmcli.modalities import MODALITIES
from mmcli.models import audio, fusion, image, passthrough, text, video  # noqa: F401  (register encoders, fusion)
from mmcli.models.base import Encoder
from mmcli.models.multimodal import ModelConfig, MultimodalModel, build_model
from mmcli.models.pretrained import load_model
from mmcli.models.registry import (
    create,
    fusion_kinds,
    list_encoders,
    make_config,
    parse_encoder_spec,
    register,
    register_fusion,
    resolve,
)
from mmcli.models.weights import load_weights

list = list_encoders  # noqa: A001 - models.list() mirrors timm/open_clip; shadows only here

# registered after the built-in encoders (list order); their libraries load lazily
from mmcli.models import adapters  # noqa: E402, F401

__all__ = [
    "MODALITIES",
    "Encoder",
    "ModelConfig",
    "MultimodalModel",
    "build_model",
    "create",
    "fusion_kinds",
    "list",
    "list_encoders",
    "load_model",
    "load_weights",
    "make_config",
    "parse_encoder_spec",
    "register",
    "register_fusion",
    "resolve",
]
