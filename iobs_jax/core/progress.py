"""Progress bars for long runs: tqdm on stderr, off when asked to be quiet.

One place decides how progress looks, so the CLI, the training loop and the examples
agree; tqdm is imported only when a bar is made (``iobs-jax --help`` stays fast).

Example::

    with progress_bar(total=15, desc="training", enabled=not quiet) as bar:
        for epoch in range(15):
            ...
            bar.update()
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["progress_bar", "sweep_progress"]


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on stderr (``disable=not enabled``: a no-op bar with the same methods).

    Written to stderr so that a command's results on stdout can be piped; the bar redraws
    at most ten times a second and leaves its final line when done.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.1)


def sweep_progress(enabled: bool, desc: str = "sweep") -> tuple[Callable | None, Any]:
    """``(callback, bar)`` for :func:`iobs_jax.sweep.sweep`'s ``progress=(done, total,
    label)`` hook: one tick per finished solver and cell, the label as the bar's postfix.

    ``callback`` is None when not ``enabled``; close ``bar`` when the sweep returns.
    """
    if not enabled:
        return None, progress_bar(None, desc, enabled=False)
    bar = progress_bar(None, desc, unit="cell")

    def report(done: int, total: int, label: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)

    return report, bar
