"""mmcli eval on the command line: JSON on stdout, files joined by id, output templates,
summaries, tasks with a real model, and one clear line (exit 2) for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from feature_files import make_pipeline, toy_pairs, write_features

from mmcli.evaluate.retrieval import pair_ranks, retrieval_metrics


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfeats")
    img, ii, txt, ti = toy_pairs(20, 8, noise=0.6)
    ids = [f"i{j}" for j in range(20)]
    labels = np.arange(20) % 4
    both = write_features(
        root / "both.safetensors",
        ids,
        {"image": (img, ii), "text": (txt, ti)},
        labels=labels,
        label_names=list("abcd"),
    )
    only_img = write_features(root / "img.safetensors", ids, {"image": (img, ii)})
    only_txt = write_features(root / "txt.safetensors", ids[::-1], {"text": (txt, 19 - ti)})
    wide = write_features(
        root / "wide.safetensors", ids, {"text": (np.ones((20, 4), np.float32), ii)}
    )
    return {
        "both": both,
        "img": only_img,
        "txt": only_txt,
        "wide": wide,
        "data": (img, ii, txt, ti),
    }


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    runner = CliRunner()
    return make_pipeline(
        tmp_path_factory.mktemp("evalpipe"),
        lambda *a: runner.invoke(app, [str(x) for x in a], catch_exceptions=False),
    )


def test_retrieval_json_on_stdout(cli, feats):
    r = cli("eval", feats["both"], "--k", "1,5")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["task"] == "retrieval" and out["query"] == "text" and out["target"] == "image"
    img, ii, txt, ti = feats["data"]
    fwd, bwd = pair_ranks(torch.from_numpy(txt), ti, torch.from_numpy(img), ii)
    want = {f"image_retrieval_{k}": v for k, v in retrieval_metrics(fwd, [1, 5]).items()}
    want |= {f"text_retrieval_{k}": v for k, v in retrieval_metrics(bwd, [1, 5]).items()}
    assert out["metrics"] == want
    assert list(out["metrics"])[:2] == ["image_retrieval_recall@1", "image_retrieval_recall@5"]
    assert out["info"]["image_retrieval"]["queries"] == len(ti)
    assert out["info"]["text_retrieval"]["candidates"] == len(ti)


def test_files_of_different_tables_are_joined(cli, feats):
    joined = json.loads(cli("eval", feats["img"], feats["txt"], "-q").stdout)
    single = json.loads(cli("eval", feats["both"], "-q").stdout)
    assert joined["metrics"] == single["metrics"]


def test_output_template_and_table(cli, feats, tmp_path):
    r = cli("eval", feats["both"], "-o", tmp_path / "{model}_{task}.json", "--table")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    out = json.loads((tmp_path / "test_retrieval.json").read_text())
    assert "image_retrieval_recall@10" in out["metrics"]
    assert "image_retrieval_recall@1" in r.stderr  # the table, for people


def test_output_options_spelled_as_in_other_commands(cli, feats, tmp_path):
    """-k as in retrieve, --out as in preprocess / extract (aliases of --k / --output)."""
    r = cli("eval", feats["both"], "-k", "1,5", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert "image_retrieval_recall@5" in out["metrics"]
    assert "image_retrieval_recall@10" not in out["metrics"]


def test_summarize(cli, feats, tmp_path):
    for k in ("1", "1,5"):
        cli("eval", feats["both"], "--k", k, "-o", tmp_path / f"r{k.replace(',', '')}.json")
    r = cli("eval", "--summarize", tmp_path / "r*.json", "--format", "markdown")
    assert r.exit_code == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].startswith("| file | dataset | model | task | image_retrieval_recall@1 |")
    assert len(rows) == 4
    r = cli("eval", "--summarize", tmp_path / "r*.json", "-o", tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().startswith("file,dataset,model,task,")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{img}"], "no labels"),
        (["{both}", "--query", "audio", "--target", "image"], "no audio table"),
        (["{both}", "--k", "1,100"], "k=100 is larger than the 20 image candidates"),
        (["{img}", "{wide}"], "the text features have 4 dimensions and the image features 8"),
        (["{both}", "--task", "zeroshot"], "--task zeroshot needs --model"),
        (["{img}", "--task", "linear-probe"], "no labels"),
        (["{both}", "--k", "one"], "--k expects integers"),
        ([], "no feature files given"),
        (["{both}", "-o", "{{nope}}.json"], "bad --output template"),
        (["{both}", "--device", "gpu"], "bad device 'gpu'"),
        (["--task", "retrieval", "--train", "{both}", "--split", "test"], "needs FEATURES"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, feats, args, message):
    r = cli(
        "eval", *[a.format(**{k: str(v) for k, v in feats.items() if k != "data"}) for a in args]
    )
    assert r.exit_code == 2, r.stdout
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert message in r.stderr


def test_tasks_with_a_model(cli, pipe):
    r = cli(
        "eval",
        pipe["features"],
        "--task",
        "zeroshot",
        "--model",
        pipe["model"],
        "--modality",
        "image",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["metrics"]) == {"acc1", "mean_per_class_recall"}  # 3 classes: no acc5
    # named after its folder (issue 13: "model" for every run overwrote -o {model}_{task}.json)
    assert out["model"] == pipe["root"].name and out["info"]["classes"] == 3
    r = cli("eval", pipe["features"], "--task", "linear-probe")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["info"]["rows"] == {"train": 4, "val": 4, "test": 4}
    r = cli("eval", pipe["features"], "--task", "classify", "--model", pipe["model"])
    assert r.exit_code == 2 and "the checkpoint has no classifier head" in r.stderr


def test_split_evaluates_the_held_out_items(cli, pipe):
    r = cli("eval", pipe["features"], "--split", "test", "--k", "1,4")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split"] == "test"
    assert out["info"]["image_retrieval"] == {
        "query": "text",
        "target": "image",
        "queries": 8,
        "candidates": 4,
        "positives": 8,
        "queries_without_positive": 0,
    }
    r = cli("eval", pipe["features"], "--split", "test", "--task", "linear-probe")
    assert r.exit_code == 2 and "--split does not apply to the linear probe" in r.stderr
