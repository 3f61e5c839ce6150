"""distill from a whole pretrained CLIP (``--teacher open_clip:ARCH --weights FILE``,
``--teacher hf:DIR``) into a small student of mmcli's own encoders: the teacher's text
tower reads the full captions with its own tokenizer, the run ends with a student
checkpoint that rebuilds without the library model, whose embeddings moved toward the
teacher's; a changed teacher is refused on --resume; bad specs are one line, exit 2.
Tiny random-init models built with the libraries' own constructors, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pm = pytest.importorskip("pretrained_models")
open_clip = pytest.importorskip("open_clip")

from metric_logs import assert_same_losses  # noqa: E402

from mmcli.models import MultimodalModel  # noqa: E402
from mmcli.models.pretrained import load_model  # noqa: E402
from mmcli.train.data import load_dataset  # noqa: E402

STUDENT = ["--student", "image=convnet:width=4,depth=2,dim=16,grid=4,stem_stride=2",
           "--student", "text=bow:dim=16"]  # fmt: skip
FAST = ["--batch-size", 16, "--device", "cpu", "--lr", "3e-3", "--log-every", 1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip(toy_data, tmp_path_factory):
    """A tiny open_clip ViT (custom config JSON + safetensors) and the toy data
    preprocessed with its pixels (``preprocess --like``)."""
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    root = tmp_path_factory.mktemp("oc_teacher")
    cfg, weights = pm.open_clip_model(root / "open_clip", seed=1)
    spec = f"open_clip:{cfg}"
    r = CliRunner().invoke(app, ["preprocess", str(toy_data), "-o", str(root / "t"), "--like", spec,
                                 "--audio-seconds", "0.25"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return {"root": root, "spec": spec, "weights": weights, "tensors": root / "t", "cfg": cfg}


def _distill(cli, clip, out, *extra, steps=30):
    return cli("distill", clip["tensors"], "--teacher", clip["spec"], "--weights", clip["weights"],
               "-o", out, *STUDENT, "--max-steps", steps, *FAST, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def run(clip, tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    out = tmp_path_factory.mktemp("oc_run") / "run"
    args = ["distill", clip["tensors"], "--teacher", clip["spec"], "--weights", clip["weights"],
            "-o", out, *STUDENT, "--loss", "feature=1", "--max-steps", 60, *FAST]  # fmt: skip
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_the_teachers_text_tower_reads_the_full_captions_with_its_own_tokenizer(clip, toy_data):
    """The rows distill gives the teacher's text tower are open_clip's tokens of the
    captions as written in the manifest (not the byte tokens), and encode as open_clip
    itself encodes them."""
    teacher = load_model(clip["spec"], weights=str(clip["weights"])).eval()
    ds = load_dataset([str(clip["tensors"])])
    table, enc = ds.tables["text"], teacher.encoders["text"]
    rows = np.arange(12)
    captions = {}
    for line in Path(toy_data).read_text().splitlines():
        item = json.loads(line)
        caps = item["text"] if isinstance(item["text"], list) else [item["text"]]
        captions[item["id"]] = caps
    item_of = {int(r): i for i, rs in enumerate(ds.rows_of["text"]) for r in rs}
    expected = []
    for r in rows:
        i = item_of[int(r)]
        k = list(ds.rows_of["text"][i]).index(r)
        expected.append(captions[ds.ids[i]][k])
    assert table.strings(rows) == expected
    assert table.strings(np.array([-1])) == [""]
    model, _, _ = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(clip["weights"])
    )
    tok = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        ours = teacher.encode("text", table.model_input(enc, rows))
        ref = F.normalize(model.eval().encode_text(tok(expected)), dim=-1)
    assert F.cosine_similarity(ours, ref).min() >= 0.9999


def test_distill_from_open_clip_end_to_end(run, clip):
    """Exit 0, a report of teacher vs student, losses that fall, and a student checkpoint
    of mmcli's own encoders (it rebuilds with no open_clip model) in the teacher's space."""
    out, report = run
    assert report["teacher"]["model"] == clip["spec"]
    assert report["teacher"]["encoders"] == {"image": "open_clip", "text": "open_clip"}
    assert report["student"]["encoders"] == {"image": "convnet", "text": "bow"}
    assert 0 < report["parameter_ratio"] < 1
    assert set(report["teacher"]["metrics"]) >= {"image-text/image_retrieval_recall@1"}
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]  # fmt: skip
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    student = MultimodalModel.from_checkpoint(out / "model.safetensors")
    assert {student.config.encoders[m]["name"] for m in ("image", "text")} == {"convnet", "bow"}
    assert "pretrained" not in student.config.extra
    record = student.config.extra["distill"]["teacher"]
    assert record["path"] == clip["spec"] and record["pretrained"]["library"] == "open_clip"
    teacher = load_model(clip["spec"], weights=str(clip["weights"]))
    assert student.out_dim("image") == teacher.out_dim("image")


def test_the_students_embeddings_moved_toward_the_teachers(run, clip):
    """Per-row cosine between student and teacher embeddings of the same images and
    captions (the feature loss): well above a fresh student of the same config."""
    out, _ = run
    teacher = load_model(clip["spec"], weights=str(clip["weights"])).eval()
    student = MultimodalModel.from_checkpoint(out / "last.safetensors").eval()
    torch.manual_seed(0)
    fresh = MultimodalModel(student.config).eval()
    ds = load_dataset([str(clip["tensors"])])
    cos = {}
    with torch.no_grad():
        for m in ("image", "text"):
            rows = np.arange(len(ds.tables[m].arrays[0]))[:64]
            t = teacher.encode(m, ds.tables[m].model_input(teacher.encoders[m], rows))
            x = ds.tables[m].fetch(rows)
            cos[m] = [
                float(F.cosine_similarity(s.encode(m, x), t).mean()) for s in (fresh, student)
            ]
    for m, (before, after) in cos.items():
        assert after > before + 0.3, (m, cos)
        assert after > 0.5, (m, cos)


def test_cached_teacher_trains_on_the_same_teacher_outputs(cli, clip, tmp_path):
    """--cache-teacher (the teacher's outputs computed once by extract, its own tokenizer
    on text.raw) gives the losses of the on-the-fly teacher, step for step."""
    for name, extra in (("live", []), ("cached", ["--cache-teacher"])):
        r = _distill(cli, clip, tmp_path / name, *extra, steps=4)
        assert r.exit_code == 0, r.stderr
    a = [x for x in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    b = [
        x for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert_same_losses(a, b, rel=1e-3)


def test_resume_refuses_a_teacher_whose_weights_changed(cli, clip, tmp_path):
    import shutil

    weights = tmp_path / "w.safetensors"
    shutil.copy(clip["weights"], weights)
    args = ["distill", clip["tensors"], "--teacher", clip["spec"], "--weights", weights,
            "-o", tmp_path / "r", *STUDENT, "--max-steps", 4, "--save-every", 2, *FAST]  # fmt: skip
    assert cli(*args).exit_code == 0
    assert cli(*args, "--resume").exit_code == 0  # the same teacher: resumes (already done)
    _, other = pm.open_clip_model(tmp_path / "other", seed=7)
    shutil.copy(other, weights)  # same path and arguments, other weights
    r = cli(*args, "--resume")
    assert r.exit_code == 2
    assert "the teacher changed since this run started" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "teacher, extra, message",
    [
        ("open_clip:NoSuchArch", [], "unknown open_clip architecture"),
        ("open_clip:", [], "name the model after the colon"),
        ("hf:/no/such/folder", [], "model folder not found"),
        ("timm:resnet18", [], "timm models are image backbones"),
        ("runs/missing.safetensors", [], "teacher checkpoint not found"),
        ("CKPT", ["--weights", "W"], "--weights is the weights file of --teacher open_clip"),
        (
            "SPEC",
            ["--student", "derive:0.5"],
            "cannot derive a smaller student from the pretrained",
        ),
        ("SPEC", ["--student", "image=convnet"], "--student names no text encoder"),
    ],
)
def test_bad_teacher_specs_are_one_line_exit_2(cli, clip, run, tmp_path, teacher, extra, message):
    teacher = {"CKPT": str(run[0] / "model.safetensors"), "SPEC": clip["spec"]}.get(
        teacher, teacher
    )
    extra = [str(clip["weights"]) if x == "W" else x for x in extra]
    if teacher == clip["spec"]:
        extra += ["--weights", str(clip["weights"])]
    r = cli("distill", clip["tensors"], "--teacher", teacher, "-o", tmp_path / "bad", *extra,
            "--max-steps", 2, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("note:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_distill_from_a_hf_clip_folder(cli, toy_data, tmp_path):
    """--teacher hf:DIR (transformers' save_pretrained layout, its own tokenizer)."""
    pytest.importorskip("transformers")
    folder = pm.hf_clip(tmp_path / "clip")
    r = cli("preprocess", toy_data, "-o", tmp_path / "t", "--like", f"hf:{folder}")
    assert r.exit_code == 0, r.stderr
    r = cli("distill", tmp_path / "t", "--teacher", f"hf:{folder}", "-o", tmp_path / "run",
            *STUDENT, "--max-steps", 30, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["teacher"]["encoders"] == {"image": "hf", "text": "hf"}
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]  # fmt: skip
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert MultimodalModel.from_checkpoint(tmp_path / "run" / "model.safetensors").modalities
