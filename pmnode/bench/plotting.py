"""matplotlib for the benchmark plots, as an optional extra (`pmnode[bench]`).

A volunteer's node never plots, so `pip install pmnode` leaves matplotlib out; every plot goes
through `pyplot()`, which says in one line how to get it instead of an ImportError traceback.
Commands that plot call it before their runs too, so a missing extra is found in a second, not
after hours of training.
"""

from __future__ import annotations

from types import ModuleType

from pmnode.errors import PmnodeError

INSTALL_HINT = "pip install 'pmnode[bench]' (in a checkout: pip install -e '.[bench]')"


class MissingExtraError(PmnodeError):
    """An optional dependency is not installed; the message names the extra to install."""


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only: benchmarks run on machines without a display)."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingExtraError(f"benchmark plots need matplotlib, not installed here: {INSTALL_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
