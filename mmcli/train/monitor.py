"""What a run watches as it trains: the best validation figure, how long since it last
improved (``--early-stop``), and what a person reads on stderr (a smoothed loss for the
progress bar, one short line per epoch)."""

from __future__ import annotations

import logging
import time
from typing import Any

from mmcli.train.schedule import is_better

log = logging.getLogger("mmcli")


def short_metric(key: str) -> str:
    """``image-text/mean_recall@1`` -> ``R@1`` (a person's name for a validation metric)."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("mean_recall@"):
        return "R@" + name.removeprefix("mean_recall@")
    return name


class Monitor:
    def __init__(self, epochs: int, best_metric: str | None, patience: int | None):
        self.epochs = epochs  # epochs the run will (start to) train
        self.best_metric = best_metric
        self.patience = patience
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.stale = 0  # evaluations since the best metric last improved
        self.stopped_early = False
        self.smooth: float | None = None
        self.epoch_losses: list[float] = []
        self.epoch_started = time.perf_counter()

    # -- resumable state ------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_metrics": self.best_metrics, "stale": self.stale}

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_metrics = state.get("best"), state.get("best_metrics", {})
        self.stale = state.get("stale", 0)

    # -- validation -------------------------------------------------------------------
    def key(self, metrics: dict[str, float]) -> str:
        return self.best_metric or next(iter(metrics))

    def improved(self, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the best so far."""
        key = self.key(metrics)
        if is_better(metrics[key], self.best, key):
            self.best, self.best_metrics = metrics[key], dict(metrics)
            self.stale = 0
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        if not self.patience or self.stale < self.patience:
            return False
        key = self.best_metric or next(iter(self.best_metrics), "")
        log.info(
            "early stop: %s has not improved for %d evaluations (best %.4f)",
            key,
            self.stale,
            self.best if self.best is not None else float("nan"),
        )
        self.stopped_early = True
        return True

    # -- what a person reads -----------------------------------------------------------
    def step(self, loss: float) -> None:
        self.epoch_losses.append(loss)
        self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss

    def bar_fields(self, epoch: int, lr: float, rate: float) -> dict[str, Any]:
        fields: dict[str, Any] = {"epoch": f"{epoch + 1}/{self.epochs}", "loss": self.smooth}
        fields["lr"] = lr
        if rate:
            fields["samples/s"] = round(rate)
        return fields

    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> None:
        """``epoch 3/30  loss 2.31  val R@1 0.420 (best 0.450)  12.3 s``"""
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        if self.epoch_losses:
            parts.append(f"loss {sum(self.epoch_losses) / len(self.epoch_losses):.4g}")
        if metrics and self.key(metrics) in metrics and self.best is not None:
            key = self.key(metrics)
            parts.append(f"val {short_metric(key)} {metrics[key]:.3f} (best {self.best:.3f})")
        parts.append(f"{time.perf_counter() - self.epoch_started:.1f} s")
        log.info("  ".join(parts))
        self.epoch_losses = []
        self.epoch_started = time.perf_counter()
