"""retrieve and eval check that the model matches the features: a model from another run
is refused (one line, exit 2) unless --allow-model-mismatch; without --model, the model
the index names is used when it is still there."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from feature_files import make_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app
    from mmcli.formats.tensorfile import TensorSet
    from mmcli.models import build_model

    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    p = make_pipeline(tmp_path_factory.mktemp("pipe"), cli)
    torch.manual_seed(1)  # the same architecture, another run: other weights
    head = {"kind": "linear", "in_dim": 16, "out_dim": 12}
    other = build_model({"image": "tiny", "text": "tiny"}, inputs=TensorSet(p["tensors"]).specs,
                        heads={"image": head, "text": head}, embed_dim=12)  # fmt: skip
    p["other"] = p["root"] / "other.safetensors"
    other.to_checkpoint(p["other"])
    p["cli"] = cli
    return p


def hits(stdout: str) -> list[str]:
    return [h["id"] for h in json.loads(stdout.splitlines()[0])["hits"]]


def test_a_model_from_another_run_is_refused_in_one_line(pipe):
    cli = pipe["cli"]
    r = cli(
        "retrieve", "--index", pipe["features"], "--model", pipe["other"], "--text", "a red circle"
    )
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    # both models named, and the way out
    assert str(pipe["model"]) in r.stderr and str(pipe["other"]) in r.stderr
    assert "--allow-model-mismatch" in r.stderr
    r = cli("eval", pipe["features"], "--task", "zeroshot", "--model", pipe["other"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "another model" in r.stderr


def test_the_flag_overrides_with_a_warning(pipe):
    cli = pipe["cli"]
    r = cli("retrieve", "--index", pipe["features"], "--model", pipe["other"], "--text", "a red circle",
            "--allow-model-mismatch", "-k", "3")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert len(hits(r.stdout)) == 3 and "another model" in r.stderr
    r = cli("eval", pipe["features"], "--task", "zeroshot", "--model", pipe["other"],
            "--allow-model-mismatch")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "acc1" in json.loads(r.stdout)["metrics"]


def test_the_right_model_passes(pipe):
    r = pipe["cli"]("retrieve", "--index", pipe["features"], "--model", pipe["model"],
                    "--text", "a red circle", "-k", "4")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "another model" not in r.stderr


def test_omitted_model_is_the_one_the_index_names(pipe, tmp_path, monkeypatch):
    cli = pipe["cli"]
    args = ("retrieve", "--index", pipe["features"], "--text", "a red circle", "-k", "5")
    given = cli(*args, "--model", pipe["model"])
    assert given.exit_code == 0, given.stderr
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert hits(r.stdout) == hits(given.stdout)
    assert f"using the model the image features name: {pipe['model']}" in r.stderr
    # from another folder: the absolute path recorded beside the relative one is found
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 0, r.stderr and hits(r.stdout) == hits(given.stdout)
    r = cli("eval", pipe["features"], "--task", "zeroshot")
    assert r.exit_code == 0, r.stderr
    want = cli("eval", pipe["features"], "--task", "zeroshot", "--model", pipe["model"])
    assert json.loads(r.stdout)["metrics"] == json.loads(want.stdout)["metrics"]
    assert json.loads(r.stdout)["model"] == json.loads(want.stdout)["model"]


def test_a_named_model_that_is_gone_or_changed_is_one_line(pipe, tmp_path):
    cli = pipe["cli"]
    moved = tmp_path / "model.safetensors"
    shutil.move(pipe["model"], moved)
    try:
        r = cli("retrieve", "--index", pipe["features"], "--text", "a red circle")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1
        assert "which is not there" in r.stderr and "need --model" in r.stderr
        shutil.copy(pipe["other"], pipe["model"])  # another model at the recorded path
        r = cli("retrieve", "--index", pipe["features"], "--text", "a red circle")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "another model" in r.stderr
    finally:
        shutil.move(moved, pipe["model"])


def test_id_queries_need_no_model_and_backbone_features_name_none(pipe, tmp_path):
    cli = pipe["cli"]
    r = cli("retrieve", "--index", pipe["features"], "--id", "x1", "-k", "2")
    assert r.exit_code == 0, r.stderr and "using the model" not in r.stderr
    r = cli("extract", pipe["tensors"], "-o", tmp_path / "bb", "--encoder", "image=tiny",
            "--encoder", "text=tiny", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("retrieve", "--index", tmp_path / "bb", "--text", "a red circle")
    assert r.exit_code == 2 and "features name no model (tiny features)" in r.stderr
    # a joint-space model against backbone features: refused
    r = cli(
        "retrieve", "--index", tmp_path / "bb", "--model", pipe["model"], "--text", "a red circle"
    )
    assert r.exit_code == 2 and "encodes into its joint space" in r.stderr


def test_eval_retrieval_refuses_tables_of_two_models(pipe, tmp_path):
    import numpy as np
    from feature_files import toy_pairs

    from mmcli.formats.tensorfile import Shard, write_shard

    img, ii, txt, ti = toy_pairs(8, 6)
    ids = [f"a{i}" for i in range(8)]
    for table, x, items, sha in (("image", img, ii, "a" * 64), ("text", txt, ti, "b" * 64)):
        spec = {"encoder": "test", "dim": 6, "normalized": True, "dtype": "float32",
                "model": {"path": f"{table}.safetensors", "sha256": sha}}  # fmt: skip
        shard = Shard(ids=ids, tables={table: torch.from_numpy(x)},
                      items={table: torch.from_numpy(np.asarray(items, dtype=np.int64))})  # fmt: skip
        write_shard(tmp_path / f"{table}.safetensors", shard, kind="features", specs={table: spec})
    files = (tmp_path / "image.safetensors", tmp_path / "text.safetensors")
    r = pipe["cli"]("eval", *files, "--task", "retrieval")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert (
        "their spaces differ" in r.stderr and "image.safetensors (sha256 aaaaaaaaaaaa)" in r.stderr
    )
    r = pipe["cli"]("eval", *files, "--task", "retrieval", "--k", "1,5", "--allow-model-mismatch")
    assert r.exit_code == 0, r.stderr
