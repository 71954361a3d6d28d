"""Figures for recovery sweeps (matplotlib is imported only when a plot is made).

- :func:`plot_phase_transition`: success rate over ``(n, k)`` as one heatmap per solver.
- :func:`plot_convergence`: loss and distance to ``x*`` per step, median and 10-90% band.
- :func:`plot_image_grid`: true images above the recovered ones (the MNIST prior).

Every function writes a PNG to ``path`` and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from iobs_jax.core.files import save_figure

__all__ = ["plot_phase_transition", "plot_convergence", "plot_image_grid"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib, a dependency of iobs_jax that is missing here: "
            "pip install matplotlib."
        ) from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_phase_transition(rows: Sequence[Mapping], path: str | Path, *,
                          noise: float | None = None) -> Path:
    """Success rate heatmaps (x: ``k``, y: ``n``), one panel per method, from sweep rows.

    ``rows`` are :attr:`SweepResult.rows`; with several noise levels pass ``noise=`` to
    pick one (default: the first). Example:
    ``plot_phase_transition(result.rows, "out/phase.png")``.
    """
    plt = _pyplot()
    if not rows:
        raise ValueError("plot_phase_transition needs at least one row.")
    noise = rows[0]["noise"] if noise is None else noise
    rows = [r for r in rows if r["noise"] == noise]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2),
                             squeeze=False, constrained_layout=True)
    for ax, method in zip(axes[0], methods, strict=True):
        grid = np.full((len(ns), len(ks)), np.nan)
        for r in rows:
            if r["method"] == method:
                grid[ns.index(r["n"]), ks.index(r["k"])] = r["success_rate"]
        im = ax.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(ns)):
            for j in range(len(ks)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center",
                            color="w" if grid[i, j] < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(ks)), ks)
        ax.set_yticks(range(len(ns)), ns)
        ax.set_xlabel("k*")
        ax.set_ylabel("n")
        overall = np.nanmean(grid)
        ax.set_title(f"{method} ({100 * overall:.0f}% overall)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="success rate", shrink=0.8)
    d = rows[0].get("d", "?")
    fig.suptitle(f"Recovery success, d = {d}, noise = {noise:g}", fontsize=10)
    return save_figure(fig, path)


def plot_convergence(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, *,
                     title: str = "") -> Path:
    """Two panels, loss and ``||x_t - x*|| / ||x*||`` per step on log scales: the median
    over trials as a line and the 10-90% range as a band, for each method.

    ``curves`` is what :func:`iobs_jax.sweep.convergence` returns. Example:
    ``plot_convergence(convergence(solvers, probs, 750), "out/gaussian.png")``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for name, c in curves.items():
        for ax, field in zip(axes, ("loss", "distance"), strict=True):
            v = np.maximum(np.asarray(c[field], float), 1e-300)
            steps = np.arange(v.shape[1])
            lo, med, hi = np.percentile(v, [10, 50, 90], axis=0)
            (line,) = ax.plot(steps, med, label=name)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("loss f(x_t)", "||x_t - x*|| / ||x*||"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_image_grid(truth: np.ndarray, recovered: Mapping[str, np.ndarray], path: str | Path,
                    *, errors: Mapping[str, np.ndarray] | None = None) -> Path:
    """A grid: the true images in the first row, each method's recovery below.

    ``truth`` is ``(N, d)`` with ``d`` a square number (784 for MNIST), ``recovered``
    maps method names to ``(N, d)``; ``errors`` (same keys, ``(N,)``) are printed under
    each image. Example: ``plot_image_grid(signals, {"Topk-I-OBS": x}, "out/mnist.png")``.
    """
    plt = _pyplot()
    truth = np.asarray(truth)
    side = int(round(np.sqrt(truth.shape[1])))
    if truth.ndim != 2 or side * side != truth.shape[1]:
        raise ValueError(f"truth must be (N, d) with d a square number; got {truth.shape}.")
    rows = [("true", truth), *((k, np.asarray(v)) for k, v in recovered.items())]
    count = truth.shape[0]
    label_width = 0.075 * max(len(name) for name, _ in rows) + 0.2  # inches for row labels
    width = 0.9 * count + label_width
    fig, axes = plt.subplots(len(rows), count, figsize=(width, 1.05 * len(rows)),
                             squeeze=False)
    vmax = float(truth.max()) or 1.0
    for i, (name, images) in enumerate(rows):
        for j in range(count):
            ax = axes[i, j]
            ax.imshow(images[j].reshape(side, side), cmap="gray", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if errors is not None and name in errors:
                ax.set_title(f"{errors[name][j]:.0e}", fontsize=6, pad=1)
        axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=label_width / width, right=0.99, top=0.97, bottom=0.01,
                        hspace=0.35, wspace=0.05)
    return save_figure(fig, path)
