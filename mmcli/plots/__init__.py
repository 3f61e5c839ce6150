"""Pictures for people (PNG), drawn with matplotlib, an optional extra (``mmcli[plot]``).

Imported only by the code that draws: ``mmcli --help`` never loads matplotlib.
"""

from __future__ import annotations

from mmcli.errors import BadInput

INSTALL_HINT = "pip install 'mmcli[plot]'"


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise BadInput(
            "pictures need matplotlib, which is not installed", hint=INSTALL_HINT
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
