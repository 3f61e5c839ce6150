"""`mmcli info` on what people point it at: run folders, training states, raw inputs."""

from __future__ import annotations

import json

import pytest

from mmcli.train.fuse import FuseConfig, fuse_train
from mmcli.train.loop import LoopConfig


@pytest.fixture(scope="module")
def run_dir(toy_tensors, tmp_path_factory):
    run = tmp_path_factory.mktemp("info") / "run"
    cfg = FuseConfig(
        pairs=[("image", "text")], encoders={"image": "tiny", "text": "tiny"}, embed_dim=16
    )
    summary = fuse_train(
        [str(toy_tensors)],
        str(run),
        cfg,
        LoopConfig(epochs=2, lr=1e-2),
        batch_size=16,
        device="cpu",
    )
    return run, summary


def test_info_describes_a_run_folder(cli, run_dir):
    run, summary = run_dir
    r = cli("info", run, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["kind"] == "run" and s["command"] == "fuse-train"
    assert s["state"]["step"] == summary["steps"] and s["state"]["epoch"] == 2
    assert s["best_metrics"] == pytest.approx(summary["best_metrics"])
    assert s["args"]["fuse"]["embed_dim"] == 16
    assert {"run.json", "metrics.jsonl", "state.safetensors", "model.safetensors"} <= set(
        s["files"]
    )
    text = cli("info", run)
    assert text.exit_code == 0 and "fuse-train run" in text.stdout and "best:" in text.stdout


def test_info_describes_a_training_state(cli, run_dir):
    run, summary = run_dir
    r = cli("info", run / "state.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["kind"] == "train-state" and s["step"] == summary["steps"] and s["tensors"] > 10


def test_info_plot_draws_the_runs_curves(cli, run_dir):
    pytest.importorskip("matplotlib")
    run, _ = run_dir
    (run / "curves.png").unlink(missing_ok=True)
    r = cli("info", run, "--plot")
    assert r.exit_code == 0, r.stderr
    assert (run / "curves.png").stat().st_size > 10_000


def test_info_plot_needs_a_run_folder(run_mmcli, toy_tensors):
    p = run_mmcli("info", toy_tensors, "--plot")
    assert p.returncode == 2
    assert p.stderr.decode().strip().splitlines() == [
        "error: --plot draws a training run's curves: pass a run folder"
    ]


def test_info_describes_a_manifest(cli, toy_data):
    r = cli("info", toy_data, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    lines = (toy_data).read_text().splitlines()
    items = [json.loads(x) for x in lines]
    assert s["kind"] == "raw" and s["format"] == "jsonl" and s["items"] == len(items)
    assert s["captions"] == sum(len(it["text"]) for it in items)
    assert s["modalities"] == {"image": len(items), "text": len(items), "audio": len(items)}
    splits = {}
    for it in items:
        splits[it["split"]] = splits.get(it["split"], 0) + 1
    assert s["splits"] == splits
    assert "missing_files" not in s


def test_info_describes_karpathy_and_coco_files(cli, tmp_path):
    karpathy = {
        "images": [
            {
                "filename": "a.jpg",
                "split": "train",
                "sentences": [{"raw": "A dog."}, {"raw": "A pup."}],
            },
            {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "A cat."}]},
        ]
    }
    coco = {
        "images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "A man."},
            {"image_id": 1, "id": 2, "caption": "A person."},
            {"image_id": 2, "id": 3, "caption": "A bus."},
        ],
    }
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    (tmp_path / "a.jpg").write_bytes(b"not checked")
    r = cli(
        "info", tmp_path / "dataset_flickr8k.json", tmp_path / "captions_val2014.json", "--json"
    )
    assert r.exit_code == 0, r.stderr
    k, c = json.loads(r.stdout)["sets"]
    assert (k["format"], k["items"], k["captions"]) == ("karpathy", 2, 3)
    assert k["splits"] == {"test": 1, "train": 1}
    assert k["captions_per_item"] == {"min": 1, "mean": 1.5, "max": 2}
    assert k["missing_files"] == {"image": 1}  # b.jpg is not next to the file
    assert (c["format"], c["items"], c["captions"]) == ("coco", 2, 3)
