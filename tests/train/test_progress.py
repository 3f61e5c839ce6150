"""What a person sees of a training run: one short line per epoch, the progress bar's
fields, --early-stop, and RUN/curves.png."""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from mmcli.errors import BadInput
from mmcli.train.fuse import FuseConfig, fuse_train
from mmcli.train.loop import LoopConfig
from mmcli.train.monitor import Monitor, short_metric

TINY = {"image": "tiny", "text": "tiny"}
EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  loss [0-9.e+-]+(  val R@1 [0-9.]+ \(best [0-9.]+\))?  [0-9.]+ s$"
)


def _train(tensors, run, caplog, *, val_split=None, **loop):
    cfg = FuseConfig(
        pairs=[("image", "text")], encoders=dict(TINY), embed_dim=16, val_split=val_split
    )
    with caplog.at_level(logging.INFO, logger="mmcli"):
        summary = fuse_train(
            [str(tensors)], str(run), cfg, LoopConfig(**loop), batch_size=16, device="cpu"
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    return summary, lines


def test_one_short_line_per_epoch_with_the_best_metric(toy_tensors, tmp_path, caplog):
    summary, lines = _train(toy_tensors, tmp_path / "r", caplog, epochs=3, lr=1e-2)
    assert len(lines) == 3, lines
    for i, line in enumerate(lines, 1):
        m = EPOCH_LINE.match(line)
        assert m, line
        assert (int(m.group(1)), int(m.group(2))) == (i, 3)
        assert "val R@1" in line and len(line) < 90
    best = summary["best_metrics"]["image-text/mean_recall@1"]
    assert lines[-1].split("(best ")[1].startswith(f"{best:.3f}")


def test_a_line_per_epoch_without_validation(toy_tensors, tmp_path, caplog):
    _, lines = _train(toy_tensors, tmp_path / "r", caplog, val_split="none", epochs=2, lr=1e-2)
    assert len(lines) == 2 and all(EPOCH_LINE.match(x) and "val" not in x for x in lines), lines


def test_early_stop_when_the_metric_stops_improving(toy_tensors, tmp_path, caplog):
    # a learning rate this small leaves the model (and so its validation recall) unchanged:
    # the first evaluation is the best, the next two do not improve on it
    summary, lines = _train(
        toy_tensors, tmp_path / "r", caplog, epochs=10, lr=1e-12, warmup=0, early_stop=2
    )
    assert summary["stopped_early"] is True
    assert summary["epochs"] == 3 and len(lines) == 3
    assert any("early stop" in r.getMessage() for r in caplog.records)
    evals = [
        json.loads(x)
        for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in x
    ]
    assert len(evals) == 3


def test_no_early_stop_by_default(toy_tensors, tmp_path, caplog):
    summary, lines = _train(toy_tensors, tmp_path / "r", caplog, epochs=3, lr=1e-12, warmup=0)
    assert summary["stopped_early"] is False and summary["epochs"] == 3 and len(lines) == 3


def test_early_stop_must_be_positive():
    with pytest.raises(BadInput, match="--early-stop"):
        LoopConfig(early_stop=0)


def test_curves_png_is_written_with_the_run(toy_tensors, tmp_path, caplog):
    pytest.importorskip("matplotlib")
    _train(toy_tensors, tmp_path / "r", caplog, epochs=2, lr=1e-2, log_every=1)
    png = tmp_path / "r" / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 200
        # not a blank canvas: lines were drawn
        assert len(np.unique(np.asarray(im.convert("L")))) > 20


def test_the_bar_shows_epoch_smoothed_loss_lr_and_rate():
    mon = Monitor(epochs=5, best_metric=None, patience=None)
    for loss in (4.0, 2.0):
        mon.step(loss)
    fields = mon.bar_fields(epoch=1, lr=1e-3, rate=123.4)
    assert fields["epoch"] == "2/5" and fields["lr"] == 1e-3 and fields["samples/s"] == 123
    assert fields["loss"] == pytest.approx(0.9 * 4.0 + 0.1 * 2.0)  # exponential smoothing


def test_short_metric_names():
    assert short_metric("image-text/mean_recall@1") == "R@1"
    assert short_metric("acc1") == "acc1"


class _Recorder:
    def __init__(self):
        self.updates = []

    def update(self, n=1, **fields):
        self.updates.append((n, fields))


def test_the_loop_feeds_the_bar_every_step(toy_tensors, tmp_path, caplog):
    rec = _Recorder()

    @contextmanager
    def progress(description="", total=None, unit="it"):
        rec.total = total
        yield rec

    cfg = FuseConfig(pairs=[("image", "text")], encoders=dict(TINY), embed_dim=16)
    summary = fuse_train(
        [str(toy_tensors)],
        str(tmp_path / "r"),
        cfg,
        LoopConfig(epochs=2, lr=1e-2),
        batch_size=16,
        device="cpu",
        progress=progress,
    )
    steps = [f for n, f in rec.updates if n == 1]
    assert len(steps) == summary["steps"] == rec.total
    assert steps[0]["epoch"] == "1/2" and steps[-1]["epoch"] == "2/2"
    assert all({"loss", "lr"} <= set(f) for f in steps)
