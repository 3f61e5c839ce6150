"""The shape every training recipe has: set up, train with the shared loop, finish.

    class MyRecipe(Recipe):
        command, config_key = "my-train", "my"
        def setup(self, dev, dist, run):            # data, model, task, sampler
            data = load_splits(self.sources, self.val_sources, SplitSpec(...))
            task = MyTask(build_model(...), data)
            return task, self.sampler(data, dist)
        def describe(self, task, dev):              # the one log line before training
            return f"my-train: {len(task.data.train)} train items"

    summary = MyRecipe(["out/tensors"], "runs/x", cfg, LoopConfig()).run()

:func:`training_run` does what every run starts with (device, precision, run folder,
torchrun group, seed); :meth:`Recipe.run` then picks the default best metric from the
task, logs the set-up, calls :func:`mmcli.train.loop.fit` and lets the recipe finish
(distill writes its report there).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from typing import Any

import torch

from mmcli import plots
from mmcli.errors import BadInput
from mmcli.formats.runs import CURVES_FILE
from mmcli.plots.curves import training_curves
from mmcli.progress import ProgressFactory, null_progress
from mmcli.runtime import (
    DistInfo,
    check_precision,
    dist_info,
    distributed,
    resolve_device,
    seed_everything,
)
from mmcli.train.loop import LoopConfig, fit
from mmcli.train.sampler import BatchSampler
from mmcli.train.splits import Data
from mmcli.train.state import RunDir
from mmcli.train.task import JointTask

log = logging.getLogger("mmcli")


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


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trained parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


class Recipe:
    """A training command: subclasses set :attr:`command` and :attr:`config_key` and define
    :meth:`setup` and :meth:`describe` (and :meth:`finish` to add to the summary)."""

    command = ""
    config_key = ""  # the recipe config's key in run.json's "args"

    def __init__(
        self,
        sources: list[str],
        run_dir: str,
        cfg: Any,
        loop: LoopConfig,
        *,
        val_sources: list[str] | None = None,
        batch_size: int = 128,
        device: str = "auto",
        resume: bool = False,
        overwrite: bool = False,
        progress: ProgressFactory | None = None,
        args: dict[str, Any] | None = None,
        workers: int = 2,
    ):
        self.workers = workers  # processes decoding encoded images (not a training argument)
        self.sources, self.val_sources = list(sources), val_sources
        self.run_dir, self.cfg, self.loop = run_dir, cfg, loop
        self.batch_size, self.device = batch_size, device
        self.resume, self.overwrite = resume, overwrite
        self.progress = progress or null_progress
        self.train_args = args or {
            self.config_key: asdict(cfg),
            "loop": asdict(loop),
            "batch_size": batch_size,
        }

    # -- what a recipe defines ----------------------------------------------------------
    def setup(
        self, dev: torch.device, dist: DistInfo, run: RunDir
    ) -> tuple[JointTask, BatchSampler]:
        raise NotImplementedError

    def describe(self, task: JointTask, dev: torch.device) -> str:
        raise NotImplementedError

    def finish(
        self, summary: dict[str, Any], task: JointTask, dev: torch.device, dist: DistInfo, run
    ) -> dict[str, Any]:
        return summary

    # -- shared -------------------------------------------------------------------------
    def sampler(self, data: Data, dist: DistInfo, cls=BatchSampler, **extra: Any) -> BatchSampler:
        """Batches of the training items (checks the batch size before anything is written)."""
        return cls(
            data.dataset,
            data.train,
            self.batch_size,
            seed=self.loop.seed,
            rank=dist.rank,
            world=dist.world_size,
            captions_per_item=self.cfg.captions_per_item,
            modalities=data.modalities,
            **extra,
        )

    def decode_images(self, data: Data, augment: bool = False) -> None:
        """Encoded image tables decoded in ``workers`` processes; ``augment`` (``--augment``)
        random crops and flips of the training images, refused without encoded images."""
        if augment and not data.dataset.encoded:
            raise BadInput(
                "--augment crops the full images, which only encoded image shards keep "
                f"(this data is {'feature files' if data.dataset.kind == 'features' else 'pixels'})",
                hint="preprocess with --store encoded, or drop --augment",
            )
        data.dataset.decode_images(self.workers, augment)
        if data.val_dataset is not None and data.val_dataset is not data.dataset:
            data.val_dataset.decode_images(self.workers)
        self._datasets = [d for d in (data.dataset, data.val_dataset) if d is not None]

    def run(self) -> dict[str, Any]:
        with training_run(
            self.run_dir,
            command=self.command,
            args=self.train_args,
            loop=self.loop,
            device=self.device,
            resume=self.resume,
            overwrite=self.overwrite,
        ) as (dev, dist, run):
            task, sampler = self.setup(dev, dist, run)
            if self.loop.best_metric is None:
                self.loop.best_metric = task.default_best_metric()
            log.info("%s", self.describe(task, dev))
            summary = fit(
                task,
                sampler,
                self.loop,
                run,
                device=dev,
                resume=self.resume,
                progress=self.progress,
                train_args=self.train_args,
            )
            if dist.is_main:
                self.draw_curves(run)
            summary = self.finish(summary, task, dev, dist, run)
        for ds in getattr(self, "_datasets", []):
            ds.close()
        return summary

    def draw_curves(self, run: RunDir) -> None:
        """RUN/curves.png from metrics.jsonl (a note instead when matplotlib is missing)."""
        if not plots.have_matplotlib():
            log.info("no curves.png: %s draws training curves", plots.INSTALL_HINT)
            return
        path = run.file(CURVES_FILE)
        training_curves(run.metrics(), path, title=str(run.path), best_metric=self.loop.best_metric)
        log.info("training curves: %s", path)
