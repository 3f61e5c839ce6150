"""Comparing two runs' metrics.jsonl (a resumed run against an uninterrupted one)."""

from __future__ import annotations

import json
import math

import pytest


def assert_same_losses(a_lines: list[str], b_lines: list[str], rel: float = 1e-4) -> None:
    """Both logs hold the same records in the same order, with losses equal within ``rel``.

    Evaluation records carry no loss: those positions must agree (both None) and are left
    out of the numeric comparison (``pytest.approx`` cannot compare None since pytest 9.2).
    """
    a = [json.loads(x).get("loss") for x in a_lines]
    b = [json.loads(x).get("loss") for x in b_lines]
    assert len(a) == len(b)
    assert [x is None for x in a] == [x is None for x in b]
    nums_a = [x for x in a if x is not None]
    nums_b = [x for x in b if x is not None]
    assert nums_a, "no losses logged"
    assert nums_a == pytest.approx(nums_b, rel=rel, nan_ok=True)
    assert all(isinstance(x, float) and not math.isinf(x) for x in nums_a)
