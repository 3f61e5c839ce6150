"""fuse-train: learning, resume, DDP equivalence, fusion, checkpoints, bad input."""

import json

import numpy as np
import pytest
import torch
from metric_logs import assert_same_losses, assert_torchrun_equals_one

from mmcli.errors import BadInput, RunFailure
from mmcli.models import MultimodalModel
from mmcli.train.fuse import FuseConfig, FuseTask, fuse_train, setup_data, setup_model
from mmcli.train.loop import LoopConfig, fit
from mmcli.train.sampler import BatchSampler
from mmcli.train.state import RunDir

SMALL = {"image": "convnet:width=8,depth=2,dim=32", "text": "transformer:width=32,depth=1,heads=2"}


def _cfg(**kw):
    return FuseConfig(pairs=[("image", "text")], encoders=dict(SMALL), embed_dim=32, **kw)


def test_training_lowers_loss_and_raises_recall(toy_tensors, tmp_path):
    from mmcli.train.evaluation import evaluate_model

    data = setup_data([str(toy_tensors)], None, _cfg())
    key = "image-text/mean_recall@5"
    before = evaluate_model(setup_model(data, _cfg()).eval(), data.dataset, data.train, data.pairs)[
        key
    ]
    summary = fuse_train(
        [str(toy_tensors)],
        str(tmp_path / "run"),
        _cfg(),
        LoopConfig(epochs=30, lr=3e-3, log_every=1),
        batch_size=16,
        device="cpu",
    )
    logs = [
        r
        for r in RunDir(
            tmp_path / "run",
            command="fuse-train",
            args={},
            resume=True,
            overwrite=False,
            is_main=False,
        ).metrics()
        if "loss" in r
    ]
    assert np.mean([r["loss"] for r in logs[-5:]]) < 0.85 * np.mean([r["loss"] for r in logs[:5]])
    # the last model reloads with no code and retrieves the items it trained on far better
    last = MultimodalModel.from_checkpoint(tmp_path / "run" / "last.safetensors")
    after = evaluate_model(last, data.dataset, data.train, data.pairs)[key]
    assert after > before + 0.3 and after > 3 * before
    # the kept model is the best on validation
    best = MultimodalModel.from_checkpoint(tmp_path / "run" / "model.safetensors")
    val = evaluate_model(best, data.dataset, data.val, data.pairs)[key]
    assert val == pytest.approx(summary["best_metrics"][key])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["command"] == "fuse-train"


class _Interrupt(FuseTask):
    """A task that is 'killed' (KeyboardInterrupt) when it reaches a given batch."""

    stop_at = 7

    def forward(self, batch):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen == self.stop_at:
            raise KeyboardInterrupt
        return super().forward(batch)


def _run(toy_tensors, run_dir, task_cls, resume=False, fusion="attention", steps=None):
    torch.manual_seed(0)
    objectives = {"contrastive": 1.0, "match": 0.5} if fusion != "none" else {"contrastive": 1.0}
    cfg = _cfg(fusion=fusion, objectives=objectives)
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg)
    task = task_cls(model, cfg, data, seed=0)
    sampler = BatchSampler(data.dataset, data.train, 12, seed=0, modalities=data.modalities)
    loop = LoopConfig(epochs=2, lr=2e-3, save_every=2, log_every=1, max_steps=steps)
    run = RunDir(run_dir, command="fuse-train", args={}, resume=resume, overwrite=False)
    fit(task, sampler, loop, run, device=torch.device("cpu"), resume=resume)
    return model


