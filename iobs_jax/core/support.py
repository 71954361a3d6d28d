"""Dense solves on a support whose size may be traced: gathered blocks with padding.

A top-k support with a static ``k`` is gathered into a ``(k, k)`` block
(:meth:`DenseCurvature.masked_solve` with ``size=k``). When ``k`` is traced (a sweep
compiles one program for every ``k``), the block has a static capacity ``K >= k``: slot
``i < k`` holds the ``i``-th index of the support (ascending, as ``jnp.nonzero`` returns
them) and the slots ``i >= k`` are padding. The padded block is block diagonal,

    [[B_SS, 0], [0, s I]],        s = mean |diag B_SS|,

so its Cholesky factor, its solves and its inverse are those of ``B_SS`` on the valid
slots, and right-hand sides that vanish on the padding give solutions that vanish there.
``s`` keeps the padding on the block's scale: the padding's inverse diagonal ``1/s`` is
never above the largest diagonal entry of ``B_SS^{-1}`` (``[B^{-1}]_ii >= 1 / B_ii``), so
greedy OBS's round-off floor on that diagonal does not move.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from iobs_jax.core.curvature import DenseCurvature, guarded_cholesky

__all__ = [
    "support_slots",
    "count_jitter",
    "support_cholesky",
    "SupportCurvature",
    "dense_support_solve",
]


def support_slots(mask: jax.Array, count: Any, capacity: int) -> tuple[jax.Array, jax.Array]:
    """``(idx, valid)``: the indices of ``mask``'s True entries in ``capacity`` slots and
    which slots hold one (the first ``count``; ``mask`` must have ``count`` True)."""
    idx = jnp.nonzero(mask, size=capacity, fill_value=0)[0]
    return idx, jnp.arange(capacity) < count


def count_jitter(diag: jax.Array, count: Any) -> jax.Array:
    """The Cholesky jitter of :class:`DenseCurvature` (``size * eps * mean |diag|``) for a
    diagonal whose first ``count`` entries are the matrix's and whose others are zero."""
    tiny, eps = jnp.finfo(diag.dtype).tiny, jnp.finfo(diag.dtype).eps
    mean = jnp.sum(jnp.abs(diag)) / jnp.maximum(count, 1)
    return count * eps * jnp.maximum(mean, tiny)


def support_cholesky(block: jax.Array, valid: jax.Array, count: Any, *,
                     guarded: bool = False) -> jax.Array:
    """Lower Cholesky factor of a gathered block: the block (symmetrized) on the ``valid``
    slots, ``s I`` on the others.

    ``guarded=False`` factors as :class:`DenseCurvature` does, with its round-off jitter
    added up front; ``guarded=True`` adds nothing unless the plain factor fails, then
    retries by :func:`~iobs_jax.core.curvature.guarded_cholesky` (the layer-wise methods,
    whose Hessians are damped already).
    """
    both = valid[:, None] & valid[None, :]
    sym = jnp.where(both, 0.5 * (block + block.T), 0.0)
    diag = jnp.diagonal(sym)
    fill = jnp.sum(jnp.abs(diag)) / jnp.maximum(count, 1)
    fill = jnp.where(fill > 0, fill, 1.0)
    if guarded:
        return guarded_cholesky(sym + jnp.diag(jnp.where(valid, 0.0, fill)))[0]
    jitter = count_jitter(diag, count)
    return jnp.linalg.cholesky(sym + jnp.diag(jnp.where(valid, jitter, fill)))


class SupportCurvature:
    """A dense (already damped) matrix ``A`` whose masked solves run on a support of
    ``count`` entries (may be traced) through a ``(capacity, capacity)`` padded block.

    ``masked_solve(mask, b)`` solves ``A_QQ z_Q = b_Q``, ``z_P = 0`` for ``Q = mask`` (exactly
    ``count`` True entries), so :func:`~iobs_jax.core.obs.project` and
    :func:`~iobs_jax.core.obs.project_inverse_form` run on it as on any curvature: the
    traced-``k`` solvers and the layer-wise refit (one row at a time) use it.
    ``guarded``: see :func:`support_cholesky`.
    """

    def __init__(self, matrix: jax.Array, count: Any, capacity: int, *, guarded: bool = False):
        self.matrix, self.count, self.capacity, self.guarded = matrix, count, capacity, guarded

    def matvec(self, v: jax.Array) -> jax.Array:
        return self.matrix @ v.astype(self.matrix.dtype)

    def masked_solve(self, mask: jax.Array, b: jax.Array, size: Any = None) -> jax.Array:
        b = b.astype(self.matrix.dtype)
        if self.capacity == 0:
            return jnp.zeros_like(b)
        idx, valid = support_slots(mask, self.count, self.capacity)
        chol = support_cholesky(self.matrix[idx[:, None], idx[None, :]], valid, self.count,
                                guarded=self.guarded)
        z = cho_solve((chol, True), jnp.where(valid, b[idx], 0.0))
        return jnp.zeros_like(b).at[idx].add(jnp.where(valid, z, 0.0))


def dense_support_solve(curv: DenseCurvature, mask: jax.Array, b: jax.Array, count: Any,
                        capacity: int) -> jax.Array:
    """``curv.masked_solve(mask, b, count)`` for a traced ``count <= capacity``.

    Solves ``(H + damping I)_QQ z_Q = b_Q`` with ``z_P = 0`` on the support ``Q = mask``
    (exactly ``count`` True entries) through a ``(capacity, capacity)`` padded block.
    """
    damped = curv.matrix + curv.damping * jnp.eye(curv.size, dtype=curv.dtype)
    return SupportCurvature(damped, count, capacity).masked_solve(mask, b)
