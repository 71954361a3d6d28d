"""Synthetic sparse-recovery problems: vmappable generators from an explicit PRNG key.

Every generator is a pure function of a PRNG key (and static sizes) returning a
:class:`SparseRegression` NamedTuple ``(design, observations, x_true, support)``, so a
batch of instances is one ``vmap``:

    >>> import functools, jax
    >>> gen = functools.partial(sparse_linear_regression, n=64, d=256, k=8)
    >>> probs = jax.vmap(gen)(jax.random.split(jax.random.key(0), 100))
    >>> probs.design.shape
    (100, 64, 256)

Models (``A`` is ``(n, d)``, ``x`` is ``k``-sparse):

- :func:`sparse_linear_regression`: ``y = A x + noise * eps``.
- :func:`measure_signal`: the same measurements of a given signal (the MNIST prior: ``x``
  is an image, see :func:`mnist_signals`).
- :func:`sparse_logistic_regression`: labels ``y_i ~ Bernoulli(sigmoid(sqrt(n) (A x)_i))``.
- :func:`quadratic_measurements`: ``y = (A x)^2 + noise * eps`` (sparse phase retrieval; a
  non-quadratic loss whose Hessian changes with ``x``).

Designs (``design=``): ``"gaussian"`` iid ``N(0, 1/n)``; ``"correlated"`` rows iid
``N(0, Sigma / n)`` with the Toeplitz ``Sigma_ij = rho^|i-j|``; ``"rademacher"`` iid
``+-1/sqrt(n)``. Every column has expected squared norm 1. Priors (``prior=``) for the
nonzeros of ``x``: ``"gaussian"`` ``N(0, 1)``, ``"rademacher"`` ``+-1`` (the hardest case
for thresholding: no small entries to lose). The support is uniform among the
``d choose k`` subsets. Same key, same instance; the losses below match the models.

Padding (what sweeps use to compile one program for a whole grid): with ``rows=m`` (may
be traced) the generators return ``n`` rows of which the first ``m`` are the instance
drawn with ``n = m`` and the others are zero, and ``k`` may be traced; the losses take
the same ``rows`` as a fourth argument. With JAX's default partitionable PRNG a draw of
``n`` rows starts with the draw of ``m`` rows, so a padded instance equals the unpadded one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iobs_jax.core.validation import check_choice, check_int, check_key, check_nonnegative_scalar

__all__ = [
    "SparseRegression",
    "DESIGNS",
    "PRIORS",
    "sparse_linear_regression",
    "measure_signal",
    "mnist_signals",
    "sparse_logistic_regression",
    "quadratic_measurements",
    "spectral_init",
    "mse_loss",
    "logistic_loss",
    "quadratic_loss",
]

DESIGNS = ("gaussian", "correlated", "rademacher")
PRIORS = ("gaussian", "rademacher")


class SparseRegression(NamedTuple):
    """A sparse recovery instance.

    Attributes:
      design: ``(n, d)`` matrix ``A``.
      observations: ``(n,)`` vector ``y`` (0/1 labels for logistic regression).
      x_true: ``(d,)`` the sparse signal.
      support: ``(d,)`` boolean, True on the nonzeros of ``x_true``.
    """

    design: jax.Array
    observations: jax.Array
    x_true: jax.Array
    support: jax.Array


def _row_mean(values: jax.Array, rows: Any) -> jax.Array:
    """Mean over the first ``rows`` entries (all when ``rows`` is None); the rest are padding."""
    if rows is None:
        return jnp.mean(values)
    valid = jnp.arange(values.shape[0]) < rows
    return jnp.sum(jnp.where(valid, values, 0.0)) / rows


def mse_loss(x: jax.Array, design: jax.Array, observations: jax.Array, rows: Any = None
             ) -> jax.Array:
    """Mean squared error ``(1/n) ||A x - y||^2`` (the paper's loss; Hessian ``2 A^T A / n``).

    ``rows``: the number of measurements when ``A`` and ``y`` are padded with zero rows.
    """
    r = design @ x - observations
    return _row_mean(r**2, rows)


def logistic_loss(x: jax.Array, design: jax.Array, observations: jax.Array, rows: Any = None
                  ) -> jax.Array:
    """Mean binary cross-entropy of logits ``sqrt(n) A x`` against 0/1 labels ``y``.

    The ``sqrt(n)`` undoes the design's ``1/sqrt(n)`` scaling, as in
    :func:`sparse_logistic_regression`. ``rows``: as in :func:`mse_loss` (``n = rows``).
    """
    n = design.shape[0] if rows is None else rows
    logits = jnp.sqrt(jnp.asarray(n, design.dtype)) * (design @ x)
    return _row_mean(optax.sigmoid_binary_cross_entropy(logits, observations), rows)


def quadratic_loss(x: jax.Array, design: jax.Array, observations: jax.Array, rows: Any = None
                   ) -> jax.Array:
    """``(1/n) ||(A x)^2 - y||^2`` for quadratic measurements (quartic in ``x``, nonconvex).

    ``rows``: as in :func:`mse_loss`.
    """
    r = (design @ x) ** 2 - observations
    return _row_mean(r**2, rows)


def _dtype(dtype: Any) -> Any:
    if dtype is None:
        return jnp.result_type(float)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype such as 'float32'; got {dtype!r}.") \
            from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype such as 'float32'; got {dtype}.")
    return dtype


def _design(key: jax.Array, n: int, d: int, design: str, rho: Any, dtype: Any,
            rows: Any = None) -> jax.Array:
    """``(n, d)`` design with entries of variance ``1/n`` (see the module docstring); with
    ``rows``, variance ``1/rows`` on the first ``rows`` rows and zero rows after them."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(n if rows is None else rows, dtype))
    if design == "rademacher":
        return _zero_padding(jax.random.rademacher(key, (n, d), dtype) * scale, rows)
    z = _zero_padding(jax.random.normal(key, (n, d), dtype) * scale, rows)
    if design == "gaussian":
        return z
    # Rows z_i ~ N(0, I) times L^T with L L^T = Sigma (Toeplitz, Sigma_ij = rho^|i-j|).
    lag = jnp.abs(jnp.arange(d)[:, None] - jnp.arange(d)[None, :]).astype(dtype)
    sigma = jnp.asarray(rho, dtype) ** lag
    return z @ jnp.linalg.cholesky(sigma).T


def _zero_padding(a: jax.Array, rows: Any) -> jax.Array:
    """Zero the entries (rows) of ``a`` from ``rows`` on; ``rows=None`` keeps them all."""
    if rows is None:
        return a
    valid = jnp.arange(a.shape[0]) < rows
    return jnp.where(valid.reshape(-1, *([1] * (a.ndim - 1))), a, 0.0)


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _check_design(design: str, rho: Any) -> jax.Array:
    check_choice(design, "design", DESIGNS)
    rho = jnp.asarray(rho)
    if rho.ndim != 0:
        raise ValueError(f"rho must be a scalar; got shape {rho.shape}.")
    if not isinstance(rho, jax.core.Tracer) and not 0.0 <= float(rho) < 1.0:
        raise ValueError(f"rho must be in [0, 1) (Toeplitz correlation rho^|i-j|); got {rho}.")
    return rho


def _sparse_signal(k_support: jax.Array, k_values: jax.Array, d: int, k: int, prior: str,
                   dtype: Any) -> tuple[jax.Array, jax.Array]:
    """A ``k``-sparse ``(d,)`` signal: uniform support, values from ``prior``; its support.

    A traced ``k`` draws ``d`` values and keeps the first ``k``: the same signal (the
    first ``k`` of a draw of ``d`` are the draw of ``k``).
    """
    perm = jax.random.permutation(k_support, d)
    size = d if _traced(k) else k
    if prior == "gaussian":
        values = jax.random.normal(k_values, (size,), dtype)
    else:
        values = jax.random.rademacher(k_values, (size,), dtype)
    if _traced(k):
        keep = jnp.arange(d) < k
        return (jnp.zeros((d,), dtype).at[perm].set(jnp.where(keep, values, 0.0)),
                jnp.zeros((d,), bool).at[perm].set(keep))
    idx = perm[:k]
    support = jnp.zeros((d,), bool).at[idx].set(True)
    return jnp.zeros((d,), dtype).at[idx].set(values), support


def _draw(key, n, d, k, design, rho, prior, dtype, rows=None):
    """Validate the sizes and options, then draw ``A``, the ``k``-sparse ``x`` and its
    support; returns ``(A, x, support, observation_key)``. One key split shared by every
    generator, so the same key gives the same ``A`` and ``x`` in all of them."""
    n = check_int(n, "n", low=1)
    d = check_int(d, "d", low=1)
    k = k if _traced(k) else check_int(k, "k", low=0, high=d)
    _check_rows(rows, n)
    rho = _check_design(design, rho)
    check_choice(prior, "prior", PRIORS)
    dtype = _dtype(dtype)
    k_design, k_support, k_values, k_obs = jax.random.split(check_key(key), 4)
    a = _design(k_design, n, d, design, rho, dtype, rows)
    x_true, support = _sparse_signal(k_support, k_values, d, k, prior, dtype)
    return a, x_true, support, k_obs


def _check_rows(rows: Any, n: int) -> None:
    if rows is not None and not _traced(rows):
        check_int(rows, "rows", low=1, high=n)


def sparse_linear_regression(
    key: jax.Array, n: int, d: int, k: int, *, noise: Any = 0.0, dtype: Any = None,
    design: str = "gaussian", rho: Any = 0.0, prior: str = "gaussian", rows: Any = None,
) -> SparseRegression:
    """Sparse linear regression ``y = A x + noise * eps``, ``eps ~ N(0, I_n)``.

    Args:
      key: PRNG key; the only source of randomness (same key, same instance).
      n, d, k: static ints, ``n >= 1`` measurements, ``d >= 1`` unknowns, ``0 <= k <= d``
        nonzeros.
      noise: standard deviation of the additive Gaussian noise (may be traced).
      dtype: floating dtype (default: JAX's default float).
      design: ``"gaussian"`` (the paper's ``N(0, 1/n)``), ``"correlated"`` (Toeplitz
        ``rho``) or ``"rademacher"``.
      rho: correlation of neighbouring columns for ``design="correlated"``, in ``[0, 1)``.
      prior: distribution of the nonzeros, ``"gaussian"`` or ``"rademacher"``.
      rows: pad to ``n`` rows: the first ``rows`` (may be traced) are the instance with
        ``n = rows``, the others zero (see the module docstring); ``k`` may then be traced.

    With the defaults this is the paper's synthetic problem.

    Example:
      >>> prob = sparse_linear_regression(jax.random.key(0), n=256, d=128, k=16)
      >>> prob.design.shape, int(prob.support.sum())
      ((256, 128), 16)
    """
    noise = check_nonnegative_scalar(noise, "noise")
    a, x_true, support, k_noise = _draw(key, n, d, k, design, rho, prior, dtype, rows)
    y = a @ x_true + noise.astype(a.dtype) * jax.random.normal(k_noise, (a.shape[0],), a.dtype)
    return SparseRegression(a, _zero_padding(y, rows), x_true, support)


def measure_signal(
    key: jax.Array, x_true: jax.Array, n: int, *, noise: Any = 0.0, design: str = "gaussian",
    rho: Any = 0.0, rows: Any = None,
) -> SparseRegression:
    """Linear measurements ``y = A x_true + noise * eps`` of a given signal (any prior).

    ``x_true`` is a ``(d,)`` float vector (for the MNIST prior an image's pixels, see
    :func:`mnist_signals`); its support is its nonzeros. vmappable over ``key`` and
    ``x_true``: ``jax.vmap(partial(measure_signal, n=1568))(keys, images)``. ``rows``: as
    in :func:`sparse_linear_regression`.
    """
    x_true = jnp.asarray(x_true)
    if x_true.ndim != 1 or not jnp.issubdtype(x_true.dtype, jnp.floating):
        raise ValueError(
            f"x_true must be a 1-D float vector; got shape {x_true.shape}, dtype "
            f"{x_true.dtype} (flatten images and cast them, e.g. image.reshape(-1) / 255.0)."
        )
    n = check_int(n, "n", low=1)
    _check_rows(rows, n)
    noise = check_nonnegative_scalar(noise, "noise")
    rho = _check_design(design, rho)
    k_design, k_noise = jax.random.split(check_key(key))
    a = _design(k_design, n, x_true.shape[0], design, rho, x_true.dtype, rows)
    y = a @ x_true + noise.astype(x_true.dtype) * jax.random.normal(k_noise, (n,), x_true.dtype)
    return SparseRegression(a, _zero_padding(y, rows), x_true, x_true != 0)


def mnist_signals(images: Any, count: int, *, key: jax.Array | None = None,
                  scale: float = 255.0, dtype: Any = None) -> jax.Array:
    """``(count, H*W)`` signals from MNIST images (the paper's MNIST prior).

    ``images`` is ``(N, H, W[, 1])`` in ``[0, 1]`` as :func:`iobs_jax.mnist.load_mnist`
    returns; pixel values are multiplied by ``scale`` (255: the paper's 0..255 range).
    Without ``key`` the first ``count`` images are used, else ``count`` drawn without
    replacement. Example: ``mnist_signals(load_mnist().images, 20)``.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] < 1:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 1); got {images.shape}.")
    count = check_int(count, "count", low=1, high=images.shape[0])
    flat = images.reshape(images.shape[0], -1)
    idx = (np.arange(count) if key is None
           else np.asarray(jax.random.choice(check_key(key), images.shape[0], (count,),
                                             replace=False)))
    return jnp.asarray(flat[idx] * scale, _dtype(dtype))


def sparse_logistic_regression(
    key: jax.Array, n: int, d: int, k: int, *, dtype: Any = None, design: str = "gaussian",
    rho: Any = 0.0, prior: str = "gaussian", rows: Any = None,
) -> SparseRegression:
    """Sparse logistic regression: labels ``y_i ~ Bernoulli(sigmoid(sqrt(n) (A x)_i))``.

    ``A`` as in :func:`sparse_linear_regression` (entries of variance ``1/n``, so the
    logits ``sqrt(n) A x`` have variance ``||x||^2``); the labels are 0/1 floats. The loss
    is :func:`logistic_loss`. ``rows``: as in :func:`sparse_linear_regression`. Example:
    ``sparse_logistic_regression(jax.random.key(0), 500, 50, 5).observations[:3]``.
    """
    a, x_true, support, k_labels = _draw(key, n, d, k, design, rho, prior, dtype, rows)
    m = a.shape[0] if rows is None else rows
    p = jax.nn.sigmoid(jnp.sqrt(jnp.asarray(m, a.dtype)) * (a @ x_true))
    y = jax.random.bernoulli(k_labels, p).astype(a.dtype)
    return SparseRegression(a, _zero_padding(y, rows), x_true, support)


def quadratic_measurements(
    key: jax.Array, n: int, d: int, k: int, *, noise: Any = 0.0, dtype: Any = None,
    design: str = "gaussian", rho: Any = 0.0, prior: str = "gaussian", rows: Any = None,
) -> SparseRegression:
    """Quadratic measurements ``y = (A x)^2 + noise * eps`` (sparse phase retrieval).

    ``x`` is identifiable only up to its sign. The loss is :func:`quadratic_loss`,
    whose gradient vanishes at ``x = 0``: start solvers from :func:`spectral_init`.
    ``rows``: as in :func:`sparse_linear_regression`. Example:
    ``quadratic_measurements(jax.random.key(0), 200, 64, 4).observations.min() >= 0``.
    """
    noise = check_nonnegative_scalar(noise, "noise")
    a, x_true, support, k_noise = _draw(key, n, d, k, design, rho, prior, dtype, rows)
    y = (a @ x_true) ** 2 + noise.astype(a.dtype) * jax.random.normal(
        k_noise, (a.shape[0],), a.dtype)
    return SparseRegression(a, _zero_padding(y, rows), x_true, support)


def spectral_init(design: jax.Array, observations: jax.Array, k: int,
                  num_iters: int = 50) -> jax.Array:
    """Sparse spectral estimate for quadratic measurements (a starting point, vmappable).

    With ``Y = A^T diag(y) A`` (``E[Y] = (||x||^2 I + 2 x x^T) / n`` for the Gaussian
    design): keep the ``k`` coordinates of largest ``diag(Y)``, take the leading
    eigenvector of ``Y`` restricted to them by power iteration, and scale it to norm
    ``sqrt(sum(y))`` (since ``E[sum y] = ||x||^2``). ``k`` may be traced, and zero rows
    (padding) change nothing. Example:
    ``x0 = spectral_init(prob.design, prob.observations, k)``.
    """
    from iobs_jax.core.curvature import power_iteration
    from iobs_jax.core.masks import topk_any  # the one top-k

    design, observations = jnp.asarray(design), jnp.asarray(observations)
    if design.ndim != 2 or observations.shape != design.shape[:1]:
        raise ValueError(f"spectral_init needs design (n, d) and observations (n,); got "
                         f"shapes {design.shape} and {observations.shape}.")
    k = k if _traced(k) else check_int(k, "k", low=1, high=design.shape[1])
    m = topk_any(jnp.einsum("ni,n,ni->i", design, observations, design), k)
    y = design.T @ (observations[:, None] * design) * (m[:, None] & m[None, :])
    v = jnp.where(m, 1.0 + 0.1 * jnp.arange(design.shape[1], dtype=design.dtype), 0.0)
    _, v = power_iteration(lambda u: y @ u, design.shape[1], design.dtype, num_iters,
                           start=v, return_vector=True)
    return v * jnp.sqrt(jnp.maximum(jnp.sum(observations), 0.0))
