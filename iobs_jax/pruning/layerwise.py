"""Layer-wise pruning of one linear layer: magnitude, Wanda, SparseGPT, OBC and I-OBS.

For a layer with dense weights ``W0`` of shape ``(rows, cols)`` (rows = outputs) and
calibration inputs ``X`` (``cols`` features, ``N`` samples) the layer loss is

    L(W) = ||W X - W0 X||_F^2 / N = tr((W - W0) H (W - W0)^T),   H = X X^T / N.

Every row is an independent OBS problem sharing ``H``. All functions here take
``(W0, H)`` as arrays (float32 or float64), are pure and jit-compatible, and return
``(W, mask)`` with ``mask`` True on kept weights (``(W, mask, info)`` with
``return_info=True``). The model-level driver is :func:`iobs_jax.prune`.

**One factor, one sweep.** Write ``H = R R^T`` with ``R`` *upper* triangular (the
Cholesky factor of ``H`` with its index order reversed). For ``D = T - W`` (the change
from a target ``T``) the loss is ``||D R||^2`` and ``E = D R`` is computed column by
column: ``E_j = D_j R_jj + s_j`` with ``s_j = sum_{i<j} D_i R_ij``. SparseGPT keeps
``E_j = 0`` on the kept weights (the error of a pruned weight is spread over the
columns to its right) and prunes by the saliency ``E_j^2`` a weight would cost; this is
the reference algorithm with ``R = U^{-1}`` (``U`` its upper Cholesky factor of
``H^{-1}``), without ever forming ``H^{-1}``. :func:`_sweep` is that column recursion,
blocked (one matrix product per block of columns, registers inside a block) and shared
by SparseGPT, by I-OBS's mask selection and by the refit's preconditioned operator.

**The exact refit.** On a fixed support ``Q`` (``P`` pruned) the best weights minimise
``||E||^2 = ||y||^2 + ||E0_P + y K||^2`` over ``y = E_Q``, with ``E0`` SparseGPT's
residual and ``K = R_QQ^{-1} R_QP``. The normal equations ``y (I + K K^T) = -E0_P K^T``
are solved by conjugate gradients; ``y K`` is one forward sweep and ``u K^T`` one
backward sweep, so CG is preconditioned by SparseGPT itself and its loss is known
exactly at every step, which is what the stopping rule watches. Measured on
all-MiniLM-L6-v2: 3 iterations come within 1% of the exact refit's loss on its 384-input
layers, within ~20% on its 1536-input FFN output (condition number 3e4), where the
refit reports that it stopped at its cap.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core  # trace_state_clean: no public equivalent
from jax.scipy.linalg import cho_solve, solve_triangular

from iobs_jax.core.curvature import (
    CGState,
    _jitter,
    cg_step,
    cholesky_inverse,
    grow_jitter,
    guarded_cholesky,
)
from iobs_jax.core.masks import nm_mask, topk_traced
from iobs_jax.core.obs import greedy_obs_unchecked, project, project_inverse_form
from iobs_jax.core.support import SupportCurvature

# Rows are solved in chunks: a (rows, k, k) batch of gathered blocks does not fit in
# cache (or memory) for wide layers, and lax.map keeps one compiled body.
_ROW_CHUNK = 32
# The column sweep keeps at most this many columns in registers between two rank-`sub`
# matrix updates (16: 136 fused multiply-adds per row, measured 10x faster on CPU than
# rank-one updates of a whole 128-column block).
_SUB = 8
_HI = lax.Precision.HIGHEST  # float32 products at full precision on GPU/TPU too


# XLA's CPU "fusion emitters" took 2x the compile time of the classic emitters on these
# programs and ran no faster (measured: SparseGPT on 3072x768, 2.9 s -> 1.4 s compile).
_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _jit(fun=None, *, static_argnames=()):
    """``jax.jit`` with :data:`_CPU_OPTIONS` for a top-level call compiled for CPU (nested
    in a caller's ``jit``, or on GPU/TPU, the plain ``jax.jit``: options belong to the
    outermost program and to its backend)."""
    if fun is None:
        return functools.partial(_jit, static_argnames=static_argnames)
    plain = jax.jit(fun, static_argnames=static_argnames)
    cpu = jax.jit(fun, static_argnames=static_argnames, compiler_options=_CPU_OPTIONS)

    def pick():
        top = jax_core.trace_state_clean()
        return cpu if top and jax.default_backend() == "cpu" else plain

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return pick()(*args, **kwargs)

    call.lower = lambda *a, **k: pick().lower(*a, **k)
    return call


@_jit
def damp_hessian(h: jax.Array, damping: float) -> jax.Array:
    """``H + damping * mean(diag H) * I`` (SparseGPT's relative damping).

    Inputs that are always zero make ``H`` singular (blank MNIST pixels, padded
    features); relative damping keeps every solve well posed. An all-zero ``H`` gets
    the identity, so a layer that never saw a non-zero input degrades to magnitude.
    """
    mean = jnp.mean(jnp.diagonal(h))
    lam = jnp.where(mean > 0, damping * mean, 1.0)
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)


@_jit
def layer_loss(w: jax.Array, w0: jax.Array, h: jax.Array) -> jax.Array:
    """``tr((W - W0) H (W - W0)^T)``: the layer's mean squared output error."""
    delta = (w - w0).astype(h.dtype)
    return jnp.sum((delta @ h) * delta)


class LayerStats(NamedTuple):
    """Calibration statistics of one layer, averaged over ``N`` samples (token positions).

    ``h = X X^T / N`` of the inputs the layer receives in the (partly pruned) model; with
    dense-output targets also ``cross = X_d X^T / N`` and ``hd = X_d X_d^T / N``, ``X_d``
    the inputs the same layer receives in the dense model (else both None).
    """

    h: jax.Array
    cross: jax.Array | None = None
    hd: jax.Array | None = None


@_jit
def target_loss(w: jax.Array, w0: jax.Array, stats: LayerStats) -> jax.Array:
    """``||W X - W0 X_d||^2 / N``: the layer's error against the dense model's outputs.

    Equals :func:`layer_loss` ``(w, w0, h)`` when there are no cross statistics
    (``X_d = X``). Expanded: ``tr(W H W^T) - 2 tr(W C^T W0^T) + tr(W0 H_d W0^T)``.
    """
    if stats.cross is None:
        return layer_loss(w, w0, stats.h)
    w, w0 = w.astype(stats.h.dtype), w0.astype(stats.h.dtype)
    value = (jnp.sum((w @ stats.h) * w) - 2.0 * jnp.sum(w * (w0 @ stats.cross))
             + jnp.sum((w0 @ stats.hd) * w0))
    return jnp.maximum(value, 0.0)  # rounding can make an exact fit slightly negative


@_jit
def dense_target(w0: jax.Array, stats: LayerStats, h_damped: jax.Array) -> jax.Array:
    """The dense least-squares point for dense-model targets: ``W0 C (H + lambda I)^{-1}``.

    ``||W X - W0 X_d||^2 = tr((W - W~) H (W - W~)^T) + const`` with ``W~ H = W0 C``, so
    every method that minimizes ``tr((W - W0) H (W - W0)^T)`` minimizes the dense-target
    loss when given ``W~`` in place of ``W0``: the layer then also corrects the error its
    pruned predecessors left in its inputs.
    """
    rhs = (w0.astype(h_damped.dtype) @ stats.cross).T
    dead = dead_inputs(h_damped)
    chol, _ = guarded_cholesky(_with_diagonal(h_damped, _guarded_diagonal(h_damped, dead)))
    return cho_solve((chol, True), rhs).T


def keep_count(size: int, sparsity: float) -> int:
    """Number of weights kept out of ``size`` at ``sparsity`` (the pruned count is rounded)."""
    return size - int(round(sparsity * size))


def _kept(size, sparsity) -> jax.Array:
    """:func:`keep_count` for a traced ``sparsity`` (both round half to even)."""
    return (size - jnp.round(jnp.asarray(sparsity, jnp.float32) * size)).astype(jnp.int32)


def select_mask(
    scores: jax.Array, sparsity, scope: str, nm: tuple[int, int] | None
) -> jax.Array:
    """Keep the largest ``scores`` of a ``(rows, cols)`` layer.

    ``scope="layer"``: one top-k over the whole layer; ``"row"``: the same count in every
    row; ``nm=(n, m)``: ``n`` of every ``m`` consecutive inputs in each row (``sparsity``
    is then ``1 - n/m`` and ignored). Ties go to the lower index. ``sparsity`` may be
    traced (one compiled program serves every sparsity).
    """
    rows, cols = scores.shape
    if nm is not None:
        return nm_mask(scores, nm[0], nm[1], axis=1)
    if scope == "row":
        k = _kept(cols, sparsity)
        return jax.vmap(lambda s: topk_traced(s, k))(scores)
    k = _kept(rows * cols, sparsity)
    return topk_traced(scores.reshape(-1), k).reshape(rows, cols)


# ------------------------------------------------------------ Hessian and its factor


def dead_inputs(h: jax.Array) -> jax.Array:
    """Inputs that were never active: ``(cols,)`` bool.

    An input that is always zero has a zero row and column in ``X X^T``; after relative
    damping its diagonal is the damping alone. Detected as: no off-diagonal entry and a
    diagonal at most a quarter of the mean diagonal (so any damping up to 1/3 of the mean
    is recognised, and a whitened ``H = c I`` has no dead input). Works on the raw or the
    damped ``H``; their weights change nothing in the layer's output and are pruned first.
    """
    d = jnp.diagonal(h)
    eye = lax.broadcasted_iota(jnp.int32, h.shape, 0) == lax.broadcasted_iota(jnp.int32, h.shape, 1)
    isolated = ~jnp.any((h != 0) & ~eye, axis=1)  # one pass over H
    return isolated & (d <= 0.25 * jnp.mean(d))


def _guarded_diagonal(h: jax.Array, dead: jax.Array) -> jax.Array:
    """The diagonal to factor: dead inputs without damping get the mean live diagonal.

    A dead input's row is zero, so with ``damping=0`` ``H`` is singular and its factor
    NaN; with a positive diagonal the input is decoupled (its weight is pruned anyway).
    A damped dead input (diagonal = the damping) is left as it is.
    """
    d = jnp.diagonal(h)
    live = jnp.sum(jnp.where(dead, 0.0, d)) / jnp.maximum(jnp.sum(~dead), 1)
    return jnp.where(dead & (d <= 0), jnp.where(live > 0, live, 1.0), d)


def _with_diagonal(h: jax.Array, d: jax.Array) -> jax.Array:
    eye = lax.broadcasted_iota(jnp.int32, h.shape, 0) == lax.broadcasted_iota(jnp.int32, h.shape, 1)
    return jnp.where(eye, d[:, None], h)


class _Tri(NamedTuple):
    """An upper triangular ``R`` (``H = R R^T``), stored as ``R`` or as ``R^T``.

    Whichever is at hand is used as it is: transposing a large matrix is a slow memory
    pass on CPU (0.7 s at 4096 x 4096 with XLA's classic emitters), while every product
    of the sweep can read either orientation.
    """

    m: jax.Array
    transposed: bool  # static: m is R^T

    def diagonal(self):
        return jnp.diagonal(self.m)

    def block(self, b0, size):
        """``R[b0:b0+size, b0:b0+size]`` (upper triangular)."""
        part = lax.dynamic_slice(self.m, (b0, b0), (size, size))
        return part.T if self.transposed else part

    def earlier(self, z, b0, block):
        """``sum_{i < b0} R[i, b0:b0+block]^T z_i``: what the earlier columns add to a block.

        Summed over chunks of inputs up to ``b0`` only (a loop with a traced trip count),
        so a sweep costs ``rows * cols^2`` multiply-adds like the reference's lazy
        updates, not the ``2 * rows * cols^2`` of one product with all of ``z``.
        """
        cols, rows = z.shape
        chunk = max(c for c in range(block, min(cols, 4 * block) + 1, block) if cols % c == 0)

        def add(c, acc):
            zc = lax.dynamic_slice_in_dim(z, c * chunk, chunk)
            if self.transposed:  # R^T[b0:, chunk] @ z[chunk]
                part = lax.dynamic_slice(self.m, (b0, c * chunk), (block, chunk))
                return acc + jnp.matmul(part, zc, precision=_HI)
            part = lax.dynamic_slice(self.m, (c * chunk, b0), (chunk, block))
            return acc + lax.dot_general(part, zc, (((0,), (0,)), ((), ())), precision=_HI)

        zero = jnp.zeros((block, rows), z.dtype)
        return lax.fori_loop(0, (b0 + chunk - 1) // chunk, add, zero)

    def mirrored(self):
        """``J R^T J``, the factor of the backward sweep (which runs on reversed columns)."""
        return _Tri(self.m[::-1, ::-1], not self.transposed)


@_jit
def _inverse(h: jax.Array) -> jax.Array:
    """``H^{-1}`` from one guarded Cholesky factor (dead inputs decoupled first)."""
    chol, _ = guarded_cholesky(_with_diagonal(h, _guarded_diagonal(h, dead_inputs(h))))
    return cholesky_inverse(chol)


# ------------------------------------------------------------------- the column sweep


class _Plan(NamedTuple):
    """Static shape of a sweep (hashable: part of the compiled program's key).

    ``select``: ``"fixed"`` (mask given), ``"block"`` (SparseGPT: top-k of each block of
    ``block`` columns from the values at the block's start), ``"fresh"`` (the block's
    ranking only allocates counts to its sub-blocks of ``sub`` columns; each sub-block
    chooses again from up-to-date values) or ``"nm"``. ``rowwise``: counts per row.
    """

    block: int
    sub: int
    select: str = "fixed"
    nm: tuple[int, int] | None = None
    rowwise: bool = False
    want_s: bool = True


def _sub_width(block: int, m: int) -> int:
    """Widest sub-block (at most ``_SUB`` columns, or ``m``) dividing ``block`` into N:M groups."""
    fits = [d for d in range(1, max(_SUB, m) + 1) if block % d == 0 and d % m == 0]
    if not fits:
        raise ValueError(f"blocksize {block} must be a multiple of the N:M group size {m}.")
    return max(fits)


def _make_plan(cols: int, blocksize: int, select: str, nm=None, rowwise=False, want_s=True):
    block = max(1, min(blocksize, cols))
    if nm is not None and block % nm[1]:
        block = nm[1] * max(1, block // nm[1])
    return _Plan(block, _sub_width(block, 1 if nm is None else nm[1]), select, nm, rowwise,
                 want_s)


def _all_kept(acc, v, rs, inv):
    """Unmasked forward solve inside a sub-block: the values ``x`` if nothing is pruned
    (``inv = 1 / diag(rs)``)."""
    acc = list(acc)
    xs = []
    for c in range(len(acc)):
        x = (v[c] - acc[c]) * inv[c]
        xs.append(x)
        for c2 in range(c + 1, len(acc)):
            acc[c2] = acc[c2] + rs[c, c2] * x
    return xs


def _columns(acc, f, v, keep, rs, inv, ban, nm):
    """The sequential recursion on one sub-block, unrolled (``acc[c] = s_c`` on entry).

    ``z_c = (v_c - s_c) / R_cc`` where kept, ``f_c`` where pruned; then ``s`` of the
    later columns gains ``R_cc' z_c`` (``inv = 1 / diag(rs)``: reciprocals computed once
    per sub-block, not one small kernel per column). With ``nm`` each group of ``m`` columns first
    keeps the ``n`` largest ``((f - x) R_cc)^2`` of every row, ``x`` the group's values
    if nothing in it were pruned. Returns lists ``(z, s, keep)`` over the columns.
    """
    acc, keep = list(acc), list(keep)
    zs, ss = [], []
    for c in range(len(acc)):
        if nm is not None and c % nm[1] == 0:
            g = slice(c, c + nm[1])
            xs = _all_kept(acc[g], v[g], rs[g, g], inv[g])
            sal = [jnp.where(ban[c + i], -jnp.inf, ((f[c + i] - x) * rs[c + i, c + i]) ** 2)
                   for i, x in enumerate(xs)]
            chosen = nm_mask(jnp.stack(sal, axis=1), nm[0], nm[1], axis=1)
            keep[g] = [chosen[:, i] for i in range(nm[1])]
        ss.append(acc[c])
        z = jnp.where(keep[c], (v[c] - acc[c]) * inv[c], f[c])
        zs.append(z)
        for c2 in range(c + 1, len(acc)):
            acc[c2] = acc[c2] + rs[c, c2] * z
    return zs, ss, keep


def _top(scores, count, rowwise):
    """Keep ``count`` largest scores of a ``(width, rows)`` slab (per row if ``rowwise``)."""
    if rowwise:
        return jax.vmap(topk_traced, in_axes=(1, 0), out_axes=1)(scores, count)
    return topk_traced(scores.reshape(-1), count).reshape(scores.shape)


def _saliency(f, x, rdiag, ban):
    """``((f - x) R_jj)^2``: the loss a pruned weight adds; banned inputs go first."""
    return jnp.where(ban[:, None], -jnp.inf, ((f - x) * rdiag[:, None]) ** 2)


def _block(plan, r, r_inv, f, v, keep, count, ban, acc):
    """One block of columns given ``acc = s`` from the earlier blocks: ``(z, s, keep)``.

    Inside the block each sub-block gets its ``s`` from the block's columns to its left
    by one small product (left-looking: nothing else in the block is rewritten).
    """
    if plan.select in ("block", "fresh"):
        # x: the block's values if nothing in it were pruned (R_bb^T x = v - acc)
        x = jnp.matmul(r_inv.T, v - acc, precision=_HI)
        keep = _top(_saliency(f, x, jnp.diagonal(r), ban), count, plan.rowwise)
    r_cols = r.T  # a small block: rows of R_bb^T are its columns
    inv_diag = 1.0 / jnp.diagonal(r)

    def sub_block(i, carry):
        z, s, kept = carry
        c0 = i * plan.sub
        cut = lambda a: lax.dynamic_slice_in_dim(a, c0, plan.sub)
        rs = lax.dynamic_slice(r, (c0, c0), (plan.sub, plan.sub))
        a = cut(acc) + jnp.matmul(cut(r_cols), z, precision=_HI)  # z = 0 right of c0
        fs, vs, ks, bs, inv = cut(f), cut(v), cut(kept), cut(ban), cut(inv_diag)
        if plan.select == "fresh":  # same count, chosen from the values reached now
            xs = jnp.stack(_all_kept(a, vs, rs, inv))
            n_keep = jnp.sum(ks, axis=0) if plan.rowwise else jnp.sum(ks)
            ks = _top(_saliency(fs, xs, jnp.diagonal(rs), bs), n_keep, plan.rowwise)
        zs, ss, ks = _columns(a, fs, vs, ks, rs, inv, bs, plan.nm)
        put = lambda x, y: lax.dynamic_update_slice_in_dim(x, jnp.stack(y), c0, 0)
        return put(z, zs), put(s, ss) if plan.want_s else s, put(kept, ks)

    zero = jnp.zeros_like(f)
    init = (zero, zero if plan.want_s else None, keep)
    return lax.fori_loop(0, f.shape[0] // plan.sub, sub_block, init)


def _sweep(plan, tri, f, v, keep, counts, ban, r_inv=None):
    """The column recursion of SparseGPT, general form, in column-major layout.

    Arrays are ``(cols, rows)`` (one output row per column of the slab; ``cols`` a
    multiple of ``plan.block``), ``tri`` the upper triangular ``R`` (:class:`_Tri`). For
    each input ``j`` in order,
    with ``s_j = sum_{i<j} z_i R_ij``: ``z_j = (v_j - s_j) / R_jj`` where ``j`` is kept and
    ``z_j = f_j`` where it is pruned, so ``(z R)_j = v_j`` on the support and ``z = f``
    off it. With ``f = W0^T`` and ``v = 0`` this is SparseGPT (``W = W0 - z`` on the
    support); with a fixed mask it is the masked triangular solve that CG's operator
    needs. Blocks see the earlier blocks through one product ``R[:, block]^T z``.

    ``r_inv``: the inverses of ``r``'s diagonal blocks (:func:`_block_inverses`), needed
    to rank a block before its sweep. Returns ``(z, s, keep)``; ``s`` is None unless
    ``plan.want_s``.
    """
    cols, rows = f.shape
    nblocks = cols // plan.block

    def one(b, carry):
        z, s, kept = carry
        b0 = b * plan.block
        cut = lambda a: lax.dynamic_slice_in_dim(a, b0, plan.block)
        rb = tri.block(b0, plan.block)
        acc = tri.earlier(z, b0, plan.block)
        rib = None if r_inv is None else r_inv[b]
        zb, sb, kb = _block(plan, rb, rib, cut(f), cut(v), cut(kept), counts[b], cut(ban), acc)
        put = lambda a, x: lax.dynamic_update_slice_in_dim(a, x, b0, 0)
        return put(z, zb), put(s, sb) if plan.want_s else s, put(kept, kb)

    zero = jnp.zeros_like(f)
    z, s, keep = lax.fori_loop(0, nblocks, one, (zero, zero if plan.want_s else None, keep))
    return z, s, keep


def _block_inverses(tri, block):
    """``R_bb^{-1}`` of every diagonal block: ``(cols // block, block, block)``.

    A block's values before its sweep are one product with it (a triangular solve
    with thousands of right-hand sides ran at 1/10 of the product's speed on CPU).
    """
    n = tri.m.shape[0] // block
    eye = jnp.eye(block, dtype=tri.m.dtype)
    blocks = jax.vmap(lambda b: tri.block(b * block, block))(jnp.arange(n))
    return jax.vmap(lambda rb: solve_triangular(rb, eye, lower=False))(blocks)


# ------------------------------------------------------------- layer in column slabs


class _Factor(NamedTuple):
    """``H = R R^T`` for the sweep, padded to whole blocks (padding: identity, banned).

    ``R = J L J`` with ``L`` the Cholesky factor of ``J H J`` (``J`` reverses the index
    order): one factorization, no inverse. ``R^{-1}`` is SparseGPT's upper Cholesky
    factor of ``H^{-1}``, so ``R_jj^2`` is the Schur complement of input ``j`` given the
    inputs to its right. Stored as ``R^T``, which is LAPACK's column-major ``L`` read
    backwards: no transpose of ``H`` or of the factor is ever materialized.
    """

    rt: jax.Array  # (n, n) R^T, n a multiple of the block
    ban: jax.Array  # (n,) never kept first: dead inputs and padding
    jitter: jax.Array  # added to the diagonal of H (0 unless it could not be factored)
    dead: jax.Array  # (cols,) dead inputs

    def tri(self) -> _Tri:
        return _Tri(self.rt, True)


def _factor_arrays(h, dead, block, jitter):
    cols = h.shape[0]
    pad = -cols % block
    dead = dead_inputs(h) if dead is None else jnp.asarray(dead, bool)
    flipped = _with_diagonal(h, _guarded_diagonal(h, dead) + jitter)[::-1, ::-1]
    # H is symmetric: its transpose is LAPACK's column-major view of the same buffer.
    lower_t = lax.linalg.cholesky(flipped.T, symmetrize_input=False).T
    rt = lower_t[::-1, ::-1]
    if pad:
        rt = jnp.pad(rt, ((0, pad), (0, pad)))
        rt = _with_diagonal(rt, jnp.diagonal(rt) + (jnp.arange(cols + pad) >= cols))
    ban = jnp.concatenate([dead, jnp.ones((pad,), bool)])
    return _Factor(rt, ban, jnp.asarray(jitter, h.dtype), dead)


def _factor_ok(fac):
    return jnp.all(jnp.isfinite(jnp.diagonal(fac.rt)))  # a failed factor is all NaN


def _factor_retry(h, dead, block):
    """Factor ``H + jitter I`` with a jitter from ``d * eps * mean|diag|`` growing 100x per
    try until the factor is finite (round-off on a singular or barely definite ``H``)."""
    return grow_jitter(lambda j: _factor_arrays(h, dead, block, j), _factor_ok,
                       _jitter(jnp.diagonal(h)))[0]


def _factor_checked(h, dead, block):
    fac = _factor_arrays(h, dead, block, 0.0)
    return fac, _factor_ok(fac)


_factor_once = _jit(_factor_checked, static_argnames=("block",))
_factor_retry_jit = _jit(_factor_retry, static_argnames=("block",))


def _factor(h, dead, block) -> _Factor:
    """The guarded factorization: plain first, jittered only if that failed (a NaN factor
    never reaches the sweep). Its own program, shared by every method of a layer shape."""
    if isinstance(h, jax.core.Tracer):  # inside a caller's jit: decide in the graph
        plain, ok = _factor_checked(h, dead, block)
        return lax.cond(ok, lambda: plain, lambda: _factor_retry(h, dead, block))
    fac, ok = _factor_once(h, dead, block)
    if not bool(ok):
        fac = _factor_retry_jit(h, dead, block)
    return fac


def _slab(a, block):
    """``(rows, cols)`` -> ``(cols + pad, rows)``: columns first, zero padding."""
    return jnp.pad(a.T, ((0, -a.shape[1] % block), (0, 0)))


def _counts(sparsity, rows, cols, plan):
    """Kept weights per block: a cumulative rounding, so the blocks add up to exactly
    :func:`keep_count` of the layer (``(nblocks,)``) or of every row (``(nblocks, rows)``)."""
    edges = np.minimum(np.arange(-(-cols // plan.block) + 1) * plan.block, cols)
    per = 1 if plan.rowwise else rows
    kept = _kept(jnp.asarray(edges * per), sparsity)  # kept among the first `edges` inputs
    step = jnp.diff(kept).astype(jnp.int32)
    return jnp.broadcast_to(step[:, None], (step.size, rows)) if plan.rowwise else step


def _no_counts(cols, plan):
    return jnp.zeros((-(-cols // plan.block),), jnp.int32)


def _residual(plan, fac, z, s, keep):
    """``E = z R`` off the support, from one sweep's outputs (it is 0 on the support)."""
    return jnp.where(keep, 0.0, s + z * jnp.diagonal(fac.rt)[:, None])


# ----------------------------------------------------------------------- SparseGPT


def _sparsegpt(w0, fac, sparsity, mask, nm, blocksize):
    rows, cols = w0.shape
    fixed = mask is not None
    plan = _make_plan(cols, blocksize, "fixed" if fixed else ("nm" if nm else "block"), nm)
    t = jnp.where(fac.dead[None, :], 0.0, w0).astype(fac.rt.dtype)  # dead inputs: zero first
    f = _slab(t, plan.block)
    keep = _slab(mask, plan.block) if fixed else jnp.zeros(f.shape, bool)
    counts = _no_counts(cols, plan) if fixed or nm else _counts(sparsity, rows, cols, plan)
    r_inv = None if fixed else _block_inverses(fac.tri(), plan.block)
    z, s, keep = _sweep(plan, fac.tri(), f, jnp.zeros_like(f), keep, counts, fac.ban, r_inv)
    w = jnp.where(keep, f - z, 0.0)[:cols].T.astype(w0.dtype)
    info = {"loss": jnp.sum(_residual(plan, fac, z, s, keep) ** 2) + _dead_loss(w0, fac),
            "dead_inputs": jnp.sum(fac.dead), "jitter": fac.jitter}
    return w, keep[:cols].T, info


def _dead_loss(w0, fac):
    """What zeroing the dead inputs' weights adds under the damped ``H`` (0 undamped)."""
    d = jnp.diagonal(fac.rt)[: w0.shape[1]] ** 2  # a dead input is decoupled: R_jj^2 = H_jj
    return jnp.sum(jnp.where(fac.dead, d, 0.0) * jnp.sum(w0.astype(d.dtype) ** 2, axis=0))


_sparsegpt_jit = _jit(_sparsegpt, static_argnames=("nm", "blocksize"))


def sparsegpt(w0, h, sparsity, nm=None, blocksize=128, mask=None, *, dead=None,
              return_info=False):
    """SparseGPT (Frantar & Alistarh 2023): blocked OBS with lazy updates.

    Columns are processed left to right; inside a block of ``blocksize`` columns the
    mask is chosen by the saliency ``w^2 / U_jj^2`` over the block (all rows together;
    for N:M every ``m`` columns per row), ``U`` the upper Cholesky factor of ``H^{-1}``,
    and pruning column ``j`` spreads its error over the columns to its right. Computed
    from ``R = U^{-1}`` (``H = R R^T``, one Cholesky, no inverse) by :func:`_sweep`;
    the result equals the reference's up to round-off. ``mask`` fixes the support (the
    result then does not depend on ``blocksize``). Dead inputs (:func:`dead_inputs`, or
    ``dead``) have their weights zeroed and pruned first, as in the reference; an ``H``
    that cannot be factored (``damping=0`` on rank-deficient data) gets a round-off
    jitter instead of NaN weights.

    ``sparsity`` is traced: one compiled program per layer shape, ``nm`` and
    ``blocksize``. ``return_info=True`` adds a dict: ``loss`` (the layer loss under
    ``h``), ``dead_inputs``, ``jitter`` (added to ``H``'s diagonal, 0 normally).
    """
    plan = _make_plan(w0.shape[1], blocksize, "block", nm)
    fac = _factor(h, dead, plan.block)
    w, keep, info = _sparsegpt_jit(w0, fac, sparsity, mask, nm=nm, blocksize=blocksize)
    return (w, keep, _host(info)) if return_info else (w, keep)


def _host(info):
    """Python scalars for the driver's report."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in jax.device_get(info).items()}


# -------------------------------------------------------------------------- refit


def _rowdot(a, b):
    return jnp.sum(a * b, axis=0, keepdims=True)  # slabs: one output row per column


class _Refit(NamedTuple):
    """The fixed-support operators of the refit (see the module docstring)."""

    plan: _Plan
    tri: _Tri
    back: _Tri  # J R^T J: the backward sweep as a forward one on reversed columns
    keep: jax.Array
    ban: jax.Array
    counts: jax.Array

    def k(self, y):
        """``y -> (z, y K)``: ``z R = y`` on the support, ``z = 0`` off it; ``yK = (zR)_P``."""
        z, s, _ = _sweep(self.plan, self.tri, jnp.zeros_like(y), y, self.keep, self.counts,
                         self.ban)
        return z, jnp.where(self.keep, 0.0, s)

    def kt(self, u):
        """``u -> u K^T``: ``q`` with ``q_P = -u_P`` and ``(q R^T)_Q = 0``, read on ``Q``."""
        plan = self.plan._replace(want_s=False)
        rev = lambda a: a[::-1]
        q, _, _ = _sweep(plan, self.back, rev(-u), jnp.zeros_like(u), rev(self.keep),
                         self.counts, rev(self.ban))
        return jnp.where(self.keep, rev(q), 0.0)


def _refit_cg(op: _Refit, d, e, tol, maxiter):
    """Exact refit on ``op.keep`` by CG on ``y (I + K K^T) = -E_P K^T``, ``y = E_Q``.

    Starts from a point ``d`` (the change ``T - W``, fixed to ``T`` off the support) with
    residual ``e = d R``. Every row is its own CG (its own step sizes); the stopping
    rule is the layer's: stop when an iteration lowered the loss ``||E||^2`` by at most
    ``tol`` times what is left (the loss is tracked exactly: one step lowers it by
    ``alpha r.r``), or after ``maxiter`` iterations. Returns ``(d, e, stats)`` with
    ``stats = (iterations, last relative gain, ||r|| / ||r_0||, converged)``.
    """
    y, ep = jnp.where(op.keep, e, 0.0), jnp.where(op.keep, 0.0, e)
    res = -(y + op.kt(ep))
    rr = _rowdot(res, res)
    tiny = jnp.finfo(d.dtype).tiny
    loss = jnp.sum(y * y) + jnp.sum(ep * ep)

    def cond(c):
        it, gain, loss = c[0], c[1], c[2]
        return (it < maxiter) & (gain > tol * loss)

    def body(c):
        it, _, _, cg, ep, d = c
        zp, pk = op.k(cg.p)
        new, alpha, _ = cg_step(cg, cg.p + op.kt(pk), _rowdot)
        ep, d = ep + alpha * pk, d + alpha * zp
        loss = jnp.sum(new.x * new.x) + jnp.sum(ep * ep)
        return it + 1, jnp.sum(alpha * cg.rs), loss, new, ep, d

    inf = jnp.asarray(jnp.inf, d.dtype)
    init = (jnp.zeros((), jnp.int32), inf, loss, CGState(y, res, res, rr), ep, d)
    it, gain, loss, cg, ep, d = lax.while_loop(cond, body, init)
    residual = jnp.sqrt(jnp.sum(cg.rs) / jnp.maximum(jnp.sum(rr), tiny))
    converged = (gain <= tol * loss) | (jnp.sum(rr) == 0)
    return d, cg.x + ep, (it, gain / jnp.maximum(loss, tiny), residual, converged)


def refit(
    target: jax.Array,
    mask: jax.Array,
    h: jax.Array,
    g: jax.Array | None = None,
) -> jax.Array:
    """Per-row OBS projection of ``target`` onto ``mask`` under the metric ``H``, exactly.

    Row ``r`` solves ``min_w (w - t_r)^T H (w - t_r)`` subject to ``w = 0`` off
    ``mask[r]``; with ``t = W0`` this is the exact least-squares refit of the layer on
    the support. Each row's system is gathered and factored by Cholesky, batched over
    rows in chunks; the smaller of the kept block ``H_QQ`` and the removed block
    ``G_PP`` (``G = H^{-1}``) is factored, so the cost is ``rows * min(|Q|, |P|)^3 / 3``
    (the oracle, and ``iobs(solver="cholesky")``; the default refit is CG).

    Args:
      target: ``(rows, cols)``.
      mask: ``(rows, cols)`` bool, True = kept.
      h: ``(cols, cols)`` damped (positive definite) Hessian.
      g: its inverse, if already computed (needed for the removed form).

    Returns:
      The projected weights, exact zeros off the mask.
    """
    cols = h.shape[0]
    counts = jnp.sum(mask, axis=1)
    # Concrete sizes pick the form and the padding; under a trace fall back to the worst
    # case (the kept form padded to the full width).
    try:
        kmax = int(jnp.max(counts))
        pmax = cols - int(jnp.min(counts))
    except jax.errors.ConcretizationTypeError:
        kmax, pmax = cols, cols + 1
    if pmax == 0:
        return target
    if kmax == 0:
        return jnp.zeros_like(target)
    if pmax < kmax:
        g = _inverse(h) if g is None else g
        return _refit_rows(g, target, mask, _bucket(pmax, cols), True)
    return _refit_rows(h, target, mask, _bucket(kmax, cols), False)


def _bucket(size: int, cols: int) -> int:
    # Round padded sizes up so successive calls reuse a few compiled shapes.
    return min(cols, -(-size // 16) * 16)


def _refit_kept(h, target, mask, size):
    """Q-form, one row: the core's OBS projection (correction form) of ``t`` onto ``m``."""
    return lambda t, m: project(SupportCurvature(h, jnp.sum(m), size, guarded=True), t, m)


def _refit_removed(g, target, mask, size):
    """P-form, one row: ``w = t - G[:, P] (G_PP)^{-1} t_P`` with ``G = H^{-1}``."""
    return lambda t, m: project_inverse_form(
        SupportCurvature(g, jnp.sum(~m), size, guarded=True), t, m)[0]


@_jit(static_argnames=("size", "removed_form"))
def _refit_rows(a, target, mask, size, removed_form):
    make = _refit_removed if removed_form else _refit_kept
    one = make(a, target, mask, size)
    return lax.map(lambda tm: one(*tm), (target, mask), batch_size=_ROW_CHUNK)


# -------------------------------------------------------------------------- I-OBS


def _project(t, fac, sparsity, tol, maxiter, nm, scope, rounds, blocksize):
    """Mask and weights for the target ``t``: ``rounds`` x (selection sweep + CG refit).

    Round ``r`` keeps a fraction ``(1 - sparsity)^(r / rounds)``. Its mask comes from a
    sweep over the current weights (the previous round's refit, so the loss against
    ``t`` is the loss against them plus a constant): each block's ranking allocates
    counts to sub-blocks of at most 16 columns, and each sub-block picks its weights
    from the values reached after the pruning to its left (``"fresh"``), which halves
    SparseGPT's loss before any refit on real layers. Then the CG refit from the sweep's
    own solution. N:M masks are chosen per group with the same fresh values.
    """
    rows, cols = t.shape
    select = "nm" if nm is not None else "fresh"
    plan = _make_plan(cols, blocksize, select, nm, rowwise=scope == "row")
    fixed = _make_plan(cols, blocksize, "fixed", None)._replace(block=plan.block, sub=plan.sub)
    dtype = fac.rt.dtype
    tri = fac.tri()
    f = _slab(jnp.where(fac.dead[None, :], 0.0, t).astype(dtype), plan.block)
    zero = jnp.zeros_like(f)
    r_inv = None if nm is not None else _block_inverses(tri, plan.block)
    keep_all = 1.0 - jnp.asarray(sparsity, dtype)

    def one_round(i, carry):
        d, e, _, _ = carry
        s_i = 1.0 - keep_all ** ((i + 1) / rounds)
        counts = _no_counts(cols, plan) if nm else _counts(s_i, rows, cols, plan)
        dz, s, keep = _sweep(plan, tri, f - d, zero, jnp.zeros(f.shape, bool), counts,
                             fac.ban, r_inv)
        op = _Refit(fixed, tri, tri.mirrored(), keep, fac.ban, _no_counts(cols, plan))
        d, e, stats = _refit_cg(op, d + dz, e + _residual(plan, fac, dz, s, keep), tol,
                                maxiter)
        return d, e, keep, stats

    stats0 = (jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.zeros((), dtype),
              jnp.asarray(True))
    rounds_run = 1 if nm is not None else rounds
    d, e, keep, stats = lax.fori_loop(0, rounds_run, one_round,
                                      (zero, zero, jnp.zeros(f.shape, bool), stats0))
    w = jnp.where(keep, f - d, 0.0)[:cols].T
    it, gain, residual, converged = stats
    info = {"converged": converged, "refit_iterations": it, "refit_residual": residual,
            "refit_gain": gain, "loss": jnp.sum(e * e) + _dead_loss(t, fac),
            "dead_inputs": jnp.sum(fac.dead),
            "jitter": fac.jitter}
    return w, keep[:cols].T, info


_project_jit = _jit(_project, static_argnames=("nm", "scope", "rounds", "blocksize"))


def iobs(
    w0,
    h,
    sparsity,
    scope="layer",
    nm=None,
    rounds=1,
    iterations=1,
    step_size=1.0,
    h_val=None,
    solver="cg",
    val_loss=None,
    cg_tol=1e-2,
    cg_maxiter=3,
    *,
    blocksize=128,
    dead=None,
    return_info=False,
):
    """I-OBS for one layer: Newton-like step, sequential OBS mask, exact refit.

    For this loss ``H^{-1} grad L(W_t) = W_t - W0``, so one I-OBS iteration is

        W~ = W_t - eta (W_t - W0),   W_{t+1} = OBS projection of W~ onto a sparse support,

    and from the dense start with ``eta = 1`` the step lands on ``W0``. The projection
    (:func:`_project`) chooses the support in ``rounds`` rounds of a SparseGPT-style
    column sweep whose sub-blocks re-select from up-to-date values (``scope``: one
    count per block over all rows, ``"layer"``, or the same count in every row,
    ``"row"``; ``nm=(n, m)``: ``n`` of every ``m`` inputs, one round), each round
    followed by the exact refit on the support by CG (:func:`_refit_cg`, preconditioned
    by the sweep: stops when an iteration gains less than ``cg_tol`` of the loss, or
    after ``cg_maxiter`` iterations per round). ``solver="cholesky"`` finishes with the
    exact per-row factorization (:func:`refit`) instead of relying on CG.

    ``iterations > 1`` repeats the step from the sparse iterate; with ``h_val`` (the
    Hessian of held-out calibration inputs) the iterate with the lowest held-out loss is
    returned, otherwise the last one; ``val_loss(W)`` (a callable) replaces ``h_val``
    when the held-out loss is not ``layer_loss(W, W0, h_val)`` (dense-output targets).

    Dead inputs are pruned first. ``sparsity``, ``step_size``, ``cg_tol`` and
    ``cg_maxiter`` are traced: one compiled program per layer shape, ``scope``, ``nm``,
    ``rounds``. ``return_info=True`` returns ``(W, mask, info)`` with ``converged``
    (the last refit met its stopping rule), ``refit_iterations``, ``refit_residual``
    (final over initial CG residual norm), ``refit_gain`` (the last iteration's gain
    relative to the loss), ``loss`` (under ``h``), ``dead_inputs`` and ``jitter``.
    """
    if solver not in ("cg", "cholesky"):
        raise ValueError(f"solver must be 'cg' or 'cholesky'; got {solver!r}.")
    if val_loss is None and h_val is not None:
        val_loss = functools.partial(layer_loss, w0=w0, h=h_val)
    plan = _make_plan(w0.shape[1], blocksize, "fresh", nm)
    fac = _factor(h, dead, plan.block)  # H is the same in every iteration
    w_t, best = w0, None
    for _ in range(iterations):
        target = w_t - step_size * (w_t - w0)
        w_t, mask, info = _project_jit(target, fac, sparsity, cg_tol, cg_maxiter, nm=nm,
                                       scope=scope, rounds=int(rounds), blocksize=blocksize)
        if solver == "cholesky":
            w_t = refit(target, mask, h).astype(w0.dtype)
            info = dict(info, loss=layer_loss(w_t, target, h), converged=True)
        if val_loss is not None:
            val = float(val_loss(w_t))
            if best is None or val < best[0]:
                best = (val, w_t, mask, info)
    if best is not None:
        w_t, mask, info = best[1:]
    return (w_t, mask, _host(info)) if return_info else (w_t, mask)


# ---------------------------------------------------------------- the other methods


@_jit(static_argnames=("scope", "nm"))
def _magnitude(w0, sparsity, scope, nm):
    mask = select_mask(jnp.abs(w0), sparsity, scope, nm)
    return jnp.where(mask, w0, 0.0), mask


def magnitude(w0, h, sparsity, scope="layer", nm=None, *, return_info=False):
    """Keep the largest ``|w|`` (no compensation, ``h`` unused)."""
    del h
    w, mask = _magnitude(w0, sparsity, scope, nm)
    return (w, mask, {}) if return_info else (w, mask)


@_jit(static_argnames=("scope", "nm"))
def _wanda(w0, h, sparsity, scope, nm):
    dead = dead_inputs(h)
    scores = jnp.abs(w0) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))[None, :]
    mask = select_mask(jnp.where(dead[None, :], -1.0, scores), sparsity, scope, nm)
    return jnp.where(mask, w0, 0.0), mask, jnp.sum(dead)


def wanda(w0, h, sparsity, scope="row", nm=None, *, return_info=False):
    """Wanda: keep the largest ``|w_ij| * ||x_j||`` (per output row by default).

    Dead inputs (zero norm) are pruned first.
    """
    w, mask, dead = _wanda(w0, h, sparsity, scope, nm)
    return (w, mask, {"dead_inputs": int(dead)}) if return_info else (w, mask)


@_jit(static_argnames=("k",))
def _obc(w0, h, k, dead):
    dead = dead_inputs(h) if dead is None else dead
    g = _inverse(h)
    t = jnp.where(dead[None, :], 0.0, w0)  # zero weights are removed first

    def one(row):
        return greedy_obs_unchecked(row, g, k, safeguard=False)

    w, mask = lax.map(one, t, batch_size=_ROW_CHUNK)
    return w, mask, jnp.sum(dead)


def obc(w0, h, sparsity, *, dead=None, return_info=False):
    """Exact greedy OBS per row (OBC, Frantar et al. 2022): the quality reference.

    Every row removes its ``cols - k`` least salient weights one at a time with rank-one
    updates of its own inverse Hessian: ``O(rows * cols^3)`` time. ``sparsity`` is static
    here (it sets the loop length). Dead inputs' weights are zeroed and removed first.
    """
    w, mask, n_dead = _obc(w0, h, keep_count(w0.shape[1], sparsity), dead)
    return (w, mask, {"dead_inputs": int(n_dead)}) if return_info else (w, mask)


METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "obc": obc,
    "iobs": iobs,
}
