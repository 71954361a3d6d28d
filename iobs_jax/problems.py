"""Synthetic sparse-recovery problems: vmappable generators from an explicit PRNG key.

Each generator returns a :class:`SparseRegression` NamedTuple, so a batch of instances is
``jax.vmap(partial(sparse_linear_regression, n=..., d=..., k=...))(keys)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._validation import check_int, check_nonnegative_scalar

__all__ = ["SparseRegression", "sparse_linear_regression", "mse_loss"]


class SparseRegression(NamedTuple):
    """A sparse linear regression instance ``y = A x_true + noise``.

    Attributes:
      design: ``(n, d)`` matrix ``A``.
      observations: ``(n,)`` vector ``y``.
      x_true: ``(d,)`` the ``k``-sparse signal.
      support: ``(d,)`` boolean, True on the nonzeros of ``x_true``.
    """

    design: jax.Array
    observations: jax.Array
    x_true: jax.Array
    support: jax.Array


def mse_loss(x: jax.Array, design: jax.Array, observations: jax.Array) -> jax.Array:
    """Mean squared error ``(1/n) ||A x - y||^2`` (the paper's loss; Hessian ``2 A^T A / n``)."""
    r = design @ x - observations
    return jnp.mean(r**2)


def sparse_linear_regression(
    key: jax.Array, n: int, d: int, k: int, *, noise: Any = 0.0, dtype: Any = None
) -> SparseRegression:
    """The paper's synthetic problem: ``A_ij ~ N(0, 1/n)``, ``k`` nonzeros ``~ N(0, 1)``.

    The support is uniform among the ``d choose k`` subsets; ``y = A x + noise * eps`` with
    ``eps ~ N(0, I_n)``. Same key, same instance.

    Example:
      >>> prob = sparse_linear_regression(jax.random.key(0), n=256, d=128, k=16)
      >>> prob.design.shape, int(prob.support.sum())
      ((256, 128), 16)
    """
    n = check_int(n, "n", low=1)
    d = check_int(d, "d", low=1)
    k = check_int(k, "k", low=0, high=d)
    noise = check_nonnegative_scalar(noise, "noise")
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    k_design, k_support, k_values, k_noise = jax.random.split(key, 4)
    design = jax.random.normal(k_design, (n, d), dtype) / jnp.sqrt(jnp.asarray(n, dtype))
    support_idx = jax.random.permutation(k_support, d)[:k]
    support = jnp.zeros((d,), bool).at[support_idx].set(True)
    x_true = jnp.zeros((d,), dtype).at[support_idx].set(jax.random.normal(k_values, (k,), dtype))
    y = design @ x_true + noise.astype(dtype) * jax.random.normal(k_noise, (n,), dtype)
    return SparseRegression(design, y, x_true, support)
