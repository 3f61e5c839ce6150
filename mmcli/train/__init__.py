"""Training: one loop (:mod:`~mmcli.train.loop`) shared by every recipe.

A recipe is a folder (:mod:`~mmcli.train.fuse`, :mod:`~mmcli.train.distill`) holding its
config, its set-up, a task (a :class:`~mmcli.train.task.JointTask` with its own
``forward``) and a :class:`~mmcli.train.recipe.Recipe`; everything else is shared: the
data (:mod:`~mmcli.train.data`, :mod:`~mmcli.train.sampler`, :mod:`~mmcli.train.splits`),
objectives, validation, the schedule, run folders and resumable state, DDP helpers.
docs/architecture.md shows how to add a recipe.
"""
