"""Decoding images and audio, in this process or in a pool of worker processes.

Workers leave the parent's signals to the parent (Ctrl-C reaches the whole process
group; the parent stops the pool) and die with it (Linux: ``PR_SET_PDEATHSIG``), and
what the pool machinery prints when the parent is gone (a ``BrokenPipeError`` traceback
per worker after a kill -9) is not shown: stderr stays the parent's one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmcli.cpu import tune_malloc
from mmcli.data import video
from mmcli.data.audio import AudioDecodeError, AudioTransform
from mmcli.data.encoded import encode_image
from mmcli.data.image import ImageDecodeError
from mmcli.data.video import VideoDecodeError, load_video_audio
from mmcli.formats.manifest import Item
from mmcli.preprocess.config import CHUNK, PreprocessConfig

#: items per worker task when they have videos
VIDEO_CHUNK = 2
#: the modalities read from files (text is in the items)
DECODED = ("image", "audio", "video")
#: an audio "path" with this prefix is the audio track of the video after it
#: (``--audio-from-video``)
FROM_VIDEO = "<audio track of>"


@dataclass
class ShardPlan:
    index: int
    items: list[Item]
    chunks: int = 0
    results: dict[int, list[tuple]] = field(default_factory=dict)


def decode_chunk(task: tuple) -> tuple[int, list[tuple]]:
    """Worker: decode the image / audio / video files of a chunk of items.

    Returns (chunk id, [({modality: array} (image uint8 [3,S,S] or, ``--store encoded``,
    the bytes to keep; audio float16 [N], video
    uint8 [T,3,S,S]), (field, reason) | None, upsampled: the image's shorter side was below
    S)] in item order). ``files`` per item: {modality: path}; audio ``"video"``: the
    audio track of the item's video (``--audio-from-video``).
    """
    chunk_id, files, image_tf, video_tf, sample_rate, seconds, store = task
    audio_tf = AudioTransform(sample_rate, seconds)
    out = []
    for paths in files:
        values: dict = {}
        error = None
        sizes: list = []
        for modality, path in paths.items():
            try:
                if modality == "image" and store == "encoded":  # the file, checked to decode
                    values[modality] = encode_image(path, image_tf, sizes=sizes)
                else:
                    values[modality] = _decode_one(
                        modality, path, image_tf, video_tf, audio_tf, sizes
                    )
            except (ImageDecodeError, AudioDecodeError, VideoDecodeError) as e:
                error = (modality, str(e))
            except Exception as e:  # never let one bad file kill a worker pool
                error = (modality, f"{type(e).__name__}: {e}")
            if error is not None:
                break
        upsampled = bool(sizes) and "image" in values and min(sizes[0]) < image_tf.size
        out.append(({} if error else values, error, upsampled))
    return chunk_id, out


def _decode_one(modality, path, image_tf, video_tf, audio_tf, sizes):
    if modality == "image":
        return image_tf(path, sizes=sizes)
    if modality == "video":
        return video_tf(path)
    if path.startswith(FROM_VIDEO):
        video = path[len(FROM_VIDEO) :]
        return load_video_audio(video, audio_tf.sample_rate, audio_tf.seconds).astype("float16")
    return audio_tf(path).astype("float16")


# ---------------------------------------------------------------- the worker pool

_ORPHAN_ERRORS = (BrokenPipeError, ConnectionError, EOFError, KeyboardInterrupt)


class _QuietWhenOrphaned:
    """A worker's stderr: passes everything through except while the worker fails because
    its parent went away (the pool's traceback of a broken pipe), or once it has."""

    def __init__(self, stream: Any, parent: int):
        self._stream, self._parent = stream, parent

    def write(self, text: str) -> int:
        if isinstance(sys.exc_info()[1], _ORPHAN_ERRORS) or os.getppid() != self._parent:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def init_worker() -> None:
    """Pool initializer (see the module docstring)."""
    video.DECODE_THREADS = 1  # the pool is the parallelism
    tune_malloc()  # a forkserver's worker does not inherit the command's setting
    _die_with_parent()
    sys.stderr = _QuietWhenOrphaned(sys.stderr, os.getppid())


def item_files(item: Item, modalities: list[str], config: PreprocessConfig) -> dict[str, str]:
    """The files to decode of ``item``: {modality: path} (audio from the video's track
    with ``--audio-from-video`` when the item has no audio file)."""
    files = {m: str(item.path(m)) for m in DECODED if m in modalities and item.has(m)}
    if (
        config.audio_from_video
        and "audio" in modalities
        and "audio" not in files
        and item.has("video")
    ):
        files["audio"] = FROM_VIDEO + str(item.path("video"))
    return files


def _tasks(
    pending: list[ShardPlan], config: PreprocessConfig, modalities: list[str]
) -> tuple[list[tuple], dict[int, ShardPlan]]:
    image_tf = config.image_transform()  # mmcli's, or a pretrained model's (--like)
    video_tf = config.video_transform()
    tasks = []
    owner: dict[int, ShardPlan] = {}
    chunk = VIDEO_CHUNK if "video" in modalities else CHUNK  # a clip is many images' work
    for plan in pending:
        for start in range(0, len(plan.items), chunk):
            files = [item_files(it, modalities, config) for it in plan.items[start : start + chunk]]
            cid = len(tasks)
            tasks.append(
                (cid, files, image_tf, video_tf, config.sample_rate, config.audio_seconds,
                 config.store)
            )  # fmt: skip
            owner[cid] = plan
            plan.chunks += 1
    return tasks, owner


def decode(
    pending: list[ShardPlan], config: PreprocessConfig, modalities: list[str]
) -> Iterator[tuple[ShardPlan, list[tuple]]]:
    """Yield (shard plan, decoded results in item order) shard by shard, decoding in workers."""
    if not set(DECODED) & set(modalities):  # text only: nothing to decode
        for plan in pending:
            yield plan, [({}, None, False)] * len(plan.items)
        return
    tasks, owner = _tasks(pending, config, modalities)
    if config.workers > 0 and len(tasks) > 1:
        from mmcli.runtime import worker_context
        from mmcli.workerpool import WorkerPool

        preload = ["mmcli.preprocess.decode", *config.image_transform().modules]
        pool = WorkerPool(worker_context(preload), config.workers, initializer=init_worker)
        results = pool.imap(decode_chunk, tasks)
    else:
        pool = None
        results = map(decode_chunk, tasks)
    try:
        for cid, decoded in results:
            plan = owner[cid]
            plan.results[cid] = decoded
            if len(plan.results) == plan.chunks:
                flat = [r for k in sorted(plan.results) for r in plan.results[k]]
                plan.results.clear()
                yield plan, flat
    finally:
        if pool is not None:
            pool.close()
