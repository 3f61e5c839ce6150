"""distill: the losses it adds, student construction, the gain over no teacher, the teacher
cache, cross-modal, resume, torchrun, bad input. (The losses it reuses are checked against
hand-computed values in test_objectives.py.)"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from metric_logs import assert_same_losses

from mmcli.errors import BadInput
from mmcli.models import MultimodalModel
from mmcli.train import distill as D
from mmcli.train.distill import (
    DistillConfig,
    DistillTask,
    combine,
    derive_encoder,
    distill,
    parse_losses,
    parse_student,
    setup_data,
    setup_student,
)
from mmcli.train.distill import recipe as distill_recipe
from mmcli.train.fuse import FuseConfig, fuse_train
from mmcli.train.fuse import setup_data as fuse_setup_data
from mmcli.train.fuse import setup_model as fuse_setup_model
from mmcli.train.loop import LoopConfig
from mmcli.train.objectives import classify_loss, interactive_contrastive_loss, kd_loss
from mmcli.train.sampler import BatchSampler

# a teacher that learns the toy data quickly (grid pooling keeps where shapes are)
TEACHER = {"image": "convnet:width=8,depth=2,dim=32,grid=4,stem_stride=2", "text": "bow:dim=32"}
SMALL_IMAGE = "convnet:width=4,depth=2,dim=16,grid=4,stem_stride=2"


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine every op of a
    two-thread run waits for the other thread's time slice (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(toy_tensors, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    fuse_train(
        [str(toy_tensors)],
        str(run),
        FuseConfig(pairs=[("image", "text")], encoders=dict(TEACHER), embed_dim=32),
        LoopConfig(epochs=1, max_steps=40, lr=3e-3, log_every=10),
        batch_size=16,
        device="cpu",
    )
    return run / "last.safetensors"


def _loop(steps, seed=0, **kw):
    return LoopConfig(epochs=1, max_steps=steps, lr=3e-3, seed=seed, log_every=1, **kw)


# ------------------------------------------------------------------ pure parts


def test_interactive_contrastive_by_hand():
    eye = torch.eye(2)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    items = torch.tensor([0, 1])
    # student image vs teacher text: positives score 1, negatives 0 -> softplus(-1) per row;
    # teacher image vs a student text that swapped the items: positives 0, negatives 1
    got = interactive_contrastive_loss(eye, swapped, eye, eye, items, items, 1.0)
    assert got.item() == pytest.approx(0.5 * (softplus(-1.0) + softplus(1.0)), rel=1e-6)


def test_loss_parser_and_the_kd_ce_mix_by_hand():
    assert parse_losses("similarity=1,feature=0.5,kd") == {
        "similarity": 1.0,
        "feature": 0.5,
        "kd": 1.0,
    }
    assert parse_losses("") is None
    with pytest.raises(BadInput, match=r"unknown loss 'magic'; known losses: kd, ce, feature"):
        parse_losses("similarity,magic=2")
    with pytest.raises(BadInput, match="bad loss weight"):
        parse_losses("kd=lots")
    # Hinton's mix: 0.7 * KL(softmax(t/T) || softmax(s/T)) * T^2 + 0.3 * CE(s, label)
    s, t, temp = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 2.0
    pt = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kd = sum(p * math.log(p / 0.5) for p in pt) * temp**2
    ce = math.log(2)  # uniform student logits, either label
    losses = {"kd": kd_loss(s, t, temp), "ce": classify_loss(s, torch.tensor([1]))}
    got = combine(losses, parse_losses("kd=0.7,ce=0.3"))
    assert got.item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-6)


def test_config_validation():
    with pytest.raises(BadInput, match="--temperature must be positive"):
        DistillConfig(teacher="t", temperature=0)
    with pytest.raises(BadInput, match="--temperature must be positive"):
        DistillConfig(teacher="t", temperature=-1)
    with pytest.raises(BadInput, match="every loss has weight 0"):
        DistillConfig(teacher="t", losses={"kd": 0.0})
    with pytest.raises(BadInput, match="needs both --from and --to"):
        DistillConfig(teacher="t", from_modality="image")
    with pytest.raises(BadInput, match="kd loss distils a classification head"):
        DistillConfig(teacher="t", from_modality="image", to_modality="audio", losses={"kd": 1})
    assert DistillConfig(teacher="t").losses == D.DEFAULT_LOSSES
    cross = DistillConfig(teacher="t", from_modality="image", to_modality="audio")
    assert cross.losses == D.CROSS_DEFAULT_LOSSES


def test_student_specs_and_derivation():
    spec = parse_student(["derive:width=0.25,depth=0.5", "text=bow:dim=8"])
    assert spec.derive == (0.25, 0.5) and spec.encoders == {"text": "bow:dim=8"}
    assert parse_student(["derive"]).derive == (0.5, 1.0)
    assert parse_student(["derive:0.25"]).derive == (0.25, 1.0)
    assert parse_student(["runs/x/model.safetensors"]).checkpoint == "runs/x/model.safetensors"
    with pytest.raises(BadInput, match="derive factors must be in"):
        parse_student(["derive:2"])
    with pytest.raises(BadInput, match="bad --student"):
        parse_student(["convnet"])
    conv = {"name": "convnet", "config": {"width": 32, "depth": 4, "dim": 256, "grid": 4}}
    small = derive_encoder("image", conv, 0.25, 0.5)["config"]
    assert (small["width"], small["depth"], small["dim"], small["grid"]) == (8, 2, 64, 4)
    text = {"name": "transformer", "config": {"width": 128, "depth": 2, "heads": 4}}
    small = derive_encoder("text", text, 0.25, 1.0)["config"]
    assert small["width"] == 32 and small["width"] % small["heads"] == 0 and small["depth"] == 2
    with pytest.raises(BadInput, match="cannot derive a smaller image/resnet18"):
        derive_encoder("image", {"name": "resnet18", "config": {}}, 0.5, 1.0)


# ----------------------------------------------------------------- training runs


def _held_out_recall(path, toy_tensors):
    """Mean of text->image / image->text recall@5 and @10 on the val + test items."""
    from mmcli.train.evaluation import evaluate_model

    data = fuse_setup_data([str(toy_tensors)], None, FuseConfig(pairs=[("image", "text")]))
    ds = data.dataset
    items = np.concatenate([ds.subset("val"), ds.subset("test")])
    m = evaluate_model(MultimodalModel.from_checkpoint(path), ds, items, [("image", "text")])
    return np.mean([m[f"image-text/mean_recall@{k}"] for k in (5, 10)])


def test_distillation_beats_the_same_student_without_a_teacher(toy_tensors, teacher, tmp_path, cli):
    """The student: a small image encoder, the teacher's text tower (copied, frozen). The
    same architecture trained from scratch for the same steps does worse on held-out items."""
    steps = 30
    fuse_train(
        [str(toy_tensors)],
        str(tmp_path / "alone"),
        FuseConfig(
            pairs=[("image", "text")],
            encoders={"image": SMALL_IMAGE, "text": TEACHER["text"]},
            embed_dim=32,
        ),
        _loop(steps),
        batch_size=16,
        device="cpu",
    )
    report = distill(
        [str(toy_tensors)],
        str(tmp_path / "kd"),
        DistillConfig(teacher=str(teacher), student=[f"image={SMALL_IMAGE}"], cache_teacher=True),
        _loop(steps),
        batch_size=16,
        device="cpu",
    )
    alone = _held_out_recall(tmp_path / "alone" / "last.safetensors", toy_tensors)
    taught = _held_out_recall(tmp_path / "kd" / "last.safetensors", toy_tensors)
    print(f"held-out recall@5/10: alone {alone:.3f}, distilled {taught:.3f}")
    assert taught > alone + 0.05

    # the report: parameters, throughput, the same metrics for both, retention
    assert json.loads((tmp_path / "kd" / "report.json").read_text()) == json.loads(
        json.dumps(report)
    )
    t, s = report["teacher"], report["student"]
    assert s["parameters"] < t["parameters"] and report["parameter_ratio"] < 1
    assert s["trained_parameters"] < s["parameters"]  # the text tower is the teacher's
    assert s["extract_rows_per_s"]["image"] > 0 and t["extract_rows_per_s"]["image"] > 0
    assert report["speedup"]["image"] > 0 and report["split"] == "test"
    key = "image-text/image_retrieval_recall@1"
    assert key in t["metrics"] and key in s["metrics"] and report["headline"]["metric"] == key
    if t["metrics"][key] > 0:
        assert report["retention"][key] == pytest.approx(
            s["metrics"][key] / t["metrics"][key], abs=1e-4
        )
    assert (tmp_path / "kd" / "teacher-cache").is_dir()

    # the student is an ordinary checkpoint: extract --model reads it
    r = cli(
        "extract",
        toy_tensors,
        "-o",
        tmp_path / "feats",
        "--model",
        tmp_path / "kd" / "model.safetensors",
    )
    assert r.exit_code == 0, r.stderr
    student = MultimodalModel.from_checkpoint(tmp_path / "kd" / "model.safetensors")
    assert student.config.extra["distill"]["teacher"]["path"] == str(teacher)
    assert student.out_dim("image") == 32  # in the teacher's joint space


def test_cached_teacher_equals_live_teacher(toy_tensors, teacher, tmp_path):
    """The cache is read by the rows the sampler picked: with several captions per item the
    runs with and without it train the same student."""
    losses = {"similarity": 1, "feature": 1, "contrastive": 1, "relational": 1}
    states = []
    for cache in (False, True):
        distill(
            [str(toy_tensors)],
            str(tmp_path / f"cache-{cache}"),
            DistillConfig(
                teacher=str(teacher),
                student=["derive:0.5"],
                losses=losses,
                captions_per_item=2,
                cache_teacher=cache,
                throughput_repeats=1,
            ),
            _loop(3),
            batch_size=12,
            device="cpu",
        )
        states.append(
            MultimodalModel.from_checkpoint(tmp_path / f"cache-{cache}" / "last.safetensors")
        )
    a, b = (m.state_dict() for m in states)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cross_modal_audio_lands_in_the_teacher_space(toy_tensors, teacher, tmp_path, cli):
    r = cli(
        "distill",
        toy_tensors,
        "--teacher",
        teacher,
        "-o",
        tmp_path / "audio",
        "--from",
        "image",
        "--to",
        "audio",
        "--student",
        "audio=melcnn:width=4,depth=2,dim=16",
        "--cache-teacher",
        "--max-steps",
        "30",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)  # stdout: the report, one JSON object
    assert report == json.loads((tmp_path / "audio" / "report.json").read_text())
    cm = report["cross_modal"]
    assert cm["from"] == "image" and cm["to"] == "audio"
    assert 0 <= cm["audio->text recall@1"] <= 1 and "audio->image recall@1" in cm
    assert report["headline"]["metric"] == "audio-text/text_retrieval_recall@1"
    # the student keeps the teacher's encoders (audio->text works with the teacher's text)
    student = MultimodalModel.from_checkpoint(tmp_path / "audio" / "model.safetensors")
    t = MultimodalModel.from_checkpoint(teacher)
    assert set(student.modalities) == {"image", "text", "audio"}
    for k, v in t.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, msg=k)
    # and audio landed near the paired images: well above chance (an untrained audio
    # encoder scores 0.13-0.15 here) on the training items
    from mmcli.train.evaluation import evaluate_model

    data = fuse_setup_data([str(toy_tensors)], None, FuseConfig(pairs=[("image", "audio")]))
    train = data.dataset.subset("train")
    m = evaluate_model(student, data.dataset, train, [("image", "audio")])
    assert m["image-audio/mean_recall@10"] > 1.5 * 10 / len(train)


class _Interrupt(DistillTask):
    stop_at = 5

    def forward(self, batch):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen == self.stop_at:
            raise KeyboardInterrupt
        return super().forward(batch)


def test_resume_mid_epoch_equals_uninterrupted(toy_tensors, teacher, tmp_path, monkeypatch):
    cfg = dict(teacher=str(teacher), student=["derive:0.5"], cache_teacher=True)

    def run(name, resume=False):
        torch.manual_seed(0)
        return distill(
            [str(toy_tensors)],
            str(tmp_path / name),
            DistillConfig(**cfg, throughput_repeats=1),
            LoopConfig(epochs=2, lr=3e-3, save_every=2, log_every=1),
            batch_size=12,
            device="cpu",
            resume=resume,
        )

    run("full")
    monkeypatch.setattr(distill_recipe, "DistillTask", _Interrupt)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    monkeypatch.setattr(distill_recipe, "DistillTask", DistillTask)
    saved = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["step"] == 4
    run("cut", resume=True)
    a = MultimodalModel.from_checkpoint(tmp_path / "full" / "last.safetensors").state_dict()
    b = MultimodalModel.from_checkpoint(tmp_path / "cut" / "last.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert_same_losses(full, cut)


def test_kd_wiring_on_a_classifier_teacher(toy_tensors, tmp_path):
    """kd and ce are computed on the fused embedding's logits of student and teacher."""
    fcfg = FuseConfig(
        encoders={"image": "tiny", "text": "tiny"},
        embed_dim=16,
        objectives={"contrastive": 1.0, "classify": 1.0},
        fusion="concat",
        pairs=[("image", "text")],
    )
    torch.manual_seed(0)
    fuse_setup_model(fuse_setup_data([str(toy_tensors)], None, fcfg), fcfg).to_checkpoint(
        tmp_path / "t.safetensors"
    )
    teacher = D.load_teacher(str(tmp_path / "t.safetensors"), torch.device("cpu"))
    cfg = DistillConfig(
        teacher=str(tmp_path / "t.safetensors"),
        student=["derive:0.5"],
        losses={"kd": 0.7, "ce": 0.3},
        temperature=2.0,
    )
    data = setup_data([str(toy_tensors)], None, cfg, teacher)
    student = setup_student(data, cfg, teacher)
    assert student.model.classifier is not None and student.model.fusion_kind == "concat"
    task = DistillTask(student, teacher, cfg, data)
    batch = BatchSampler(data.dataset, data.train, 8, seed=0, modalities=data.modalities)
    batch = batch.make_batch(0, 0)
    loss, logs = task(batch)
    with torch.no_grad():
        s, t = student.model, teacher
        s_logits = s.classifier(s.fuse({m: batch.data[m] for m in ("image", "text")}))
        t_logits = t.classifier(t.fuse({m: batch.data[m] for m in ("image", "text")}))
    assert logs["kd"] == pytest.approx(kd_loss(s_logits, t_logits, 2.0).item(), rel=1e-5)
    assert logs["ce"] == pytest.approx(classify_loss(s_logits, batch.labels).item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * logs["kd"] + 0.3 * logs["ce"], rel=1e-6)


