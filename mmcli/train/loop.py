"""The one training loop, shared by ``fuse-train`` and ``distill``.

A *task* (an ``nn.Module``) turns a :class:`~mmcli.train.data.Batch` into a loss; the
loop does everything else: AdamW with weight-decay groups, warmup + cosine schedule,
gradient accumulation and clipping, autocast (bf16/fp16 with a grad scaler on CUDA),
DDP under torchrun, evaluation every epoch with the best model kept, metrics as JSONL,
atomic checkpoints every N steps, exact mid-epoch resume, and a clean stop on a NaN/inf
loss that keeps the last good checkpoint.

    summary = fit(task, sampler, LoopConfig(epochs=10), run_dir, device=device)

A recipe (``mmcli.train.fuse``, ``mmcli.train.distill``; see :mod:`mmcli.train.recipe`)
builds the task and the sampler and hands them to :func:`fit`; :class:`Task` is everything the
loop asks of a task (:class:`mmcli.train.task.JointTask` implements all but ``forward``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mmcli.errors import BadInput, RunFailure
from mmcli.progress import ProgressFactory, null_progress
from mmcli.runtime import (
    DistInfo,
    Prefetch,
    autocast,
    dist_info,
)
from mmcli.train.gradcache import GradCache, uses_cache
from mmcli.train.monitor import Monitor
from mmcli.train.sampler import Batch, BatchSampler
from mmcli.train.schedule import decay_groups, lr_at
from mmcli.train.state import (
    BEST_FILE,
    LAST_FILE,
    STATE_FILE,
    RunDir,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)

log = logging.getLogger("mmcli")


@dataclass
class LoopConfig:
    epochs: int = 10
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # a fraction of all steps (< 1) or a number of steps
    min_lr: float = 0.0  # as a fraction of lr at the end of the cosine
    grad_clip: float | None = 1.0
    accum_steps: int = 1  # coupled losses: the gradient cache (mmcli.train.gradcache)
    grad_checkpointing: bool = False
    precision: str = "fp32"
    log_every: int = 10
    save_every: int | None = None  # optimizer steps (checkpoints are also written every epoch)
    eval_every: int = 1  # epochs
    best_metric: str | None = None  # the validation metric that picks model.safetensors
    early_stop: int | None = None  # stop when the best metric has not improved N evaluations
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise BadInput("--lr must be positive")
        if self.epochs < 1 and not self.max_steps:
            raise BadInput("--epochs must be at least 1")
        if self.accum_steps < 1:
            raise BadInput("--accum-steps must be at least 1")
        if self.early_stop is not None and self.early_stop < 1:
            raise BadInput("--early-stop must be at least 1 (evaluations without improvement)")


class Task(Protocol):
    """What the loop needs from a recipe's task (an ``nn.Module``)."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]: ...
    def metric_names(self) -> list[str] | None: ...  # None: the task does not validate
    def evaluate(self) -> dict[str, float]: ...
    def after_step(self) -> None: ...  # after each optimizer step (e.g. clamp a temperature)
    def set_grad_checkpointing(self) -> None: ...  # --grad-checkpointing
    def save_model(self, path: Any, **meta: Any) -> None: ...


__all__ = ["LoopConfig", "Task", "decay_groups", "fit", "lr_at"]


def _plan(sampler: BatchSampler, cfg: LoopConfig) -> int:
    """The number of optimizer steps of the run (checks one epoch has a whole step)."""
    micro_per_epoch = sampler.steps_per_epoch()
    per_epoch = micro_per_epoch // cfg.accum_steps
    if per_epoch < 1:
        raise BadInput(
            f"one epoch has {micro_per_epoch} batches, fewer than --accum-steps {cfg.accum_steps}",
            hint="lower --accum-steps or --batch-size",
        )
    return cfg.max_steps or cfg.epochs * per_epoch


def _check_task(task: Task, cfg: LoopConfig) -> list[dict[str, Any]]:
    """The parameter groups, once the task is known to train something and to report the
    chosen best metric."""
    groups = task.param_groups(cfg.weight_decay)
    if not groups:
        raise BadInput("nothing to train: every parameter is frozen")
    names = task.metric_names()
    if cfg.best_metric and names is not None and cfg.best_metric not in names:
        raise BadInput(
            f"--best-metric {cfg.best_metric} is not among the validation metrics",
            hint=f"pick one of {', '.join(names)}",
        )
    return groups


