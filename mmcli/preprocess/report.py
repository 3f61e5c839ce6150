"""What preprocess tells a person at the end, beyond the counts: how many images were
upsampled, what share of captions the context length cut and the length that would fit
99% of them, and whether too many items were skipped (``--max-skip``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmcli.errors import BadInput
from mmcli.formats.manifest import Item
from mmcli.formats.tensorfile import ShardFile
from mmcli.preprocess.config import ERRORS_FILE, PreprocessConfig

log = logging.getLogger("mmcli")

SPECIALS = 2  # BOS and EOS take two of the context length's tokens


def upsampled_images(output, plans, writer) -> int:
    """Images whose shorter side was below --image-size, over every shard (those of an
    earlier, resumed run included)."""
    if output is None:
        return writer.upsampled
    return sum(
        ShardFile(output.shard_path(p.index)).extra("stats", {}).get("upsampled", 0) for p in plans
    )


def caption_report(items: list[Item], config: PreprocessConfig, truncated: int) -> dict[str, Any]:
    """``truncated_share`` of captions and ``context_length_99``: the context length that
    fits 99% of the captions whole (bytes + BOS + EOS, as the byte tokenizer counts)."""
    tok = config.tokenizer()
    from mmcli.data.text import normalize_text

    lengths = np.array(
        [len(normalize_text(t, tok.lowercase).encode("utf-8")) for it in items for t in it.texts],
        dtype=np.int64,
    )
    if len(lengths) == 0:
        return {}
    # the shortest length that at least 99% of the captions fit in
    need = int(np.sort(lengths)[max(math.ceil(0.99 * len(lengths)) - 1, 0)])
    fits_99 = need + SPECIALS
    return {
        "truncated_share": round(truncated / len(lengths), 4),
        "context_length_99": max(fits_99, 3),
    }


def warn(summary: dict[str, Any], config: PreprocessConfig) -> None:
    """One line each for upsampled images and truncated captions (stderr; -q silences them)."""
    n, kept = summary.get("upsampled_images", 0), summary.get("rows", {}).get("image", 0)
    if n:
        log.info(
            "%d of %d images (%.0f%%) are smaller than --image-size %d and were upsampled; "
            "a smaller --image-size keeps them as they are",
            n, kept, 100 * n / max(kept, 1), config.image_size,
        )  # fmt: skip
    share = summary.get("truncated_share", 0)
    if summary.get("truncated_captions"):
        log.info(
            "%d captions (%.1f%%) were cut at --context-length %d; --context-length %d fits 99%% of them",
            summary["truncated_captions"], 100 * share, config.context_length,
            summary["context_length_99"],
        )  # fmt: skip


def check_skips(summary: dict[str, Any], config: PreprocessConfig, out: str) -> None:
    """BadInput (exit 2) when more items were skipped than ``--max-skip`` allows."""
    skipped, total = summary["skipped"], summary["items"]
    limit = config.skip_limit(total)
    if skipped <= limit:
        return
    listed = "" if out == "-" else f"; they are listed in {Path(out) / ERRORS_FILE}"
    raise BadInput(
        f"{skipped} of {total} items ({100 * skipped / max(total, 1):.0f}%) were skipped, "
        f"more than --max-skip {config.max_skip} ({limit}){listed}",
        hint="fix the files, or allow more with --max-skip (e.g. --max-skip 100%), "
        "then --resume to keep the shards written",
    )
