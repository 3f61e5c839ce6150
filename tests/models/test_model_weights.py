"""Loading encoder weights: torchvision files, wrappers, prefixes, imagenet, mismatches."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from mmcli import models
from mmcli.errors import BadInput
from mmcli.models.weights import load_weights, weights_per_modality

X = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)


def _tv_resnet18(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def _reference_features(net, x):
    """torchvision's own forward up to the pooled features."""
    net.fc = torch.nn.Identity()
    enc = models.create("resnet18")
    x = enc.prepare(x)
    with torch.no_grad():
        return net(x)


@pytest.fixture
def mmcli_log():
    """Messages logged on the "mmcli" logger (which does not propagate once the CLI ran)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("mmcli")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield messages
    log.removeHandler(handler)
    log.setLevel(level)


def test_torchvision_pth_loads_and_drops_the_head(tmp_path, mmcli_log):
    net = _tv_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    enc = models.create("resnet18").eval()
    info = load_weights(enc, path)
    assert any("dropped the classifier head (fc.weight, fc.bias)" in m for m in mmcli_log)
    assert info["path"] == str(path) and len(info["sha256"]) == 64
    with torch.no_grad():
        torch.testing.assert_close(enc(X), _reference_features(net, X))


@pytest.mark.parametrize("wrap", ["module", "state_dict", "model+module"])
def test_wrappers_and_prefixes_are_undone(tmp_path, wrap):
    src = models.create("convnet", width=8).eval()
    state = src.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "state_dict":
        obj = {"state_dict": state, "epoch": 3}
    else:
        obj = {"model": {f"module.{k}": v for k, v in state.items()}, "step": 10}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    dst = models.create("convnet", width=8).eval()
    load_weights(dst, path)
    with torch.no_grad():
        assert torch.equal(src(X), dst(X))


def test_vit_keeps_torchvision_names(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.vit_b_16(weights=None, image_size=32)  # small: fast on a CPU
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    enc = models.create("vit_b_16", image_size=32).eval()
    load_weights(enc, path)  # heads.* dropped, everything else matches by name
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    net.heads = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), net.eval()(enc.prepare(x)), rtol=1e-4, atol=1e-4)


def test_mismatched_weights_list_what_did_not_match(tmp_path):
    path = tmp_path / "convnet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in models.create("convnet").state_dict().items()}, str(path)
    )
    with pytest.raises(BadInput) as e:
        load_weights(models.create("resnet18"), path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: weights do not match image/resnet18: missing 1")
    assert (
        "unexpected" in msg
        and "... " in msg
        and "pass weights saved from the same architecture" in msg
    )

    with pytest.raises(
        BadInput, match=r"wrong shape 2 \(file vs model: fc.weight \[256, 256\] vs \[64, 256\]"
    ):
        load_weights(models.create("convnet", dim=64), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(BadInput, match="not a readable weights file"):
        load_weights(models.create("convnet"), path)


@pytest.mark.parametrize("content", [b"", b"hello, not weights", b"\x00" * 64])
def test_garbage_files_are_bad_input(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(BadInput):
        load_weights(models.create("convnet"), path)
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(BadInput):
        load_weights(models.create("convnet"), path)


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match="weights file not found"):
        load_weights(models.create("convnet"), tmp_path / "nope.pth")


def test_imagenet_offline_says_how_to_supply_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("MMCLI_OFFLINE", "1")
    with pytest.raises(BadInput) as e:
        load_weights(models.create("resnet18"), "imagenet")
    msg = str(e.value)
    assert "imagenet weights for image/resnet18 are not cached" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "--weights PATH/resnet18-f37072fd.pth" in msg


def test_imagenet_download_failure_is_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("MMCLI_OFFLINE", raising=False)

    def offline(*a, **k):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        BadInput,
        match="cannot download imagenet weights for image/resnet18 .*name resolution.*--weights PATH",
    ):
        load_weights(models.create("resnet18"), "imagenet")


def test_imagenet_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("MMCLI_OFFLINE", "1")
    net = _tv_resnet18(seed=3)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    enc = models.create("resnet18").eval()
    info = load_weights(enc, "imagenet")
    assert info["name"] == "ResNet18_Weights.IMAGENET1K_V1" and len(info["sha256"]) == 64
    with torch.no_grad():
        torch.testing.assert_close(enc(X), _reference_features(net, X))


def test_no_imagenet_weights_for_our_own_encoders():
    with pytest.raises(
        BadInput,
        match="image/convnet has no imagenet weights.*image/resnet18, image/resnet50, image/vit_b_16",
    ):
        load_weights(models.create("convnet"), "imagenet")


def test_a_file_without_a_modality_is_the_only_encoders():
    assert weights_per_modality({"": "a.pth"}, ["image"]) == {"image": "a.pth"}
    assert weights_per_modality({"text": "t.pt"}, ["image", "text"]) == {"text": "t.pt"}
    assert weights_per_modality(None, ["image"]) == {}
    with pytest.raises(BadInput, match="--weights a.pth: say which encoder.*one of image, text"):
        weights_per_modality({"": "a.pth"}, ["image", "text"])
    with pytest.raises(BadInput, match="the image encoder has weights already \\(b.pth\\)"):
        weights_per_modality({"image": "b.pth", "": "a.pth"}, ["image"])
