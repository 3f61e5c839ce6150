"""eval --plot: recall@k curves and confusion matrices drawn from the very ranks and
predictions behind the JSON's metrics (which --plot leaves unchanged); eval's result
names its model and data after their paths, safe for -o templates."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_files import make_pipeline  # noqa: E402

from mmcli.evaluate.run import EvalConfig, run_eval, safe_name  # noqa: E402
from mmcli.plots.evaluation import confusion_matrix, recall_at_every_k  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return make_pipeline(
        tmp_path_factory.mktemp("plotpipe"),
        lambda *a: runner.invoke(app, [str(x) for x in a], catch_exceptions=False),
    )


def _without_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "elapsed_s"}


def test_retrieval_recall_curves_agree_with_the_metrics(cli, pipe, tmp_path):
    plain = cli("eval", pipe["features"], "--k", "1,2,5")
    r = cli("eval", pipe["features"], "--k", "1,2,5", "--plot", tmp_path / "pics")
    assert r.exit_code == 0, r.stderr
    assert _without_time(json.loads(r.stdout)) == _without_time(json.loads(plain.stdout))
    png = tmp_path / "pics" / "retrieval-recall.png"
    assert png.read_bytes()[:8] == PNG and f"wrote {png}" in r.stderr
    details: dict = {}
    result = run_eval(EvalConfig(features=[str(pipe["features"])], ks=[1, 2, 5]), details=details)
    for key in ("image_retrieval", "text_retrieval"):
        ks, recall = recall_at_every_k(details[key]["first"], details[key]["candidates"])
        assert ks[-1] == details[key]["candidates"] and recall[-1] == 1.0
        for k in (1, 2, 5):
            assert recall[k - 1] == pytest.approx(result["metrics"][f"{key}_recall@{k}"])


@pytest.mark.parametrize("task", ["zeroshot", "linear-probe"])
def test_confusion_matrix_and_per_class_recall(cli, pipe, tmp_path, task):
    args = ["eval", pipe["features"], "--task", task, "--modality", "image"]
    if task == "zeroshot":
        args += ["--model", pipe["model"]]
    r = cli(*args, "--plot", tmp_path)
    assert r.exit_code == 0, r.stderr
    for name in ("confusion", "per-class-recall"):
        assert (tmp_path / f"{task}-{name}.png").read_bytes()[:8] == PNG
    details: dict = {}
    cfg = EvalConfig(features=[str(pipe["features"])], task=task, table="image",
                     model=str(pipe["model"]) if task == "zeroshot" else None)  # fmt: skip
    metrics = run_eval(cfg, details=details)["metrics"]
    assert sorted(details["classes"]) == ["blue", "green", "red"]
    m = confusion_matrix(details["labels"], details["predictions"], len(details["classes"]))
    prefix = "lp_" if task == "linear-probe" else ""
    assert np.trace(m) / m.sum() == pytest.approx(metrics[prefix + "acc1"])
    per_class = np.diag(m)[m.sum(1) > 0] / m.sum(1)[m.sum(1) > 0]
    assert per_class.mean() == pytest.approx(metrics[prefix + "mean_per_class_recall"])


def test_plot_folder_is_never_an_input(cli, pipe):
    r = cli("eval", pipe["features"], "--plot", pipe["features"])
    assert r.exit_code == 2 and "is where the input is read from" in r.stderr


def test_results_are_named_after_the_model_and_data_paths(cli, pipe, tmp_path):
    # two runs, both saved as model.safetensors, evaluated on data in a folder named train
    for run in ("run-a", "run-b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        shutil.copy(pipe["model"], tmp_path / "runs" / run / "model.safetensors")
    template = str(tmp_path / "results" / "{model}_{task}_{dataset}.json")
    for run in ("run-a", "run-b"):
        r = cli("eval", pipe["features"], "--task", "zeroshot", "--modality", "image",
                "--model", tmp_path / "runs" / run / "model.safetensors", "-o", template)  # fmt: skip
        assert r.exit_code == 0, r.stderr
    dataset = f"{pipe['root'].name}-raw"  # the manifest's folder is raw/: the one above named
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        f"run-a_zeroshot_{dataset}.json",
        f"run-b_zeroshot_{dataset}.json",
    ]
    res = json.loads((tmp_path / "results" / f"run-a_zeroshot_{dataset}.json").read_text())
    assert res["model"] == "run-a" and res["dataset"] == dataset
    assert safe_name("../a b/c:d") == "a_b_c_d" and safe_name("") == "unnamed"


def test_a_folder_named_train_is_named_with_its_parent(tmp_path):
    from mmcli.evaluate.run import dataset_name

    class F:
        source = {"manifest": str(tmp_path / "coco" / "train" / "manifest.jsonl")}
        paths = ["x"]

    assert dataset_name(F()) == "coco-train"
    F.source = {"manifest": str(tmp_path / "flickr8k" / "manifest.jsonl")}
    assert dataset_name(F()) == "flickr8k"
