"""Typed, user-facing errors.

Every error a user can cause is raised as one of these, with a message that says
*what* went wrong, *where* (file, line, item id) and *how to fix it*. The CLI turns
them into one line on stderr and an exit code; Python users catch them as usual.

    raise BadInput("cannot decode image", where="imgs/12.jpg (line 12 of train.jsonl)",
                   hint="use --on-error skip to continue")
    # -> "imgs/12.jpg (line 12 of train.jsonl): cannot decode image; use --on-error skip to continue"
"""

from __future__ import annotations


class MmcliError(Exception):
    """Base class: a failure explained in one line. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"; {self.hint}"
        return text


class BadInput(MmcliError):
    """The user's input (files, arguments, data) is wrong. Exit code 2."""

    exit_code = 2


class RunFailure(MmcliError):
    """The input was fine but the work failed (e.g. the loss diverged). Exit code 1."""

    exit_code = 1


class MissingDependency(BadInput):
    """An optional dependency (faiss, ...) is not installed."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        install = f'pip install "mmcli[{extra}]"' if extra else f"pip install {package}"
        what = f"{package} is not installed" + (f" (needed for {purpose})" if purpose else "")
        super().__init__(what, hint=f"install it with: {install}")
