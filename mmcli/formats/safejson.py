"""JSON from files mmcli did not necessarily write: parse errors and absurd nesting as
one kind of error.

``json.loads`` raises ``RecursionError`` (not ``JSONDecodeError``) for text nested a few
thousand levels deep, and a value nested just below that limit can make a later
``json.dumps`` fail instead. :func:`loads` refuses nesting deeper than
:data:`MAX_DEPTH` and turns every failure into :class:`JSONError` (a ``ValueError``),
which callers turn into their one-line message (or a skipped manifest line).
"""

from __future__ import annotations

import json
from typing import Any

#: deepest nesting of arrays / objects accepted in headers, metadata, configs, manifest lines
MAX_DEPTH = 100


class JSONError(ValueError):
    """Not JSON, or nested deeper than :data:`MAX_DEPTH`. ``str(e)`` is the reason."""


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads`` that raises only :class:`JSONError` (bad JSON, too deep)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONError(f"bad JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise JSONError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as e:
        raise JSONError(f"not valid UTF-8 ({e.reason})") from None
    if _may_be_deep(text) and depth(obj) > MAX_DEPTH:
        raise JSONError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return obj


def _may_be_deep(text: str | bytes | bytearray) -> bool:
    if isinstance(text, str):
        return text.count("[") + text.count("{") > MAX_DEPTH
    return text.count(b"[") + text.count(b"{") > MAX_DEPTH


def depth(obj: Any) -> int:
    """Nesting depth of lists / dicts (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, d)
        if d > MAX_DEPTH:  # deep enough to refuse: stop walking
            return d
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
