"""One library model for both towers of a whole pretrained model.

``--model open_clip:ViT-B-32`` builds an image and a text encoder from the same open_clip
model: inside :func:`shared_models`, :func:`shared_build` creates each library model once
and hands the same object to every tower that asks for it (each keeps only its part).
Outside it, every call builds afresh.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

_local = threading.local()


@contextlib.contextmanager
def shared_models() -> Iterator[None]:
    outer = getattr(_local, "cache", None)
    _local.cache = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _local.cache = None


def shared_build(key: Hashable, factory: Callable[[], Any]) -> Any:
    cache = getattr(_local, "cache", None)
    if cache is None:
        return factory()
    if key not in cache:
        cache[key] = factory()
    return cache[key]
