"""distill's recipe: the teacher, the data and the student, the shared loop, then the
teacher/student report."""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

import torch

from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_open
from mmcli.formats.runs import REPORT_FILE
from mmcli.models.pretrained import is_library_spec
from mmcli.runtime import barrier
from mmcli.train.distill.config import CACHE_DIR, DistillConfig
from mmcli.train.distill.data import setup_data
from mmcli.train.distill.report import final_report
from mmcli.train.distill.students import Student, setup_student
from mmcli.train.distill.task import DistillTask
from mmcli.train.distill.teacher import (
    CachedTeacherSampler,
    build_teacher_cache,
    check_teacher_file,
    load_teacher,
    teacher_sha256,
)
from mmcli.train.recipe import Recipe, parameter_counts
from mmcli.train.state import BEST_FILE, RUN_FILE

log = logging.getLogger("mmcli")


class DistillRecipe(Recipe):
    command, config_key = "distill", "distill"
    cfg: DistillConfig

    def __init__(self, sources, run_dir, cfg: DistillConfig, loop, **options: Any):
        # checked before anything is written: a bad --teacher is one line. A pretrained
        # teacher is loaded here (on the CPU) to hash its weights; a checkpoint by setup()
        self._teacher = None
        if is_library_spec(cfg.teacher):
            self._teacher = load_teacher(cfg.teacher, torch.device("cpu"), cfg.teacher_weights)
        else:
            check_teacher_file(cfg.teacher, cfg.teacher_weights)
        super().__init__(sources, run_dir, cfg, loop, **options)
        self.teacher_sha256 = teacher_sha256(cfg.teacher, self._teacher)
        self.train_args = {**self.train_args, "teacher_sha256": self.teacher_sha256}
        self.student: Student | None = None

    def _check_teacher_unchanged(self, run) -> None:
        old = json.loads(run.file(RUN_FILE).read_text()) if run.file(RUN_FILE).exists() else {}
        was = old.get("args", {}).get("teacher_sha256")
        if was and was != self.teacher_sha256:
            raise BadInput(
                "the teacher changed since this run started (its sha256 differs)",
                where=self.cfg.teacher,
                hint="resume with the same teacher, or start a new run",
            )

    def setup(self, dev, dist, run):
        cfg = self.cfg
        if self.resume:
            self._check_teacher_unchanged(run)
        if self._teacher is not None:
            teacher = self._teacher.to(dev)
        else:
            teacher = load_teacher(cfg.teacher, dev)
        data = setup_data(self.sources, self.val_sources, cfg, teacher)
        self.decode_images(data, augment=cfg.augment)  # teacher and student see one crop
        self.student = setup_student(data, cfg, teacher)
        sampler = self.sampler(data, dist)  # validates the batch size before anything is written
        task = DistillTask(self.student, teacher, cfg, data, cached=cfg.cache_teacher)
        if cfg.cache_teacher:
            sampler = self._cached_sampler(task, dev, dist, run)
        return task, sampler

    def _cached_sampler(self, task: DistillTask, dev, dist, run) -> CachedTeacherSampler:
        """The teacher's outputs for every row, computed once into RUN/teacher-cache."""
        run.create()
        folder = run.file(CACHE_DIR)
        if self.overwrite and not self.resume and dist.is_main and folder.exists():
            shutil.rmtree(folder)
        barrier()
        cache = build_teacher_cache(
            task.teacher,
            task.teacher_mods,
            self.sources,
            task.data.dataset,
            folder,
            device=dev,
            precision=self.loop.precision,
            batch_size=self.cfg.eval_batch_size,
            progress=self.progress,
        )
        return self.sampler(task.data, dist, cls=CachedTeacherSampler, cache=cache)

    def describe(self, task: DistillTask, dev) -> str:
        cfg, data = self.cfg, task.data
        n_teacher = parameter_counts(task.teacher)[0]
        n_student, n_trained = parameter_counts(task.student)
        what = (
            f"{cfg.from_modality} -> {cfg.to_modality}"
            if cfg.cross
            else "pairs " + (",".join(f"{a}-{b}" for a, b in data.pairs) or "none")
        )
        return (
            f"distill: {len(data.train)} train items, "
            f"{len(data.val) if data.val is not None else 0} val items, {what}, "
            f"teacher {n_teacher:,} params -> student {n_student:,} ({n_trained:,} trained; "
            f"{100 * n_student / max(1, n_teacher):.1f}%), losses "
            f"{','.join(f'{k}={v:g}' for k, v in cfg.losses.items())}, device {dev}"
        )

    def finish(self, summary, task: DistillTask, dev, dist, run) -> dict[str, Any]:
        """The teacher/student report, written to RUN/report.json (by the main process;
        the others return the training summary)."""
        if not dist.is_main:
            return summary
        data = task.data
        log.info(
            "distill: comparing teacher and student on the %s split", data.test_split or "(none)"
        )
        report = final_report(
            task.teacher,
            run.file(BEST_FILE),
            self.student,
            data,
            self.cfg,
            device=dev,
            precision=self.loop.precision,
            summary=summary,
        )
        with atomic_open(run.file(REPORT_FILE)) as f:
            json.dump(report, f, indent=2, default=float)
            f.write("\n")
        return report


def distill(
    sources: list[str], run_dir: str, cfg: DistillConfig, loop, **options: Any
) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into a student trained on ``sources``; returns the report
    (also written to ``RUN/report.json``).

    ``options``: ``val_sources``, ``batch_size`` (128), ``device`` ("auto"), ``resume``,
    ``overwrite``, ``progress``, ``args`` (what run.json records; default: the configs)."""
    return DistillRecipe(sources, run_dir, cfg, loop, **options).run()
