"""Progress reporting for library code, with no UI dependency.

Library functions take a ``progress`` factory and use it as a context manager:

    with progress("extract", total=n_rows, unit="rows") as bar:
        bar.update(len(batch), loss=0.31)

The default, :func:`null_progress`, does nothing. The CLI passes one that draws a rich
progress bar on stderr (only for people: never when stderr is not a terminal or with
``--quiet``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1, **fields: Any) -> None: ...


class _NullBar:
    def update(self, n: int = 1, **fields: Any) -> None:
        pass


@contextlib.contextmanager
def null_progress(
    description: str = "", total: int | None = None, unit: str = "it"
) -> Iterator[Bar]:
    yield _NullBar()


ProgressFactory = Callable[..., ContextManager[Bar]]
