import pytest
import torch

from mmcli.errors import BadInput
from mmcli.formats.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)


def test_round_trip_with_shared_tensors(tmp_path):
    w = torch.randn(4, 3)
    sd = {"a.weight": w, "b.weight": w, "c": torch.arange(5)}  # tied weights
    save_checkpoint(
        tmp_path / "m.safetensors", Checkpoint(config={"x": 1}, state_dict=sd, state={"step": 3})
    )
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert ck.config == {"x": 1} and ck.state == {"step": 3}
    assert torch.equal(ck.state_dict["a.weight"], w) and torch.equal(ck.state_dict["b.weight"], w)
    assert read_checkpoint_meta(tmp_path / "m.safetensors").config == {"x": 1}


def test_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(BadInput, match="not an mmcli model checkpoint"):
        load_checkpoint(tmp_path / "w.safetensors")
    with pytest.raises(BadInput, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(BadInput, match="got a folder.*RUN/model.safetensors"):
        load_checkpoint(tmp_path)  # e.g. --model RUN instead of RUN/model.safetensors