class _Fit:
    """One call of :func:`fit`: the optimizer, the position (step, epoch, micro-batch), the
    best validation figure, and the steps of the loop as small methods."""

    def __init__(self, task, sampler, cfg, run, groups, *, device, progress, train_args):
        self.task, self.sampler, self.cfg, self.run = task, sampler, cfg, run
        self.device, self.progress = device, progress
        self.train_args = train_args or {}
        self.dist: DistInfo = dist_info()
        self.total = _plan(sampler, cfg)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        fp16 = cfg.precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.step = self.epoch = self.micro = 0
        per_epoch = sampler.steps_per_epoch() // cfg.accum_steps
        self.monitor = Monitor(-(-self.total // per_epoch), cfg.best_metric, cfg.early_stop)
        self.last_loss = float("nan")
        self.last_eval: dict[str, float] = {}
        self.samples, self.wait = 0, 0.0
        # micro-batches per epoch that end in an optimizer step
        self.usable = (sampler.steps_per_epoch() // cfg.accum_steps) * cfg.accum_steps
        self.module: nn.Module = task  # DDP-wrapped under torchrun, once the state is restored
        self.cache = None
        if uses_cache(task, cfg.accum_steps):  # the task's losses couple the batch's rows
            self.cache = GradCache(
                task, cfg.accum_steps, self.scaler, device, cfg.precision, self.dist
            )

    # -- state --------------------------------------------------------------------
    def restore(self) -> None:
        state = load_state(self.run.file(STATE_FILE))
        self.task.load_state_dict(state["task"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self.monitor.load(state)
        self.run.truncate_metrics(self.step)
        log.info(
            "resuming at step %d (epoch %d, batch %d of %d)",
            self.step,
            self.epoch + 1,
            self.micro,
            self.sampler.steps_per_epoch(),
        )
        if self.step >= self.total:
            log.info("the run already finished %d steps", self.total)

    def save(self, kind: str, metrics: dict[str, float] | None = None) -> None:
        """``best``: model.safetensors; ``state``: the resumable state and last.safetensors."""
        if not self.dist.is_main:
            return
        meta = {
            "train": self.train_args,
            "state": {"step": self.step, "epoch": self.epoch},
            "metrics": metrics or self.monitor.best_metrics,
        }
        if kind == "best":
            self.task.save_model(self.run.file(BEST_FILE), **meta)
            return
        save_state(
            self.run.file(STATE_FILE),
            {
                "task": self.task.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "step": self.step,
                "epoch": self.epoch,
                "micro": self.micro,
                **self.monitor.state(),
                "config": asdict(self.cfg),
            },
        )
        self.task.save_model(self.run.file(LAST_FILE), **meta)

    # -- validation ---------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            self.task.eval()
            # (CUDA: autocast; the CPU validates in fp32: its scores and ranks stay exact)
            with torch.no_grad(), autocast(self.device, self.cfg.precision):
                metrics = self.task.evaluate()
            self.task.train()
            if metrics:
                self._keep_best(metrics)
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        self.run.log({"step": self.step, "epoch": self.epoch + 1, "eval": metrics})
        key = self.monitor.key(metrics)
        if key not in metrics:
            raise BadInput(
                f"--best-metric {key} is not among the validation metrics",
                hint=f"pick one of {', '.join(metrics)}",
            )
        if self.monitor.improved(metrics):
            self.save("best", metrics)
        log.debug(
            "epoch %d: %s",
            self.epoch + 1,
            "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )

    # -- training -----------------------------------------------------------------
    def _wrap(self) -> None:
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(
                self.task,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

    def train(self) -> dict[str, Any]:
        self._wrap()
        self.task.train()
        started = time.perf_counter()
        with self.progress("train", total=self.total, unit="steps") as bar:
            bar.update(self.step)
            while self.step < self.total:
                self._epoch(bar)
                epoch_done = self.micro >= self.usable
                if epoch_done or self.step >= self.total:
                    evaluated = {}
                    if (self.epoch + 1) % self.cfg.eval_every == 0 or self.step >= self.total:
                        evaluated = self.last_eval = self.evaluate()
                    self.monitor.epoch_line(self.epoch, evaluated)
                    if epoch_done:
                        self.epoch, self.micro = self.epoch + 1, 0
                    self.save("state")
                    if evaluated and self.monitor.should_stop():
                        break
        seconds = time.perf_counter() - started
        if self.dist.is_main and not self.run.file(BEST_FILE).exists():
            self.save("best", self.last_eval)
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "seconds": round(seconds, 2),
            "samples_per_s": round(self.samples / seconds, 1) if seconds > 0 else None,
            "data_wait_fraction": round(self.wait / seconds, 4) if seconds > 0 else None,
            "final_loss": self.last_loss,
            "final_metrics": self.last_eval,
            "best_metrics": self.monitor.best_metrics,
            "stopped_early": self.monitor.stopped_early,
            "run_dir": str(self.run.path),
        }

    def _epoch(self, bar) -> None:
        """The rest of the current epoch (from micro-batch ``self.micro``), or until the run's
        last step."""
        cfg = self.cfg
        pin = self.device.type == "cuda"
        feed = Prefetch(lambda: self.sampler.batches(self.epoch, self.micro, self.usable, pin=pin))
        window = [time.perf_counter(), 0, 0.0]  # start, samples, last rate of the window
        accum: dict[str, float] = {}
        try:
            for index, batch in feed:
                self.micro = index + 1  # the next batch to run, if we stopped here
                last_micro = self.micro % cfg.accum_steps == 0
                self._backward(batch.to(self.device, non_blocking=True), last_micro, accum)
                if not last_micro:
                    continue
                lr = self._optimizer_step(accum)
                self._log_step(lr, accum, window, bar)
                accum.clear()
                if self.step >= self.total:
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save("state")
        finally:
            self.wait += feed.wait_seconds
            feed.close()

    def _backward(self, batch: Batch, last_micro: bool, accum: dict[str, float]) -> None:
        """Forward and backward of one micro-batch; its logs added into ``accum``."""
        if self.cache is not None:
            return self.cache.add(batch, last_micro, accum)
        n = self.cfg.accum_steps
        sync = (
            contextlib.nullcontext()
            if last_micro or not self.dist.enabled
            else self.module.no_sync()
        )
        with sync:
            with autocast(self.device, self.cfg.precision, training=True):
                loss, logs = self.module(batch)
            self.scaler.scale(loss / n).backward()
        for k, v in logs.items():
            accum[k] = accum.get(k, 0.0) + v / n

    def _optimizer_step(self, accum: dict[str, float]) -> float:
        """Clip, step, schedule; stop cleanly on a non-finite loss. Returns the step's lr."""
        cfg = self.cfg
        self.last_loss = accum.get("loss", float("nan"))
        if not math.isfinite(self.last_loss):
            raise RunFailure(
                f"the loss became {self.last_loss} at step {self.step + 1} (epoch {self.epoch + 1})",
                hint=f"the last good checkpoint is in {self.run.path} (step {_saved_step(self.run)}); "
                "lower --lr, or use --precision fp32",
            )
        if cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), cfg.grad_clip)
        lr = lr_at(self.step, self.total, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.task.after_step()
        self.step += 1
        return lr

    def _log_step(self, lr: float, accum: dict[str, float], window: list, bar) -> None:
        done = self.sampler.batch_size * self.dist.world_size * self.cfg.accum_steps
        self.samples += done
        window[1] += done
        self.monitor.step(self.last_loss)
        if self.step % self.cfg.log_every == 0 or self.step == self.total:
            now = time.perf_counter()
            window[2] = window[1] / max(now - window[0], 1e-9)
            window[0], window[1] = now, 0
            self.run.log(
                {
                    "step": self.step,
                    "epoch": self.epoch + 1,
                    "lr": lr,
                    "samples_per_s": round(window[2], 1),
                    **{k: round(v, 6) for k, v in accum.items()},
                }
            )
        bar.update(1, **self.monitor.bar_fields(self.epoch, lr, window[2]))


def fit(
    task: Task,
    sampler: BatchSampler,
    cfg: LoopConfig,
    run: RunDir,
    *,
    device: torch.device,
    resume: bool = False,
    progress: ProgressFactory = null_progress,
    train_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``task`` on ``sampler``'s batches as ``cfg`` says; checkpoints and metrics go
    to ``run``. Returns the run's summary (steps, throughput, data wait, metrics)."""
    task.to(device)
    _plan(sampler, cfg)
    if cfg.grad_checkpointing:
        task.set_grad_checkpointing()
    groups = _check_task(task, cfg)
    run.create()
    state = _Fit(
        task, sampler, cfg, run, groups, device=device, progress=progress, train_args=train_args
    )
    if resume:
        state.restore()
    return state.train()


def _saved_step(run: RunDir) -> str:
    try:
        return str(load_state(run.file(STATE_FILE))["step"])
    except (BadInput, KeyError, OSError):
        return "none"
