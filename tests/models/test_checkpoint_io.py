"""Loading checkpoints without trusting their config: wrong-typed fields are one line,
oversized configs are refused on the meta device before anything is allocated, and a
model built on meta then allocated equals one built directly (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hostile import DEEP, edit_json_meta, rewrite, set_meta

from mmcli.errors import BadInput
from mmcli.models import MultimodalModel, build_model
from mmcli.models.config import ModelConfig

HEAD = {"kind": "linear", "in_dim": 16, "out_dim": 12}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small joint model with attention fusion."""
    torch.manual_seed(0)
    model = build_model(
        {"image": "tiny", "text": "tiny"},
        heads={"image": HEAD, "text": HEAD},
        embed_dim=12,
        inputs={"image": {"image_size": 16}, "text": {"tokenizer": "bytes", "context_length": 24}},
    )
    config = model.config.to_dict()
    config["fusion"] = {"kind": "attention", "width": 16, "depth": 2, "heads": 2}
    model = MultimodalModel(ModelConfig.from_dict(config))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    model.to_checkpoint(path)
    return path


def _config(change):
    def f(c):
        change(c)
        return c

    return edit_json_meta("mmcli.model", f)


def _put(key, value):
    return _config(lambda c: c.__setitem__(key, value))


WRONG_TYPES = {
    "fusion a string": (_put("fusion", "x"), "fusion must be an object"),
    "heads a string": (_put("heads", "x"), "heads must be an object"),
    "logit_scale big": (_put("logit_scale", "big"), "logit_scale must be a finite number"),
    "logit_scale inf": (_put("logit_scale", 1e999), "logit_scale must be a finite number"),
    "version x": (_put("version", "x"), "version must be a positive integer"),
    "embed_dim a string": (_put("embed_dim", "12"), "embed_dim must be a positive integer"),
    "embed_dim true": (_put("embed_dim", True), "embed_dim must be a positive integer"),
    "classifier a string": (_put("classifier", "x"), "classifier must be an object"),
    "classifier labels a dict": (
        _put("classifier", {"labels": {"a": 1}}),
        "classifier.labels must be a non-empty list",
    ),
    "inputs a list": (_put("inputs", [1]), "inputs must be an object"),
    "matcher yes": (_put("matcher", "yes"), "matcher must be true or false"),
    "encoder config a list": (
        _config(lambda c: c["encoders"]["image"].__setitem__("config", [1])),
        "encoders.image.config must be an object",
    ),
    "encoder name a number": (
        _config(lambda c: c["encoders"]["image"].__setitem__("name", 7)),
        "encoder 'image' has no name",
    ),
    "head kind unknown": (
        _config(lambda c: c["heads"]["text"].__setitem__("kind", "wormhole")),
        "heads.text.kind must be one of",
    ),
    "head out_dim negative": (
        _config(lambda c: c["heads"]["text"].__setitem__("out_dim", -3)),
        "heads.text.out_dim must be a positive integer",
    ),
    "fusion depth a float": (
        _config(lambda c: c["fusion"].__setitem__("depth", 2.5)),
        "fusion.depth must be a positive integer",
    ),
    "encoder width a string": (
        _config(lambda c: c["encoders"]["text"]["config"].__setitem__("dim", "wide")),
        "bad value 'wide' for dim",
    ),
    "config not JSON": (set_meta("mmcli.model", "{not json"), "corrupt checkpoint metadata"),
    "config a list": (set_meta("mmcli.model", "[1, 2]"), "mmcli.model is not a JSON object"),
    "config nested 100k deep": (set_meta("mmcli.model", DEEP), "nested deeper than 100"),
    "state nested deep": (set_meta("mmcli.state", DEEP), "nested deeper than 100"),
    "image_size 10**6": (
        _config(lambda c: c["inputs"]["image"].__setitem__("image_size", 10**6)),
        "image_size must be an integer from 1 to 4,096",
    ),
    "context_length 10**9": (
        _config(lambda c: c["inputs"]["text"].__setitem__("context_length", 10**9)),
        "context_length must be an integer from 3 to 65,536",
    ),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrong_typed_config_fields_are_one_line(ckpt, tmp_path, case):
    change, message = WRONG_TYPES[case]
    bad = rewrite(ckpt, tmp_path / "bad.safetensors", change)
    with pytest.raises(BadInput, match=message) as e:
        MultimodalModel.from_checkpoint(bad)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(bad))


def test_wrong_typed_fields_through_the_cli(ckpt, tmp_path, cli):
    bad = rewrite(ckpt, tmp_path / "bad.safetensors", _put("logit_scale", "big"))
    feats = tmp_path / "f.safetensors"
    from hostile import feature_file

    feature_file(feats)
    r = cli("retrieve", "--index", feats, "--model", bad, "--text", "a red circle")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1


