"""Encoder lookup by name, qualified names and option parsing."""

from __future__ import annotations

import pytest

from mmcli import models
from mmcli.errors import BadInput
from mmcli.models.registry import parse_encoder_spec


def test_create_by_plain_and_qualified_name():
    assert models.create("convnet").name == "convnet"
    assert models.create("image/tiny").modality == "image"
    assert models.create("tiny", modality="audio").modality == "audio"
    assert models.create("convnet", width=8, dim=32).out_dim == 32


def test_ambiguous_name_says_which_ones():
    with pytest.raises(BadInput) as e:
        models.create("tiny")
    assert "ambiguous" in str(e.value) and "image/tiny, text/tiny, audio/tiny" in str(e.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(BadInput) as e:
        models.create("resnet1000")
    msg = str(e.value)
    assert "unknown encoder 'resnet1000'" in msg
    assert all(n in msg for n in models.list())
    with pytest.raises(BadInput, match="unknown text encoder 'convnet'.*text/transformer"):
        models.create("convnet", modality="text")
    with pytest.raises(BadInput, match="is a image encoder, not text"):
        models.create("image/convnet", modality="text")


def test_parse_encoder_spec_coerces_types():
    name, opts = parse_encoder_spec("convnet:width=16, depth=3,dropout=0.1")
    assert name == "convnet" and opts == {"width": 16, "depth": 3, "dropout": 0.1}
    assert isinstance(opts["width"], int) and isinstance(opts["dropout"], float)
    name, opts = parse_encoder_spec("transformer:pool=mean,mlp_ratio=2", modality="text")
    assert opts == {"pool": "mean", "mlp_ratio": 2.0}
    assert parse_encoder_spec("image/tiny") == ("image/tiny", {})
    assert parse_encoder_spec("tiny:dim=4", modality="text") == ("tiny", {"dim": 4})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "convnet:widht=16",
            "unknown option 'widht' for encoder image/convnet; valid: width, depth, dim, dropout",
        ),
        ("convnet:width=wide", "bad value 'wide' for width of encoder image/convnet; expected int"),
        ("convnet:width=1.5", "bad value '1.5' for width"),
        (
            "transformer:pool=max",
            "bad value 'max' for pool of encoder text/transformer; choose one of eos, mean",
        ),
        ("convnet:width", "is not key=value"),
        (":width=3", "empty encoder name"),
    ],
)
def test_parse_encoder_spec_rejects_bad_options(spec, message):
    with pytest.raises(BadInput) as e:
        parse_encoder_spec(spec)
    assert message in str(e.value)


def test_bad_config_values_are_bad_input():
    with pytest.raises(BadInput, match="divisible by heads"):
        models.create("transformer", width=30, heads=4)


def test_register_a_new_encoder():
    from dataclasses import dataclass

    import torch

    from mmcli.models.base import TextEncoder
    from mmcli.models.registry import _REGISTRY

    @models.register("text", "ones")
    @dataclass
    class OnesConfig:
        dim: int = 3

        def build(self):
            enc = TextEncoder(self)
            enc.out_dim = enc.token_dim = self.dim
            enc.forward_tokens = lambda x: (torch.ones(len(x), self.dim), None, None)
            return enc

    try:
        assert "text/ones" in models.list()
        assert models.create("ones", dim=5)(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 5)
    finally:
        del _REGISTRY[("text", "ones")]