def test_resume_mid_epoch_equals_uninterrupted(toy_tensors, tmp_path):
    full = _run(toy_tensors, tmp_path / "full", FuseTask)
    with pytest.raises(KeyboardInterrupt):
        _run(toy_tensors, tmp_path / "cut", _Interrupt)
    saved = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["step"] == 6  # killed during step 7, mid-epoch (6 steps of 12 per epoch... )
    resumed = _run(toy_tensors, tmp_path / "cut", FuseTask, resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(full_log) == len(cut_log)
    assert_same_losses(full_log, cut_log)


class _Diverge(FuseTask):
    def forward(self, batch):
        loss, logs = super().forward(batch)
        self.n = getattr(self, "n", 0) + 1
        if self.n >= 5:
            loss = loss * float("nan")
            logs["loss"] = float("nan")
        return loss, logs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_tensors, tmp_path):
    with pytest.raises(
        RunFailure, match=r"the loss became nan at step 5 .*last good checkpoint .*step 4"
    ):
        _run(toy_tensors, tmp_path / "nan", _Diverge, fusion="none")
    from mmcli.train.state import load_state

    state = load_state(tmp_path / "nan" / "state.safetensors")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["task"].values() if v.is_floating_point())


def test_attention_fusion_with_a_missing_modality(toy_tensors):
    cfg = FuseConfig(
        encoders={**SMALL, "audio": "tiny"},
        embed_dim=32,
        fusion="attention",
        objectives={"contrastive": 1.0, "classify": 1.0, "match": 1.0},
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg)
    sampler = BatchSampler(data.dataset, data.train, 8, seed=0, modalities=data.modalities)
    batch = sampler.make_batch(0, 0)
    batch.present["audio"][:4] = False  # half the items have no audio
    batch.present["text"][0] = False  # and one has no caption
    task = FuseTask(model, cfg, data)
    loss, logs = task(batch)
    loss.backward()
    assert torch.isfinite(loss) and {"contrastive", "classify", "match"} <= set(logs)
    grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # an item with only an image still gets a fused embedding; missing audio changes it
    x = {m: batch.data[m][:2] for m in ("image", "text", "audio")}
    with torch.no_grad():
        model.eval()
        full = model.fuse(x)
        no_audio = model.fuse({m: x[m] for m in ("image", "text")})
        masked = model.fuse(x, {"audio": torch.tensor([False, False])})
    assert full.shape == (2, 32) and torch.allclose(full.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(no_audio, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, no_audio)


def test_checkpoint_round_trip_with_fusion_and_heads(toy_tensors, tmp_path):
    cfg = FuseConfig(
        encoders={**SMALL, "audio": "tiny"},
        embed_dim=32,
        fusion="attention",
        objectives={"contrastive": 1.0, "classify": 1.0, "match": 1.0},
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg).eval()
    model.to_checkpoint(tmp_path / "m.safetensors")
    back = MultimodalModel.from_checkpoint(tmp_path / "m.safetensors")
    batch = BatchSampler(data.dataset, data.train, 4, seed=0).make_batch(0, 0)
    with torch.no_grad():
        for m in ("image", "text", "audio"):
            torch.testing.assert_close(
                model.encode(m, batch.data[m]), back.encode(m, batch.data[m])
            )
        torch.testing.assert_close(model.fuse(batch.data), back.fuse(batch.data))
    assert (
        back.classifier is not None and back.config.classifier["labels"] == data.dataset.label_names
    )


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_extract_writes_the_fused_table(toy_tensors, tmp_path, fusion):
    from mmcli.extract import extract
    from mmcli.formats.tensorfile import TensorSet

    cfg = FuseConfig(
        encoders={**SMALL, "audio": "tiny"},
        embed_dim=32,
        fusion=fusion,
        objectives={"contrastive": 1.0, "match": 1.0},
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg).eval()
    model.to_checkpoint(tmp_path / "m.safetensors")
    extract(str(toy_tensors), tmp_path / "feats", str(tmp_path / "m.safetensors"), dtype="float32")
    feats = TensorSet(tmp_path / "feats")
    assert feats.tables == ["image", "text", "audio", "fused"]
    fused, items = feats.table("fused")
    assert fused.shape == (feats.num_items, 32) and items.tolist() == list(range(feats.num_items))
    # item j fuses its image, its first caption and its audio
    src = TensorSet(toy_tensors)
    first_caption = [int(np.nonzero(src.table("text")[1].numpy() == j)[0][0]) for j in range(3)]
    with torch.no_grad():
        direct = model.fuse(
            {
                "image": src.table("image")[0][:3],
                "text": src.table("text")[0][first_caption],
                "audio": src.table("audio")[0][:3],
            }
        )
    torch.testing.assert_close(fused[:3], direct, atol=1e-4, rtol=1e-4)
    assert feats.spec("fused")["fusion"]["kind"] == fusion


def test_ddp_two_processes_equal_one(toy_tensors, tmp_path):
    """2 processes x batch 6 == 1 process x batch 12 (gloo on the CPU)."""
    common = [
        "fuse-train",
        str(toy_tensors),
        "--pairs",
        "image-text",
        "--encoder",
        "image=tiny",
        "--encoder",
        "text=tiny",
        "--embed-dim",
        "16",
        "--max-steps",
        "3",
        "--device",
        "cpu",
        "--lr",
        "5e-3",
        "-q",
        "--log-every",
        "1",
    ]
    assert_torchrun_equals_one(common, tmp_path, port=29517, batch=12)


# --------------------------------------------------------------------- bad input


def test_bad_inputs(cli, toy_tensors, tmp_path):
    def run(*args):
        r = cli("fuse-train", toy_tensors, "-o", tmp_path / "r", "--max-steps", "1", *args)
        return r.exit_code, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""

    code, err = run("--pairs", "image-depth")
    assert code == 2 and "--pairs asks for image-depth but the data has no depth" in err
    code, err = run("--batch-size", "1000")
    assert code == 2 and "batch size 1000 is larger than the" in err
    code, err = run("--train-split", "nope")
    assert code == 2 and "split is empty" in err and "the data's splits: test, train, val" in err
    code, err = run("--val-split", "nope", "--batch-size", "8")
    assert code == 2 and "the 'nope' split is empty" in err
    code, err = run("--objective", "magic")
    assert code == 2 and "unknown objective 'magic'" in err
    code, err = run("--best-metric", "foo", "--batch-size", "8")
    assert code == 2 and "--best-metric foo is not among the validation metrics" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    code, err = run()
    assert code == 2 and "run folder already holds other files" in err
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


def test_mixed_feature_dims_are_refused(tmp_path):
    from mmcli.formats.tensorfile import Shard, write_shard

    for name, dim in (("a", 8), ("b", 16)):
        write_shard(
            tmp_path / f"{name}.safetensors",
            Shard(
                ids=["x", "y"],
                tables={"image": np.zeros((2, dim), np.float32)},
                items={"image": np.arange(2)},
            ),
            kind="features",
            specs={"image": {"encoder": name, "dim": dim}},
        )
    with pytest.raises(BadInput, match="two inputs both hold a image table|differ"):
        setup_data(
            [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], None, FuseConfig()
        )


def test_batch_with_keeps_partners_together_and_hard_negatives_are_sampled(toy_tensors):
    cfg = _cfg(hard_negatives="swap_text", batch_with="swap_id")
    data = setup_data([str(toy_tensors)], None, cfg)
    ds = data.dataset
    sampler = BatchSampler(
        ds, data.train, 8, seed=0, modalities=data.modalities, batch_with="swap_id"
    )
    pos = {ds.ids[i]: i for i in data.train}
    order = sampler._order(0).tolist()
    partners = 0
    for k, i in enumerate(order):
        other = pos.get(ds.manifest[ds.ids[i]].get("swap_id"))
        if other is not None:
            partners += 1
            assert other in order[max(0, k - 1) : k + 2]  # adjacent in the permutation
    assert partners > 0
    assert sorted(order) == sorted(data.train.tolist())  # still every item once
    batch = sampler.make_batch(0, 0)
    has = batch.present["text_neg"]
    assert has.any()
    from mmcli.data.text import ByteTokenizer

    tok = ByteTokenizer(ds.spec("text")["context_length"])
    j = int(has.nonzero()[0][0])
    swap = ds.manifest[ds.ids[int(batch.items[j])]]["swap_text"]
    assert tok.decode(batch.data["text_neg"][j].tolist()) == swap
    task = FuseTask(setup_model(data, cfg), cfg, data)
    loss, logs = task(batch)
    assert torch.isfinite(loss)
    with pytest.raises(BadInput, match="no item has a 'nope' field"):
        ds.attach_hard_negatives("nope")


def test_match_score_is_the_scaled_cosine_plus_the_fusion_correction(toy_tensors):
    cfg = FuseConfig(
        encoders=SMALL, embed_dim=32, fusion="attention", objectives={"contrastive": 1, "match": 1}
    )
    data = setup_data([str(toy_tensors)], None, cfg)
    model = setup_model(data, cfg).eval()
    batch = BatchSampler(data.dataset, data.train, 6, seed=0).make_batch(0, 0)
    toks, emb = {}, {}
    for m in ("image", "text"):
        pooled, tok, mask = model.encoders[m].forward_tokens(batch.data[m][:6])
        toks[m] = (tok, mask)
        emb[m] = torch.nn.functional.normalize(model.heads[m](pooled), dim=-1)
    scale = model.logit_scale.exp()
    cos = (emb["image"] * emb["text"]).sum(-1)
    # the head starts at zero: matching starts exactly at the joint space's score
    torch.testing.assert_close(model.match_score((toks, emb)), scale * cos)
    with torch.no_grad():
        model.matcher.weight.normal_()
    _, state = model.fuse_parts(toks, emb)
    score = model.match_score((toks, emb))
    torch.testing.assert_close(score, scale * cos + model.matcher(state).squeeze(-1))
    # the cosine term is held fixed: no gradient reaches the embeddings through it
    e = {m: v.detach().requires_grad_() for m, v in emb.items()}
    model.match_score(({m: (t.detach(), k) for m, (t, k) in toks.items()}, e)).sum().backward()
    assert e["image"].grad is None or not e["image"].grad.any()


def test_validation_recall_breaks_ties_like_eval_not_in_the_querys_favour():
    """A collapsed model (every embedding equal) must score at chance, not perfectly: the
    validation metrics (best-checkpoint choice, distill's report) use eval's tie rule."""
    from mmcli.train.evaluation import _ranks

    items = np.arange(6)
    flat = torch.ones(6, 4)
    a_to_b, b_to_a = _ranks(flat, items, flat, items, (1, 5))
    # ties go to the candidate of the lowest item: only item 0 is ranked first
    assert a_to_b == b_to_a == {"recall@1": 1 / 6, "recall@5": 5 / 6}
    sharp = torch.eye(6)
    assert _ranks(sharp, items, sharp, items, (1,))[0] == {"recall@1": 1.0}


def test_resume_with_other_arguments_is_refused(cli, toy_tensors, tmp_path):
    def run(embed_dim="16", *extra):
        return cli("fuse-train", toy_tensors, "-o", tmp_path / "r", "--encoder", "image=tiny",
                   "--encoder", "text=tiny", "--embed-dim", embed_dim, "--max-steps", "2",
                   "-q", *extra)  # fmt: skip

    assert run("16", "--batch-size", "8").exit_code == 0
    for embed_dim, extra, named in (
        ("16", ["--batch-size", "16"], "batch_size: 8 -> 16"),
        ("16", ["--batch-size", "8", "--fusion", "attention"], "fuse.fusion: none -> attention"),
        ("32", ["--batch-size", "8"], "fuse.embed_dim: 16 -> 32"),
    ):
        r = run(embed_dim, *extra, "--resume")
        assert r.exit_code == 2, r.stderr
        assert "cannot resume with other arguments than the run's" in r.stderr
        assert named in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("16", "--batch-size", "8", "--resume", "--overwrite")
    assert r.exit_code == 2 and "--resume and --overwrite: choose one" in r.stderr
    # the same arguments (and another logging interval) resume
    r = run("16", "--batch-size", "8", "--log-every", "5", "--resume")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("fusion", ["attention", "none"])
def test_eval_classify_on_what_extract_wrote_for_an_end_to_end_model(
    cli, toy_tensors, tmp_path, fusion
):
    """`eval --task classify` on `extract --model` output of an end-to-end classifier: the
    label head reads the fused table (or, without a fusion module, the mean of the joint
    rows) and agrees with the head on the model's own forward pass of the raw rows."""
    from mmcli.train.evaluation import _accuracy

    cfg = _cfg(fusion=fusion, objectives={"contrastive": 1.0, "classify": 1.0})
    fuse_train([str(toy_tensors)], str(tmp_path / "run"), cfg,
               LoopConfig(epochs=1, max_steps=6, lr=3e-3), batch_size=16, device="cpu")  # fmt: skip
    ckpt = tmp_path / "run" / "last.safetensors"
    r = cli("extract", toy_tensors, "-o", tmp_path / "joint", "--model", ckpt,
            "--dtype", "float32", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("eval", tmp_path / "joint", "--task", "classify", "--model", ckpt, "-q")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    model = MultimodalModel.from_checkpoint(ckpt).eval()
    data = setup_data([str(toy_tensors)], None, cfg)
    everything = np.arange(len(data.dataset.ids))
    want = _accuracy(model, data.dataset, everything, 64)["acc1"]
    assert got["metrics"]["acc1"] == pytest.approx(want)


def test_binding_accuracy_reuses_the_validation_embeddings_exactly(toy_tensors):
    """evaluate_model hands its embeddings to the binding check (no second pass over the
    same rows): the same figures as the binding check encoding on its own."""
    from mmcli.train.evaluation import binding_accuracy, embed_rows, evaluate_model

    data = setup_data([str(toy_tensors)], None, _cfg())
    model = setup_model(data, _cfg()).eval()
    items = data.dataset.subset(None)
    alone = binding_accuracy(model, data.dataset, items)
    assert alone["binding/pairs"] > 0

    def embedded(m):
        emb, owner, _ = embed_rows(model, data.dataset, items, m)
        return emb, owner

    assert binding_accuracy(model, data.dataset, items, embedded=embedded) == pytest.approx(alone)
    assert {k: v for k, v in evaluate_model(model, data.dataset, items, data.pairs).items()
            if k.startswith("binding/")} == pytest.approx(alone)  # fmt: skip


def test_the_default_encoders_are_the_measured_small_ones(toy_tensors):
    """No --encoder: the encoders bench_defaults.py chose (docs/fuse-train.md), the
    convnet's stem stride following the image size (~32 px after the stem)."""
    from mmcli.modalities import train_encoder

    assert train_encoder("image", (3, 64, 64)) == "convnet:width=16,grid=4,stem_stride=2"
    assert train_encoder("image", (3, 224, 224)) == "convnet:width=16,grid=4,stem_stride=7"
    assert train_encoder("text") == "transformer:width=128,depth=2"
    cfg = FuseConfig(pairs=[("image", "text")])
    model = setup_model(setup_data([str(toy_tensors)], None, cfg), cfg)
    image, text = model.config.encoders["image"], model.config.encoders["text"]
    assert image["name"] == "convnet" and text["name"] == "transformer"
    assert (image["config"]["width"], image["config"]["grid"]) == (16, 4)
    assert image["config"]["stem_stride"] == 1  # the toy tensors are 32 px
    assert (text["config"]["width"], text["config"]["depth"]) == (128, 2)