BOMBS = {
    "text encoder dim 10**9": lambda c: c["encoders"]["text"]["config"].__setitem__("dim", 10**9),
    "embed_dim and head 10**9": lambda c: (
        c.__setitem__("embed_dim", 10**9),
        c["heads"]["text"].__setitem__("out_dim", 10**9),
    ),
    "fusion depth 10**9": lambda c: c["fusion"].__setitem__("depth", 10**9),
    "fusion width 10**9": lambda c: c["fusion"].update(width=10**9, heads=1),
    "fusion max_tokens 10**12": lambda c: c["fusion"].__setitem__("max_tokens", {"image": 10**12}),
    "head hidden 10**10": lambda c: c["heads"]["image"].update(kind="mlp", hidden=10**10),
}


def test_oversized_configs_are_refused_before_allocating(ckpt, tmp_path):
    """Each bomb would allocate from 64 GB to exabytes, or build layers for minutes. Run
    in a child process with 6 GB of address space (torch itself maps about 4 GB); the
    property checked is that each is refused with BadInput and that loading them all
    grows the resident memory by less than 256 MB."""
    paths = {}
    for i, (name, change) in enumerate(BOMBS.items()):
        paths[name] = str(rewrite(ckpt, tmp_path / f"bomb{i}.safetensors", _config(change)))
    script = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
        from mmcli.errors import BadInput
        from mmcli.models import MultimodalModel
        MultimodalModel.from_checkpoint(sys.argv[1])  # warm up: imports, allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {}
        for name, path in json.loads(sys.argv[2]).items():
            try:
                MultimodalModel.from_checkpoint(path)
                out[name] = "loaded"
            except BadInput as e:
                out[name] = "BadInput: " + str(e)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(json.dumps({"results": out, "grown_mb": grown}))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(ckpt), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,  # a guard against a hang, not a timing assertion
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    for name, outcome in report["results"].items():
        assert outcome.startswith("BadInput: "), (name, outcome)
        assert "\n" not in outcome
    assert "far bigger model" in report["results"]["fusion depth 10**9"]
    assert "weights do not match" in report["results"]["text encoder dim 10**9"]
    assert report["grown_mb"] < 256, report


ENCODERS = [
    {"image": "tiny", "text": "tiny", "audio": "tiny"},
    {"image": "convnet:width=4,depth=2,dim=8", "text": "bow:dim=8"},
    {
        "text": "transformer:width=16,depth=1,heads=2,context_length=24",
        "audio": "melcnn:width=4,depth=1,dim=8",
    },
    {"image": "features:dim=8", "text": "features:dim=8"},
]


@pytest.mark.parametrize("spec", ENCODERS, ids=lambda s: "+".join(s.values()))
def test_meta_built_then_allocated_equals_the_saved_model(spec, tmp_path):
    """Parameters, buffers and the constants a model computes itself (normalisation,
    mel filterbank and window) are the same after the meta-device load."""
    torch.manual_seed(0)
    model = build_model(spec)
    path = tmp_path / "m.safetensors"
    model.to_checkpoint(path)
    again = MultimodalModel.from_checkpoint(path)
    for kind in ("named_parameters", "named_buffers"):
        want, got = dict(getattr(model, kind)()), dict(getattr(again, kind)())
        assert want.keys() == got.keys()
        for name, value in want.items():
            assert got[name].device.type == "cpu" and torch.equal(value, got[name]), name
            assert value.requires_grad == got[name].requires_grad


def test_computed_buffers_of_a_registered_fusion_are_right(tmp_path):
    """A fusion kind registered from outside, holding a computed (non-persistent) buffer:
    built on meta for the checks, then for real, so the buffer has its values."""
    from mmcli.models.registry import _FUSION, register_fusion

    class Scaled(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lin = torch.nn.Linear(dim, dim)
            self.register_buffer("scale", torch.arange(dim, dtype=torch.float32), persistent=False)

    @register_fusion("scaled_test")
    def build(cfg, model):
        return Scaled(cfg["dim"])

    try:
        config = build_model({"image": "tiny"}).config.to_dict()
        config["fusion"] = {"kind": "scaled_test", "dim": 4}
        model = MultimodalModel(ModelConfig.from_dict(config))
        model.to_checkpoint(tmp_path / "f.safetensors")
        again = MultimodalModel.from_checkpoint(tmp_path / "f.safetensors")
        assert torch.equal(again.fusion.scale, torch.arange(4, dtype=torch.float32))
        assert torch.equal(again.fusion.lin.weight, model.fusion.lin.weight)
    finally:
        del _FUSION["scaled_test"]


def test_loading_draws_the_random_numbers_building_draws(ckpt):
    """Seeded runs that load a checkpoint and then initialise another model (distill's
    teacher, then its student) keep their numbers: loading advances the global RNG as
    building the model does, the meta-device checks draw nothing."""
    config = ModelConfig.from_dict(MultimodalModel.from_checkpoint(ckpt).config.to_dict())
    torch.manual_seed(3)
    MultimodalModel(config)
    after_build = torch.rand(4)
    torch.manual_seed(3)
    MultimodalModel.from_checkpoint(ckpt)
    assert torch.equal(torch.rand(4), after_build)
