"""The paper's two synthetic figures (Wu et al. 2024), and what their curves hide.

Both use ``f(x) = mean((A x - y)^2)``, ``A_ij ~ N(0, 1/n)``, noiseless ``y = A x*``:

- Gaussian prior: ``n = 256, d = 128, k* = 16``, training sparsity ``k = 64``, 20 trials,
  750 steps.
- MNIST prior: ``x*`` = an MNIST test image as a 784-vector with values 0..255,
  ``n = 2d = 1568``, ``k = 2 k*`` (per image), 20 images, 4000 steps.

Methods: k-IHT with step ``1/L``; Topk-I-OBS as in the authors' code (plain, no
correction; their loss is a mean but their Hessian ``A^T A``, an effective Newton step
``eta = 2/n``); and Topk-I-OBS with the true Hessian and step 1 (the OBS correction is
the least-squares fit on the support), which lands on ``x*`` in one or two steps because
``n > d``. The authors' variant and the true-Hessian one are :class:`OBSPursuit` with
``candidates=k`` (the constant Hessian factored once; equal to :class:`IOBS` with
``hessian=2 A^T A / n``, which refactors it every step).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from iobs_jax.recovery import plots as _plots
from iobs_jax.recovery import problems
from iobs_jax.recovery.grid import convergence
from iobs_jax.solvers.iht import IHT
from iobs_jax.solvers.pursuit import OBSPursuit

__all__ = ["paper_gaussian", "paper_mnist"]

GAUSSIAN = dict(n=256, d=128, k_star=16, k=64, trials=20, steps=750)
MNIST = dict(images=20, steps=4000)
# k = 2 k* is a static size (one compiled program per value); rounding it up to a multiple
# of 64 turns 20 images' ~20 distinct values into ~5 without changing what is recovered.
K_ROUND = 64
_IHT, _AUTHORS, _TRUE = "k-IHT (1/L)", "Topk-I-OBS, authors' step 2/n", "Topk-I-OBS, true H, step 1"
_TRUE_STEPS = 5  # the true-Hessian variant has converged long before


def _methods(k: int, n: int) -> dict:
    return {_IHT: IHT(problems.mse_loss, k),
            _AUTHORS: OBSPursuit(k, candidates=k, refit=False, step_size=2.0 / n,
                                 monotone=False),
            _TRUE: OBSPursuit(k, candidates=k, monotone=False)}


def _curves(k: int, n: int, probs, steps: int) -> dict:
    methods = _methods(k, n)
    out = convergence({m: s for m, s in methods.items() if m != _TRUE}, probs, steps)
    out.update(convergence({_TRUE: methods[_TRUE]}, probs, min(steps, _TRUE_STEPS)))
    return out


def _summary(curves: dict) -> dict:
    return {name: {"final_distance_median": float(np.median(c["distance"][:, -1])),
                   "final_distance_max": float(np.max(c["distance"][:, -1])),
                   "steps": int(c["distance"].shape[1] - 1)} for name, c in curves.items()}


def paper_gaussian(out: str | Path, *, key: jax.Array, trials: int = GAUSSIAN["trials"],
                   steps: int = GAUSSIAN["steps"]) -> dict:
    """Figure 1: convergence on the Gaussian prior; writes ``paper_gaussian.png``.

    Returns ``{method: {final_distance_median, final_distance_max, steps}}``.
    Example: ``paper_gaussian("out/", key=jax.random.key(0), trials=5, steps=100)``.
    """
    g = GAUSSIAN
    gen = functools.partial(problems.sparse_linear_regression, n=g["n"], d=g["d"],
                            k=g["k_star"])
    probs = jax.vmap(gen)(jax.random.split(key, trials))
    curves = _curves(g["k"], g["n"], probs, steps)
    _plots.plot_convergence(curves, Path(out) / "paper_gaussian.png", title=(
        f"Gaussian prior: n={g['n']} d={g['d']} k*={g['k_star']} k={g['k']}, {trials} trials"))
    return _summary(curves)


def paper_mnist(out: str | Path, images: np.ndarray, *, key: jax.Array,
                count: int = MNIST["images"], steps: int = MNIST["steps"]) -> dict:
    """Figure 2: the MNIST prior; writes ``paper_mnist.png`` (curves) and
    ``paper_mnist_images.png`` (true images above each method's recovery).

    ``images`` ``(N, H, W[, 1])`` in ``[0, 1]`` (:func:`iobs_jax.mnist.load_mnist`); the
    first ``count`` are used, scaled to 0..255, with ``n = 2 d`` and ``k = 2 k*`` per image
    (rounded up to a multiple of 64, at most ``d``: one compiled program per value).
    Returns the curve summary plus ``"recovery"``: the per-image relative errors of the
    final iterates. Example: ``paper_mnist("out/", load_mnist().images, key=key)``.
    """
    signals = problems.mnist_signals(images, count)
    d = signals.shape[1]
    n = 2 * d
    ks = np.minimum(-(-2 * np.asarray(jnp.sum(signals != 0, axis=1)) // K_ROUND) * K_ROUND, d)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count, dtype=jnp.uint32))
    curves: dict = {}
    for k in np.unique(ks):
        rows = np.flatnonzero(ks == k)
        probs = jax.vmap(lambda kk, s: problems.measure_signal(kk, s, n))(
            keys[rows], signals[rows])
        for name, c in _curves(int(k), n, probs, steps).items():
            merged = curves.setdefault(name, {})
            for field, v in c.items():
                if field not in merged:
                    merged[field] = np.zeros((count, *v.shape[1:]), v.dtype)
                merged[field][rows] = v
    truth = np.asarray(signals)
    errors = {m: np.linalg.norm(c["x"] - truth, axis=1) / np.linalg.norm(truth, axis=1)
              for m, c in curves.items()}
    title = f"MNIST prior: d={d} n={n} k=2k*, {count} images"
    _plots.plot_convergence(curves, Path(out) / "paper_mnist.png", title=title)
    _plots.plot_image_grid(truth, {m: c["x"] for m, c in curves.items()},
                           Path(out) / "paper_mnist_images.png", errors=errors)
    summary = _summary(curves)
    summary["recovery"] = {m: [float(e) for e in v] for m, v in errors.items()}
    return summary
