"""mmcli extract on the command line: happy paths, stdout, and one clear line for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from extract_data import make_shards
from safetensors.torch import save_file

from mmcli.formats.checkpoint import Checkpoint, save_checkpoint
from mmcli.formats.tensorfile import ShardFile, TensorSet
from mmcli.models import build_model


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "tensors", shards=2, items=4, modalities=("image", "text"))


def test_extract_writes_one_features_shard_per_input_shard(cli, shards, tmp_path):
    out = tmp_path / "feats"
    result = cli(
        "extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny", "-e", "text=bow:dim=8"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (
        "extracted 8 image rows (tiny, 16-d), 14 text rows (bow, 8-d): 2 shard(s) written"
        in result.stderr
    )
    feats = TensorSet(out)
    assert feats.tables == ["image", "text"] and feats.rows("text") == 14
    assert feats.specs["text"]["dim"] == 8

    again = cli(
        "extract",
        tmp_path / "tensors",
        "-o",
        out,
        "-e",
        "image=tiny",
        "-e",
        "text=bow:dim=8",
        "--resume",
    )
    assert again.exit_code == 0 and "2 already done" in again.stderr


def test_weights_file_gives_the_same_features_as_a_direct_forward(cli, shards, tmp_path):
    torch.manual_seed(5)
    model = build_model({"image": "convnet:width=8"})
    weights = tmp_path / "convnet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.encoders["image"].state_dict().items()}, str(weights)
    )
    out = tmp_path / "f.safetensors"
    result = cli(
        "extract",
        shards[0],
        "-o",
        out,
        "-e",
        "image=convnet:width=8",
        "--weights",
        weights,
        "--dtype",
        "float32",
    )
    assert result.exit_code == 0, result.stderr
    got = ShardFile(out)
    assert got.specs["image"]["weights"]["path"] == str(weights)
    with torch.no_grad():
        want = model.encode("image", ShardFile(shards[0]).tensor("image"))
    torch.testing.assert_close(got.tensor("image"), want, rtol=1e-4, atol=1e-5)


def test_stdin_to_stdout(run_mmcli, shards):
    p = run_mmcli("extract", "-", "-o", "-", "-e", "text=tiny", "-q", input=shards[0].read_bytes())
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr == b""
    info = run_mmcli("info", "-", "--json", input=p.stdout)
    assert info.returncode == 0 and b'"kind": "features"' in info.stdout


def test_help_has_a_runnable_example_and_every_encoder(cli):
    from mmcli import models
    from mmcli.modalities import BUILTIN_ENCODERS as ENCODER_NAMES

    result = cli("extract", "--help")
    assert result.exit_code == 0
    assert "mmcli extract out/tensors/ -o out/feats/" in result.stdout
    builtin = (
        "mmcli.models.image",
        "mmcli.models.text",
        "mmcli.models.audio",
        "mmcli.models.video",
    )
    registered = [n for n in models.list() if models.resolve(n)[2].__module__ in builtin]
    assert registered == [f"{m}/{n}" for m, names in ENCODER_NAMES.items() for n in names]
    assert all(n in result.stdout for names in ENCODER_NAMES.values() for n in names)


def test_the_cli_module_does_not_import_torch():
    code = "import sys, mmcli.cli.extract; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _one_line_error(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def _checkpoint_of_another_architecture(path):
    a, b = build_model({"image": "convnet"}), build_model({"image": "tiny"})
    save_checkpoint(path, Checkpoint(config=a.config.to_dict(), state_dict=b.state_dict()))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["-e", "image=resnet1000"],
            ["unknown image encoder 'resnet1000'", "known: image/tiny, image/convnet"],
        ),
        (["-e", "smell=tiny"], ["unknown modality 'smell'"]),
        (["-e", "image"], ["--encoder expects key=value"]),
        (
            ["-e", "image=convnet:widht=3"],
            ["unknown option 'widht'", "valid: width, depth, dim, dropout"],
        ),
        (["-e", "audio=tiny"], ["no audio table in the input (it has: image, text)"]),
        (["-e", "image=tiny", "--weights", "{tmp}/missing.pth"], ["weights file not found"]),
        (["-e", "image=tiny", "--weights", "{tmp}/garbage.pth"], ["not a readable weights file"]),
        (
            ["-e", "image=resnet18", "--weights", "{tmp}/tiny.safetensors"],
            ["weights do not match image/resnet18", "missing"],
        ),
        (
            ["-e", "image=convnet", "--weights", "imagenet"],
            ["image/convnet has no imagenet weights"],
        ),
        (
            ["-e", "image=tiny", "-e", "text=tiny", "--weights", "{tmp}/tiny.safetensors"],
            ["--weights", "say which encoder it is for", "one of image, text"],
        ),
        (
            ["-e", "image=tiny", "--weights", "a.pth", "--weights", "b.pth"],
            ["--weights b.pth: say which encoder each file is for"],
        ),
        (["--model", "{tmp}/other_arch.safetensors"], ["weights do not match its model config"]),
        (
            ["--model", "{tmp}/tensors/tensors-00000-of-00002.safetensors"],
            ["not an mmcli model checkpoint (kind: tensors)"],
        ),
        (["--model", "{tmp}/nope.safetensors"], ["checkpoint not found"]),
        (
            ["-e", "image=tiny", "--model", "{tmp}/other_arch.safetensors"],
            ["either --model or --encoder"],
        ),
        (["-e", "image=tiny", "--device", "cuda:0"], ["--device cuda:0: no CUDA GPU is available"]),
        (["-e", "image=tiny", "--device", "tpu"], ["bad device 'tpu'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, shards, tmp_path, args, needles):
    if torch.cuda.is_available() and "cuda:0" in args:
        pytest.skip("a GPU is present")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    save_file(
        {k: v.contiguous() for k, v in build_model({"image": "tiny"}).state_dict().items()},
        str(tmp_path / "tiny.safetensors"),
    )
    _checkpoint_of_another_architecture(tmp_path / "other_arch.safetensors")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    result = cli("extract", tmp_path / "tensors", "-o", out, *args)
    _one_line_error(result, *needles)
    assert not out.exists()  # nothing left behind


def test_imagenet_offline_is_one_line(cli, shards, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("MMCLI_OFFLINE", "1")
    result = cli(
        "extract", shards[0], "-o", tmp_path / "o", "-e", "image=resnet18", "-w", "imagenet"
    )
    _one_line_error(
        result,
        "imagenet weights for image/resnet18 are not cached",
        "--weights PATH/resnet18-f37072fd.pth",
    )


def test_existing_output_needs_resume(cli, shards, tmp_path):
    out = tmp_path / "feats"
    assert cli("extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny").exit_code == 0
    result = cli("extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny")
    _one_line_error(result, "already holds 2 features shard(s); pass --resume")


def test_overwrite_replaces_only_extracts_own_files(cli, shards, tmp_path):
    """--overwrite as in preprocess: an earlier run's features shards (any shard count) go,
    the user's other files stay."""
    out = tmp_path / "feats"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "features-00000-of-00005.safetensors").write_bytes(b"an old run over 5 shards")
    result = cli("extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny")
    _one_line_error(result, "from a run over 5 shards", "--overwrite")
    result = cli("extract", tmp_path / "tensors", "-o", out, "-e", "image=nope", "--overwrite")
    _one_line_error(result, "nope")
    assert (out / "features-00000-of-00005.safetensors").exists()  # bad input removes nothing
    result = cli("extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "features-00000-of-00002.safetensors",
        "features-00001-of-00002.safetensors",
        "notes.txt",
    ]
    assert (out / "notes.txt").read_text() == "mine"
    # a different run over the same folder: refused, then replaced with --overwrite
    again = ("extract", tmp_path / "tensors", "-o", out, "-e", "image=tiny:width=4")
    _one_line_error(cli(*again, "--resume"), "different extract run", "--overwrite")
    assert cli(*again, "--overwrite", "--resume").exit_code == 0
    spec = ShardFile(out / "features-00000-of-00002.safetensors").specs["image"]
    assert spec["encoder_config"]["width"] == 4