def test_ddp_two_processes_equal_one(toy_tensors, teacher, tmp_path):
    """2 processes x batch 6 == 1 process x batch 12 (gloo on the CPU), teacher cache included."""
    common = [
        "distill",
        str(toy_tensors),
        "--teacher",
        str(teacher),
        "--student",  # no batch norm: per-rank statistics would differ
        "image=tiny",
        "--student",
        "text=bow:dim=8",
        "--cache-teacher",
        "--loss",
        "similarity=1,feature=1,contrastive=1,relational=1",
        "--max-steps",
        "2",
        "--device",
        "cpu",
        "--lr",
        "5e-3",
        "-q",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "mmcli", *common, "-o", str(tmp_path / "one"), "--batch-size", "12"],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr.decode()
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29527",
            "-m",
            "mmcli",
            *common,
            "-o",
            str(tmp_path / "two"),
            "--batch-size",
            "6",
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr.decode()
    assert len(two.stdout.decode().strip().splitlines()) == 1  # rank 0 reports
    a = MultimodalModel.from_checkpoint(tmp_path / "one" / "last.safetensors").state_dict()
    b = MultimodalModel.from_checkpoint(tmp_path / "two" / "last.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------- bad input


def test_bad_inputs(cli, toy_tensors, teacher, tmp_path):
    def run(*args):
        r = cli("distill", toy_tensors, "-o", tmp_path / "r", "--max-steps", "1", *args)
        return r.exit_code, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""

    t = ["--teacher", teacher]
    code, err = run(*t, "--test-split", "nope")
    assert code == 2 and "the 'nope' split is empty" in err
    code, err = run(*t, "--temperature", "0")
    assert code == 2 and "--temperature must be positive, got 0.0" in err
    code, err = run(*t, "--loss", "similarity,magic")
    assert code == 2 and err.endswith(
        "unknown loss 'magic'; known losses: kd, ce, feature, similarity, contrastive, relational"
    )
    code, err = run(*t, "--from", "depth", "--to", "audio")
    assert code == 2 and "--from depth: the teacher has no depth encoder" in err
    code, err = run(*t, "--student", "audio=tiny")
    assert code == 2 and "--student audio=...: the teacher has no audio encoder" in err
    code, err = run(*t, "--loss", "kd")
    assert (
        code == 2 and "the kd loss distils a classification head, and the teacher has none" in err
    )
    code, err = run("--teacher", tmp_path / "nope.safetensors")
    assert code == 2 and "teacher checkpoint not found" in err
    # a student checkpoint of another width, and no projector allowed
    other = tmp_path / "other.safetensors"
    fcfg = FuseConfig(
        pairs=[("image", "text")], encoders={"image": "tiny", "text": "tiny"}, embed_dim=16
    )
    fuse_setup_model(fuse_setup_data([str(toy_tensors)], None, fcfg), fcfg).to_checkpoint(other)
    code, err = run(*t, "--student", other, "--no-projector")
    assert code == 2 and "the teacher embeds image in 32 dims and the student in 16" in err
    # an end-to-end teacher on feature files (what extract writes)
    from mmcli.extract import extract

    extract(str(toy_tensors), tmp_path / "feats", None, encoders={"image": "tiny", "text": "tiny"})
    r = cli("distill", tmp_path / "feats", *t, "-o", tmp_path / "r", "--max-steps", "1")
    assert r.exit_code == 2 and "the image encoder takes uint8 [rows, 3, H, W]" in r.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_bf16_throughput_on_the_cpu_times_bfloat16_copies(toy_tensors, teacher):
    """The report's encode speed at --precision bf16 on the CPU is that of the models cast
    to bfloat16 (what extract runs), not fp32 under a no-op context; the models given stay
    float32."""
    from mmcli.train.data import load_dataset

    model = MultimodalModel.from_checkpoint(teacher)
    ds = load_dataset([str(toy_tensors)])
    seen = []
    model.encoders["image"].register_forward_hook(
        lambda mod, args, out: seen.append(next(mod.parameters()).dtype)
    )
    items = np.arange(8)
    cpu = torch.device("cpu")
    kw = dict(batch_size=4, max_rows=8, repeats=1, device=cpu)
    rates = D.encode_throughput({"m": model}, {"m": "image"}, ds, items, **kw, precision="bf16")
    assert set(seen) == {torch.bfloat16} and len(seen) == 3  # warm-up + 2 batches
    assert rates["m"]["precision"] == "bf16" and rates["m"]["rows"] == 8
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen.clear()
    D.encode_throughput({"m": model}, {"m": "image"}, ds, items, **kw, precision="fp32")
    assert set(seen) == {torch.float32}
