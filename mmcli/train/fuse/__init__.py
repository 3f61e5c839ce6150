"""``fuse-train``: learn a joint embedding space and cross-modal fusion.

    from mmcli.train.fuse import FuseConfig, fuse_train
    summary = fuse_train(["out/tensors"], "runs/toy", FuseConfig(), LoopConfig(epochs=10))

The recipe in small steps: :func:`setup_data` (join the inputs, pick the splits and
pairs), :func:`setup_model` (encoders from the registry or the frozen feature backbones,
projection heads, fusion, classifier / matcher heads), :class:`FuseTask` (the loss of one
batch; validation comes from :class:`mmcli.train.task.JointTask`) and the shared loop.
"""

from mmcli.train.fuse.config import OBJECTIVES, FuseConfig, parse_objectives
from mmcli.train.fuse.model import setup_data, setup_model
from mmcli.train.fuse.recipe import FuseRecipe, fuse_train
from mmcli.train.fuse.task import FuseTask
from mmcli.train.splits import parse_pairs

__all__ = [
    "OBJECTIVES",
    "FuseConfig",
    "FuseRecipe",
    "FuseTask",
    "fuse_train",
    "parse_objectives",
    "parse_pairs",
    "setup_data",
    "setup_model",
]
