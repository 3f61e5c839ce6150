"""fuse-train's recipe: the data, a fresh model and :class:`FuseTask`, then the shared loop."""

from __future__ import annotations

from typing import Any

from mmcli.train.fuse.config import FuseConfig
from mmcli.train.fuse.frozen import training_view
from mmcli.train.fuse.init import init_model
from mmcli.train.fuse.model import setup_data, setup_model
from mmcli.train.fuse.task import FuseTask
from mmcli.train.recipe import Recipe, parameter_counts


class FuseRecipe(Recipe):
    command, config_key = "fuse-train", "fuse"
    cfg: FuseConfig

    def setup(self, dev, dist, run):
        cfg = self.cfg
        data = setup_data(self.sources, self.val_sources, cfg)
        self.decode_images(data, augment=cfg.augment)
        model = init_model(data, cfg) if cfg.init else setup_model(data, cfg)
        self.sampler(data, dist, batch_with=cfg.batch_with)  # the batch size, before any cache
        # frozen towers computed once, pretrained tokenizers run once: a view of the model
        view, data = training_view(model, data, cfg, run, device=dev, precision=self.loop.precision,
                                   batch_size=cfg.eval_batch_size, resume=self.resume,
                                   is_main=dist.is_main, progress=self.progress)  # fmt: skip
        sampler = self.sampler(data, dist, batch_with=cfg.batch_with)
        return FuseTask(view, cfg, data, seed=self.loop.seed, saved=model), sampler

    def describe(self, task: FuseTask, dev) -> str:
        data = task.data
        n_params, n_train = parameter_counts(task.saved)
        return (
            f"fuse-train: {len(data.train)} train items, "
            f"{len(data.val) if data.val is not None else 0} val items, "
            f"pairs {','.join(f'{a}-{b}' for a, b in data.pairs)}, {n_params:,} params "
            f"({n_train:,} trained), fusion {self.cfg.fusion}, device {dev}"
        )

    def finish(self, summary, task: FuseTask, dev, dist, run) -> dict[str, Any]:
        summary["parameters"] = parameter_counts(task.saved)[0]
        return summary


def fuse_train(
    sources: list[str], run_dir: str, cfg: FuseConfig, loop, **options: Any
) -> dict[str, Any]:
    """Train a joint space on ``sources`` into ``run_dir``; returns the run's summary.

    ``options``: ``val_sources``, ``batch_size`` (128), ``device`` ("auto"), ``resume``,
    ``overwrite``, ``progress``, ``args`` (what run.json records; default: the configs)."""
    return FuseRecipe(sources, run_dir, cfg, loop, **options).run()
