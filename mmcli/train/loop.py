"""The one training loop, shared by ``fuse-train`` and ``distill``.

A *task* (an ``nn.Module``) turns a :class:`~mmcli.train.data.Batch` into a loss; the
loop does everything else: AdamW with weight-decay groups, warmup + cosine schedule,
gradient accumulation and clipping, autocast (bf16/fp16 with a grad scaler on CUDA),
DDP under torchrun, evaluation every epoch with the best model kept, metrics as JSONL,
atomic checkpoints every N steps, exact mid-epoch resume, and a clean stop on a NaN/inf
loss that keeps the last good checkpoint.

    summary = fit(task, sampler, LoopConfig(epochs=10), run_dir, device=device)
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
from mmcli.runtime import autocast, dist_info
from mmcli.train.data import BatchSampler, Prefetcher
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
    accum_steps: int = 1
    precision: str = "fp32"
    log_every: int = 10
    save_every: int | None = None  # optimizer steps (checkpoints are also written every epoch)
    eval_every: int = 1  # epochs
    best_metric: str | None = None  # the validation metric that picks model.safetensors
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise BadInput("--lr must be positive")
        if self.epochs < 1 and not self.max_steps:
            raise BadInput("--epochs must be at least 1")
        if self.accum_steps < 1:
            raise BadInput("--accum-steps must be at least 1")


class Task(Protocol):
    """What the loop needs from fuse-train / distill (an nn.Module)."""

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]: ...
    def evaluate(self) -> dict[str, float]: ...
    def save_model(self, path: Any, **meta: Any) -> None: ...


@contextlib.contextmanager
def training_run(
    run_dir: str,
    *,
    command: str,
    args: dict[str, Any],
    loop: LoopConfig,
    device: str,
    resume: bool,
    overwrite: bool,
):
    """What every recipe starts with: the device and precision, the run folder (checked, not
    yet written), the torchrun process group and the seed. Yields ``(device, dist, run)``."""
    from mmcli.runtime import check_precision, distributed, resolve_device, seed_everything

    dist = dist_info()
    dev = resolve_device(device)
    loop.precision = check_precision(loop.precision, dev)
    run = RunDir(
        run_dir,
        command=command,
        args=args,
        resume=resume,
        overwrite=overwrite,
        is_main=dist.is_main,
    )
    with distributed(dev):
        seed_everything(loop.seed)
        yield dev, dist, run


def decay_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (weights), none on biases, norms, embeddings' scales,
    temperatures and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim < 2 or "logit_" in name or name.endswith("pos_embed") or ".pos" in name
            else decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, cfg: LoopConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr * lr``."""
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * cos)


def _is_better(new: float, old: float | None, metric: str) -> bool:
    lower = any(k in metric for k in ("loss", "rank"))
    return old is None or (new < old if lower else new > old)


