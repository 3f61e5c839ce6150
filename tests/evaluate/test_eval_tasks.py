"""Zero-shot, linear probe, classify, summaries and feature joins on toy features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from feature_files import toy_pairs, write_features, write_manifest

from mmcli.errors import BadInput
from mmcli.evaluate.classification import (
    classification_metrics,
    evaluate_classifier,
    true_class_ranks,
)
from mmcli.evaluate.linear_probe import (
    Split,
    evaluate_linear_probe,
    fit_logistic_regression,
    linear_probe,
)
from mmcli.evaluate.summarize import load_results, render_summary
from mmcli.evaluate.zeroshot import evaluate_zeroshot, load_templates
from mmcli.formats.features import FeatureSet


def clusters(n_per: int, n_classes: int, dim: int = 8, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim)).astype(np.float32) * 2
    y = np.repeat(np.arange(n_classes), n_per)
    x = centers[y] + spread * rng.standard_normal((len(y), dim)).astype(np.float32)
    return x, y, centers


# ------------------------------------------------------------------ classification


def test_class_ranks_follow_the_tie_rule():
    logits = torch.tensor([[1.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 1.0, 0.0]])
    assert true_class_ranks(logits, [2, 2, 1]).tolist() == [2, 3, 1]
    m = classification_metrics(logits, [2, 2, 1], 3)
    assert m == {"acc1": pytest.approx(1 / 3), "mean_per_class_recall": pytest.approx(0.5)}
    assert "acc5" not in m  # fewer than 5 classes: left out, not NaN


def test_acc5_with_five_classes():
    # sample i: one wrong class scores 1, the rest tie at 0 and the lower classes win
    # the tie, so the true class i ranks 2 + i (sample 5: 6)
    logits = torch.eye(6)[[1, 2, 3, 4, 5, 0]]
    assert true_class_ranks(logits, [0, 1, 2, 3, 4, 5]).tolist() == [2, 3, 4, 5, 6, 6]
    m = classification_metrics(logits, [0, 1, 2, 3, 4, 5], 6)
    assert m["acc1"] == 0.0 and m["acc5"] == pytest.approx(4 / 6)


# -------------------------------------------------------------------- linear probe


def test_logistic_regression_separates_clusters():
    x, y, _ = clusters(30, 4)
    w, b = fit_logistic_regression(torch.from_numpy(x), y, 4, 1e-3)
    assert ((torch.from_numpy(x) @ w + b).argmax(1).numpy() == y).mean() == 1.0


def test_linear_probe_chooses_decay_on_val_and_reports_test():
    x, y, _ = clusters(40, 5, seed=1)
    rng = np.random.default_rng(0)
    part = rng.permutation(len(y)) % 4  # 0,1: train  2: val  3: test
    t = torch.from_numpy(x)

    def split(mask):
        return Split(t[torch.from_numpy(mask)], y[mask], np.flatnonzero(mask))

    metrics, info = linear_probe(
        split(part < 2), split(part == 2), split(part == 3), 5, weight_decays=(0.0, 1e-3, 10.0)
    )
    assert set(metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert metrics["lp_acc1"] > 0.9 and metrics["lp_acc5"] == 1.0
    assert info["weight_decay"] in (0.0, 1e-3) and info["val"] == "val split"
    _, info = linear_probe(split(part < 2), None, split(part == 3), 5, weight_decays=(1e-3,))
    assert info["val"].startswith("held out")


def test_linear_probe_splits_from_the_manifest_and_from_files(tmp_path):
    x, y, _ = clusters(12, 3, seed=2)
    ids = [f"i{j}" for j in range(len(y))]
    splits = [("train", "train", "val", "test")[j % 4] for j in range(len(y))]
    names = ["cat", "dog", "owl"]
    write_manifest(
        tmp_path / "m.jsonl",
        [{"id": i, "label": names[c], "split": s} for i, c, s in zip(ids, y, splits)],
    )
    f = write_features(
        tmp_path / "f.safetensors",
        ids,
        {"image": (x, np.arange(len(y)))},
        labels=y,
        label_names=names,
        source={"manifest": str(tmp_path / "m.jsonl")},
    )
    metrics, info = evaluate_linear_probe(FeatureSet.open(f), None)
    assert metrics["lp_acc1"] == 1.0 and info["rows"] == {"train": 18, "val": 9, "test": 9}
    # separate files, label names in a different order in the test file
    sel = {s: [j for j in range(len(y)) if splits[j] == s] for s in ("train", "val", "test")}
    files = {}
    for s, rows in sel.items():
        order = names if s != "test" else names[::-1]
        lab = np.array([order.index(names[y[j]]) for j in rows])
        files[s] = FeatureSet.open(
            write_features(
                tmp_path / f"{s}.safetensors",
                [ids[j] for j in rows],
                {"image": (x[rows], np.arange(len(rows)))},
                labels=lab,
                label_names=order,
            )
        )
    metrics2, _ = evaluate_linear_probe(train=files["train"], val=files["val"], test=files["test"])
    assert metrics2 == metrics
    with pytest.raises(BadInput, match="--train and --test go together"):
        evaluate_linear_probe(train=files["train"])


def test_linear_probe_without_splits_or_labels_is_bad_input(tmp_path):
    x, y, _ = clusters(4, 2)
    f = write_features(
        tmp_path / "f.safetensors", [str(j) for j in range(8)], {"image": (x, np.arange(8))}
    )
    with pytest.raises(BadInput, match="no labels"):
        evaluate_linear_probe(FeatureSet.open(f), None)
    g = write_features(
        tmp_path / "g.safetensors",
        [str(j) for j in range(8)],
        {"image": (x, np.arange(8))},
        labels=y,
        label_names=["a", "b"],
    )
    with pytest.raises(BadInput, match="no readable manifest"):
        evaluate_linear_probe(FeatureSet.open(g), None)


# ------------------------------------------------------------------------ zero-shot


class FakeEncoder:
    """Encodes "<template> <class name>" prompts to the class centre (tests only)."""

    def __init__(self, centers, names):
        self.centers, self.names = centers, names

    def encode(self, modality, prompts, batch_size=256):
        out = []
        for p in prompts:
            c = next(i for i, n in enumerate(self.names) if n.replace("_", " ") in p)
            out.append(torch.nn.functional.normalize(torch.from_numpy(self.centers[c]), dim=0))
        return torch.stack(out)


def test_zeroshot_on_toy_features(tmp_path):
    x, y, centers = clusters(10, 3, seed=3)
    names = ["red_circle", "blue square", "cat"]
    f = write_features(
        tmp_path / "f.safetensors",
        [str(j) for j in range(30)],
        {"image": (x, np.arange(30))},
        labels=y,
        label_names=names,
    )
    metrics, info = evaluate_zeroshot(
        FeatureSet.open(f), "image", FakeEncoder(centers, names), templates=["a photo of a {}."]
    )
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    assert info == {"table": "image", "samples": 30, "classes": 3, "templates": 1}


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("# prompts\na photo of a {}.\n\n{} in the wild\n")
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}.", "{} in the wild"]
    (tmp_path / "j.json").write_text('["{}", "a {}"]')
    assert load_templates(tmp_path / "j.json") == ["{}", "a {}"]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(BadInput, match="has no"):
        load_templates(tmp_path / "bad.txt")


# ------------------------------------------------------------------------- classify


def test_classify_with_a_label_head_on_fused_features(tmp_path):
    from mmcli.models import ModelConfig, MultimodalModel, build_model

    base = build_model({"image": "features:dim=3", "text": "features:dim=3"})
    config = ModelConfig(
        encoders=base.config.encoders, embed_dim=3, classifier={"labels": ["cat", "dog", "owl"]}
    )
    model = MultimodalModel(config).eval()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(3) * 10)
        model.classifier.bias.zero_()
    # items a..c: the fused embedding (mean of normalised rows) points at their class;
    # item d has no text row (masked out of the fusion) and is labelled cat: the one miss;
    # the file lists the label names in another order than the model
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    f = write_features(
        tmp_path / "f.safetensors",
        list("abcd"),
        {"image": (x, np.arange(4)), "text": (x[:3], np.arange(3))},
        labels=np.array([1, 0, 2, 1]),
        label_names=["dog", "cat", "owl"],
    )
    metrics, info = evaluate_classifier(FeatureSet.open(f), model)
    assert metrics == {"acc1": 0.75, "mean_per_class_recall": pytest.approx((1 + 0.5 + 1) / 3)}
    assert info == {"samples": 4, "classes": 3, "inputs": ["image", "text"]}
    with pytest.raises(BadInput, match="no classifier head"):
        evaluate_classifier(FeatureSet.open(f), base)


# ----------------------------------------------------------------- feature joins


def test_feature_files_join_by_id(tmp_path):
    img, ii, txt, ti = toy_pairs(6, 4)
    ids = [f"x{j}" for j in range(6)]
    a = write_features(
        tmp_path / "img.safetensors",
        ids,
        {"image": (img, ii)},
        labels=np.arange(6) % 2,
        label_names=["p", "q"],
    )
    # the text file lists its items in another order, one item only it has
    order = [5, 4, 3, 2, 1, 0]
    tids = [ids[j] for j in order] + ["extra"]
    local = np.array([order.index(j) for j in ti])
    b = write_features(
        tmp_path / "txt.safetensors",
        tids,
        {"text": (txt, local)},
        labels=np.array([-1] * 6 + [0]),
        label_names=["q"],
    )
    fs = FeatureSet.open([a, b])
    assert fs.tables == ["image", "text"] and fs.ids == ids + ["extra"]
    _, items = fs.table("text")
    np.testing.assert_array_equal(items.numpy(), ti)
    assert fs.label_names == ["p", "q"] and fs.labels().tolist() == [0, 1, 0, 1, 0, 1, 1]
    c = write_features(
        tmp_path / "clash.safetensors",
        ["x0"],
        {"audio": (img[:1], [0])},
        labels=[0],
        label_names=["q"],
    )
    with pytest.raises(BadInput, match="label"):
        FeatureSet.open([a, c])
    with pytest.raises(BadInput, match="in two sets of files"):
        FeatureSet.open(
            [
                a,
                write_features(
                    tmp_path / "img2.safetensors", ids, {"image": (img, ii)}, normalized=False
                ),
            ]
        )


# ------------------------------------------------------------------------ summaries


def test_summary_table(tmp_path):
    for name, metrics in (("a", {"acc1": 0.5}), ("b", {"acc1": 0.25, "lp_acc1": 0.75})):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"task": "x", "dataset": "d", "model": name, "metrics": metrics})
        )
    results = load_results([str(tmp_path / "*.json")])
    csv = render_summary(results, "csv").splitlines()
    assert csv[0] == "file,dataset,model,task,acc1,lp_acc1"
    assert csv[1].endswith(",d,a,x,0.5,") and csv[2].endswith(",d,b,x,0.25,0.75")
    md = render_summary(results, "markdown").splitlines()
    assert (
        md[0] == "| file | dataset | model | task | acc1 | lp_acc1 |"
        and "| 0.2500 | 0.7500 |" in md[3]
    )
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadInput, match="not an mmcli eval result"):
        load_results([tmp_path / "bad.json"])