def fit(
    task: nn.Module,
    sampler: BatchSampler,
    cfg: LoopConfig,
    run: RunDir,
    *,
    device: torch.device,
    resume: bool = False,
    progress: ProgressFactory = null_progress,
    train_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    dist = dist_info()
    task.to(device)
    micro_per_epoch = sampler.steps_per_epoch()
    per_epoch = micro_per_epoch // cfg.accum_steps
    if per_epoch < 1:
        raise BadInput(
            f"one epoch has {micro_per_epoch} batches, fewer than --accum-steps {cfg.accum_steps}",
            hint="lower --accum-steps or --batch-size",
        )
    total = cfg.max_steps or cfg.epochs * per_epoch
    groups = task.param_groups(cfg.weight_decay)
    if not groups:
        raise BadInput("nothing to train: every parameter is frozen")
    names = task.metric_names() if hasattr(task, "metric_names") else None
    if cfg.best_metric and names is not None and cfg.best_metric not in names:
        raise BadInput(
            f"--best-metric {cfg.best_metric} is not among the validation metrics",
            hint=f"pick one of {', '.join(names)}",
        )
    run.create()
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")

    step, epoch, micro = 0, 0, 0
    best: float | None = None
    best_metrics: dict[str, float] = {}
    if resume:
        state = load_state(run.file(STATE_FILE))
        task.load_state_dict(state["task"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, micro = state["step"], state["epoch"], state["micro"]
        best, best_metrics = state.get("best"), state.get("best_metrics", {})
        run.truncate_metrics(step)
        log.info(
            "resuming at step %d (epoch %d, batch %d of %d)",
            step,
            epoch + 1,
            micro,
            micro_per_epoch,
        )
        if step >= total:
            log.info("the run already finished %d steps", total)

    module: nn.Module = task
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(
            task,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def save(kind: str, metrics: dict[str, float] | None = None) -> None:
        if not dist.is_main:
            return
        meta = {
            "train": train_args or {},
            "state": {"step": step, "epoch": epoch},
            "metrics": metrics or best_metrics,
        }
        if kind == "best":
            task.save_model(run.file(BEST_FILE), **meta)
            return
        save_state(
            run.file(STATE_FILE),
            {
                "task": task.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "step": step,
                "epoch": epoch,
                "micro": micro,
                "best": best,
                "best_metrics": best_metrics,
                "config": asdict(cfg),
            },
        )
        task.save_model(run.file(LAST_FILE), **meta)

    def evaluate() -> dict[str, float]:
        nonlocal best, best_metrics
        metrics: dict[str, float] = {}
        if dist.is_main:
            task.eval()
            with torch.no_grad(), autocast(device, cfg.precision):
                metrics = task.evaluate()
            task.train()
            if metrics:
                run.log({"step": step, "epoch": epoch + 1, "eval": metrics})
                key = cfg.best_metric or next(iter(metrics))
                if key not in metrics:
                    raise BadInput(
                        f"--best-metric {key} is not among the validation metrics",
                        hint=f"pick one of {', '.join(metrics)}",
                    )
                if _is_better(metrics[key], best, key):
                    best, best_metrics = metrics[key], dict(metrics)
                    save("best", metrics)
                log.info(
                    "epoch %d: %s", epoch + 1, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                )
        if dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()
        return metrics

    task.train()
    started = time.perf_counter()
    samples = 0
    wait = 0.0
    last_loss = float("nan")
    last_eval: dict[str, float] = {}
    global_batch = sampler.batch_size * dist.world_size
    usable = per_epoch * cfg.accum_steps  # micro-batches per epoch that end in a step
    with progress("train", total=total, unit="steps") as bar:
        bar.update(step)
        while step < total:
            feeder = Prefetcher(sampler, epoch, micro, stop=usable, pin=device.type == "cuda")
            t_window, n_window = time.perf_counter(), 0
            accum_logs: dict[str, float] = {}
            try:
                for index, batch in feeder:
                    micro = index + 1  # the next batch to run, if we stopped here
                    batch = batch.to(device, non_blocking=True)
                    last_micro = micro % cfg.accum_steps == 0
                    sync = (
                        contextlib.nullcontext()
                        if last_micro or not dist.enabled
                        else module.no_sync()
                    )
                    with sync:
                        with autocast(device, cfg.precision):
                            loss, logs = module(batch)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    for k, v in logs.items():
                        accum_logs[k] = accum_logs.get(k, 0.0) + v / cfg.accum_steps
                    if not last_micro:
                        continue
                    last_loss = accum_logs.get("loss", float("nan"))
                    if not math.isfinite(last_loss):
                        raise RunFailure(
                            f"the loss became {last_loss} at step {step + 1} (epoch {epoch + 1})",
                            hint=f"the last good checkpoint is in {run.path} (step {_saved_step(run)}); "
                            "lower --lr, or use --precision fp32",
                        )
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
                    lr = lr_at(step, total, cfg)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    after_step = getattr(task, "after_step", None)
                    if after_step is not None:
                        after_step()
                    step += 1
                    samples += global_batch * cfg.accum_steps
                    n_window += global_batch * cfg.accum_steps
                    if step % cfg.log_every == 0 or step == total:
                        now = time.perf_counter()
                        rate = n_window / max(now - t_window, 1e-9)
                        t_window, n_window = now, 0
                        run.log(
                            {
                                "step": step,
                                "epoch": epoch + 1,
                                "lr": lr,
                                "samples_per_s": round(rate, 1),
                                **{k: round(v, 6) for k, v in accum_logs.items()},
                            }
                        )
                        bar.update(0, loss=last_loss, lr=lr, samples_s=round(rate))
                    bar.update(1)
                    accum_logs = {}
                    if step >= total:
                        break
                    if cfg.save_every and step % cfg.save_every == 0:
                        save("state")
            finally:
                wait += feeder.wait_seconds
                feeder.close()
            epoch_done = micro >= usable
            if epoch_done or step >= total:
                if (epoch + 1) % cfg.eval_every == 0 or step >= total:
                    last_eval = evaluate()
                if epoch_done:
                    epoch, micro = epoch + 1, 0
                save("state")
    seconds = time.perf_counter() - started
    if dist.is_main and not run.file(BEST_FILE).exists():
        save("best", last_eval)
    return {
        "steps": step,
        "epochs": epoch,
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
        "data_wait_fraction": round(wait / seconds, 4) if seconds > 0 else None,
        "final_loss": last_loss,
        "final_metrics": last_eval,
        "best_metrics": best_metrics,
        "run_dir": str(run.path),
    }


def _saved_step(run: RunDir) -> str:
    try:
        return str(load_state(run.file(STATE_FILE))["step"])
    except (BadInput, KeyError, OSError):
        return "none"
