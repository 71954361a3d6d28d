"""``iobs_jax.prune``: one call to prune every linear layer of a Flax model.

The driver finds the prunable layers by tracing the model once, captures each layer's
inputs on the calibration batches (Linen: ``nn.intercept_methods``; NNX: the layer
classes' ``__call__`` wrapped for the duration of the call), accumulates
``H = X X^T / N`` per layer, and hands ``(W0, H)`` to the layer-wise methods of
:mod:`iobs_jax._layerwise`.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx, traverse_util
from flax.core import FrozenDict

from . import _layers
from . import _layerwise as lw
from ._capture import LinenModel, NNXModel, accumulate, discover, make_stats
from ._curvature import highest_precision
from ._validation import check_choice

_METHOD_SCOPE = {"magnitude": "layer", "wanda": "row", "sparsegpt": None, "obc": "row",
                 "iobs": "layer"}


class LayerReport(NamedTuple):
    """What happened to one layer.

    ``loss_masked`` is the layer loss of the dense weights with the mask applied (no
    compensation), ``loss`` the loss of the returned weights; both are
    ``||W X - W0 X||^2 / N`` over the layer's calibration inputs, and
    ``output_energy = ||W0 X||^2 / N`` puts them on a scale.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    loss_masked: float
    loss: float
    output_energy: float
    time_s: float


class PruneReport(NamedTuple):
    """Returned by :func:`prune` next to the pruned parameters."""

    method: str
    layers: list[LayerReport]
    masks: Any  # pytree like params: bool, True = kept (all True on untouched leaves)
    time_s: float

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self.layers))

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned layers' kernels."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / max(total, 1)

    def summary(self) -> str:
        head = f"{'layer':<32} {'shape':>12} {'sparsity':>8} {'masked':>10} {'loss':>10} {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(
                f"{r.name:<32} {str(r.shape):>12} {r.sparsity:8.3f} "
                f"{r.loss_masked / max(r.output_energy, 1e-30):10.3e} "
                f"{r.loss / max(r.output_energy, 1e-30):10.3e} {r.time_s:6.2f}"
            )
        lines.append(f"{self.method}: total layer loss {self.total_loss:.4e}, "
                     f"sparsity {self.sparsity:.3f}, {self.time_s:.2f} s "
                     "(losses relative to each layer's output energy)")
        return "\n".join(lines)


# ------------------------------------------------------------------ public API


@highest_precision
def prune(
    model: Any,
    params: Any,
    calib_batches: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    method: str = "iobs",
    pattern: str | tuple[int, int] | None = None,
    scope: str | None = None,
    filter: Callable[[str, tuple], bool] | str | None = None,  # noqa: A002
    sequential: bool = True,
    damping: float = 0.01,
    hessian_dtype: Any = jnp.float32,
    blocksize: int = 128,
    rounds: int = 1,
    iterations: int = 1,
    step_size: float = 1.0,
    holdout_batches: int = 0,
    target: str = "local",
    sample_mask: Callable[[Any], Any] | Iterable[Any] | None = None,
    dense_batches: Iterable[Any] | None = None,
    variables: dict | None = None,
    apply_kwargs: dict | None = None,
    verbose: bool = False,
):
    """Prune the linear layers of a Flax model with calibration data.

    Linen: ``pruned_params, report = prune(model, params, calib_batches, sparsity=0.5)``
    with ``params`` the ``"params"`` collection. NNX:
    ``pruned_module, report = prune(module, calib_batches, sparsity=0.5)`` (a new module;
    the input module is not modified).

    For every selected layer with dense weights ``W0`` and calibration inputs ``X``
    (convolutions unfolded into patches) the layer loss ``||W X - W0 X||^2 / N`` is
    minimized over ``W`` with the requested sparsity, using ``H = X X^T / N`` damped by
    ``damping * mean(diag H)``. With ``sequential=True`` (default) each layer's ``X``
    comes from the model whose earlier layers are already pruned; otherwise all layers
    use the dense model's activations (one pass, faster).

    Methods: ``"magnitude"``; ``"wanda"`` (``|w| * ||x||``, per row); ``"sparsegpt"``
    (blocked, lazy updates, ``blocksize``); ``"obc"`` (exact greedy OBS per row,
    ``O(rows * cols^3)``: small layers only); ``"iobs"`` (default: Newton-like step,
    OBS-saliency mask ``w^2 / [H^{-1}]_jj`` over the layer (``scope="layer"``) or per
    row (``"row"``), exact OBS refit on the support; ``rounds > 1`` reaches the support
    in rounds with saliencies from the inverse restricted to the current support;
    ``iterations > 1`` repeats the step with ``step_size`` and keeps the iterate with the
    lowest loss on the last ``holdout_batches`` batches).

    Targets: ``target="local"`` (default) reconstructs each layer's own dense output on
    the inputs it receives, ``||W X - W0 X||^2``; ``target="dense"`` (sequential mode)
    reconstructs the dense model's output, ``||W X - W0 X_d||^2`` with ``X_d`` the dense
    model's inputs to that layer, so each layer also corrects the error left upstream
    (the methods run on the least-squares point ``W~ = W0 X_d X^T (X X^T)^{-1}``;
    magnitude and Wanda, which do not reconstruct, are unaffected).

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      params: Linen ``"params"`` collection (for NNX pass the batches here).
      calib_batches: iterable of batches: an array, a tuple of positional arguments or a
        dict of keyword arguments for ``model.apply`` (kept in memory: several passes).
      sparsity: fraction of weights removed per layer, in ``[0, 1)``; default 0.5.
      pattern: ``None`` (unstructured) or ``"n:m"`` (e.g. ``"2:4"``): ``n`` kept in every
        ``m`` consecutive inputs of each output.
      scope: ``"layer"``, ``"row"`` or ``"global"`` (one threshold across layers on the
        method's score, then each layer pruned at its allocated sparsity); default per
        method (layer for magnitude and iobs, row for wanda and obc).
      filter: which layers to prune: a callable ``(name, kernel_shape) -> bool`` or a
        regular expression searched in the layer name (``"Dense_0/..."``). Default: all
        Dense, DenseGeneral, Conv and Einsum layers (NNX: Linear, LinearGeneral, Conv,
        Einsum).
      hessian_dtype: ``jnp.float32`` or ``jnp.float64`` (needs ``jax_enable_x64``).
      sample_mask: for sequence models with padding: ``sample_mask(batch)`` returns a
        0/1 array over the batch's leading ``(batch, position)`` axes (e.g.
        ``lambda b: b["attention_mask"]``); positions where it is 0 are left out of every
        layer's statistics. Each pruned layer's input must have those leading axes. A
        list of such arrays (one per batch) is accepted too.
      dense_batches: with ``target="dense"``, the dense model's version of each batch
        when the batches are themselves activations of an already pruned model (as in
        :func:`prune_blocks`); default: the same batches.
      variables: other Linen collections (e.g. ``{"batch_stats": ...}``).
      apply_kwargs: extra keyword arguments of every forward call (e.g. ``train=False``).

    Returns:
      ``(pruned, report)``: parameters with the same structure and dtypes (NNX: a new
      module) and a :class:`PruneReport` (per-layer losses and times, masks).

    Example:
      >>> pruned, report = prune(model, params, [x_calib], sparsity=0.5)  # doctest: +SKIP
      >>> print(report.summary())  # doctest: +SKIP
    """
    start = time.perf_counter()
    is_nnx = isinstance(model, nnx.Module)
    if is_nnx:
        if calib_batches is not None:
            raise TypeError(
                "prune(module, calib_batches, ...): an NNX module carries its own "
                "parameters; pass the calibration batches as the second argument."
            )
        calib_batches, adapter = params, NNXModel(model, dict(apply_kwargs or {}))
        params = adapter.pure_params()
    elif isinstance(model, nn.Module):
        adapter = LinenModel(model, dict(variables or {}), dict(apply_kwargs or {}))
    else:
        raise TypeError(f"model must be a flax.linen or flax.nnx Module; got {type(model)}.")
    opts = _check_options(method, sparsity, pattern, scope, damping, hessian_dtype, rounds,
                          iterations, blocksize, holdout_batches)
    method, sparsity, nm, scope, dtype = opts
    target = check_choice(target, "target", ("local", "dense"))
    if target == "dense" and not sequential:
        raise ValueError("target='dense' needs sequential=True (without it every layer "
                         "already sees the dense model's inputs).")
    batches = _check_batches(calib_batches, holdout_batches)
    masks_all = _sample_masks(sample_mask, batches)
    if dense_batches is not None:
        if target != "dense":
            raise ValueError("dense_batches is only used with target='dense'.")
        dense_batches = list(dense_batches)
        if len(dense_batches) != len(batches):
            raise ValueError(f"dense_batches has {len(dense_batches)} batches; "
                             f"calib_batches has {len(batches)}.")
    else:
        dense_batches = batches
    frozen = isinstance(params, FrozenDict)
    flat = traverse_util.flatten_dict(dict(params) if frozen else params)

    found, groups, unsupported = discover(adapter, params, batches[0])
    chosen = _select(found, filter, unsupported)
    n_cal = len(batches) - holdout_batches
    cal, val = batches[:n_cal], batches[n_cal:]
    cal_masks = None if masks_all is None else masks_all[:n_cal]
    val_masks = None if masks_all is None else masks_all[n_cal:]
    masked, cross = masks_all is not None, target == "dense"
    ordered = [found[p] for p in found if p in chosen]
    stats = make_stats(adapter, ordered, dtype, masked=masked)
    dense_params = params

    dense_h = None
    if not sequential or scope == "global":
        dense_h = accumulate(stats, adapter, params, cal, ordered, dtype, masks=cal_masks)
    per_layer = {p: sparsity for p in chosen}
    if scope == "global":
        per_layer = _allocate(found, chosen, flat, dense_h, sparsity, method, damping)

    reports, masks = [], {}
    for group in groups:
        todo = [p for p in group if p in chosen]
        if not todo:
            continue
        params_now = traverse_util.unflatten_dict(flat)
        specs = [found[p] for p in todo]
        group_stats = (make_stats(adapter, specs, dtype, masked=masked, cross=cross)
                       if sequential else stats)
        dense_cal = dense_val = None
        if cross:
            dense_cal, dense_val = dense_batches[:n_cal], dense_batches[n_cal:]
        if sequential:
            hs = accumulate(group_stats, adapter, params_now, cal, specs, dtype,
                            masks=cal_masks, dense_params=dense_params if cross else None,
                            dense_batches=dense_cal)
        else:
            hs = {p: dense_h[p] for p in todo}
        hv = (accumulate(group_stats, adapter, params_now, val, specs, dtype, masks=val_masks,
                         dense_params=dense_params if cross else None,
                         dense_batches=dense_val) if val else {})
        for path in todo:
            t0 = time.perf_counter()
            spec = found[path]
            kernel = flat[path + ("kernel",)]
            w0 = _layers.kernel_to_matrix(spec, jnp.asarray(kernel)).astype(dtype)
            st = hs[path]
            w, mask = _run_method(
                method, w0, st, per_layer[path], nm, scope, damping, blocksize, rounds,
                iterations, step_size, hv.get(path), spec.name,
            )
            jax.block_until_ready(w)  # JAX is asynchronous: time the work, not the dispatch
            seconds = time.perf_counter() - t0
            flat[path + ("kernel",)] = _layers.matrix_to_kernel(spec, w).astype(kernel.dtype)
            masks[path + ("kernel",)] = _layers.matrix_to_kernel(spec, mask)
            reports.append(_report(spec, w0, w, mask, st, seconds))
            if verbose:
                print(f"pruned {spec.name} {spec.shape}: loss {reports[-1].loss:.4e}")

    out = traverse_util.unflatten_dict(flat)
    mask_tree = traverse_util.unflatten_dict(
        {k: masks.get(k, jnp.ones(np.shape(v), bool)) for k, v in flat.items()}
    )
    if frozen:
        out, mask_tree = FrozenDict(out), FrozenDict(mask_tree)
    report = PruneReport(method, reports, mask_tree, time.perf_counter() - start)
    if is_nnx:
        return nnx.merge(adapter.graphdef, adapter._state(out), adapter.extra), report
    return out, report


def _run_method(method, w0, stats, sparsity, nm, scope, damping, blocksize, rounds,
                iterations, step_size, val_stats, name):
    h = stats.h
    hd = lw.damp_hessian(h, damping)
    rows, cols = w0.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(
            f"pattern {nm[0]}:{nm[1]}: layer {name} has {cols} inputs, not a multiple of "
            f"{nm[1]}; exclude it with filter=..."
        )
    if method == "magnitude":
        return lw.magnitude(w0, hd, sparsity, scope, nm)
    if method == "wanda":
        return lw.wanda(w0, h, sparsity, scope, nm)
    val_loss = None
    if val_stats is not None:
        val_loss = functools.partial(lw.target_loss, w0=w0, stats=val_stats)
    if stats.cross is not None:  # dense-model targets: reconstruct W~ = W0 C H^{-1}
        w0 = lw.dense_target(w0, stats, hd)
    if method == "sparsegpt":
        return lw.sparsegpt(w0, hd, sparsity, nm, min(blocksize, cols))
    if method == "obc":
        if cols > 1024:
            warnings.warn(
                f"obc on layer {name} with {cols} inputs: exact greedy OBS costs "
                f"O(rows * cols^3) = {rows * cols**3:.1e} operations; consider "
                f"method='iobs' with rounds>1.",
                stacklevel=3,
            )
        return lw.obc(w0, hd, sparsity)
    return lw.iobs(
        w0, hd, sparsity, scope, nm, rounds=rounds, iterations=iterations,
        step_size=step_size, val_loss=val_loss,
    )


def _report(spec, w0, w, mask, stats, seconds):
    sparsity, masked, loss, energy = (float(v) for v in _losses(w0, w, mask, stats))
    return LayerReport(spec.name, spec.kind, spec.shape, sparsity, masked, loss, energy, seconds)


@jax.jit
def _losses(w0, w, mask, stats):
    # Losses against the target the layer was fitted to (the dense model's outputs with
    # target="dense"); the energy is always that of the dense outputs.
    dense_h = stats.h if stats.hd is None else stats.hd
    return (
        1.0 - jnp.mean(mask),
        lw.target_loss(jnp.where(mask, w0, 0.0), w0, stats),
        lw.target_loss(w, w0, stats),
        lw.layer_loss(jnp.zeros_like(w0), w0, dense_h),
    )


def _allocate(found, chosen, flat, dense_h, sparsity, method, damping):
    """Per-layer sparsities from one global threshold on the method's scores."""
    scores = []
    for path in chosen:
        spec = found[path]
        w0 = _layers.kernel_to_matrix(spec, jnp.asarray(flat[path + ("kernel",)]))
        h = dense_h[path].h
        w0 = w0.astype(h.dtype)
        if method == "magnitude":
            s = jnp.abs(w0)
        elif method == "wanda":
            s = jnp.abs(w0) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))
        else:  # OBS saliency: the increase of this layer's loss
            g = lw._inverse(lw.damp_hessian(h, damping))
            s = w0**2 / jnp.diagonal(g)[None, :]
        scores.append(np.asarray(s, np.float64).ravel())
    allsc = np.concatenate(scores)
    k = lw.keep_count(allsc.size, sparsity)
    order = np.argsort(-allsc, kind="stable")
    kept = np.zeros(allsc.size, bool)
    kept[order[:k]] = True
    out, start = {}, 0
    for path, s in zip(chosen, scores, strict=True):
        out[path] = float(1.0 - kept[start : start + s.size].mean())
        start += s.size
    return out


# ------------------------------------------------------------------ validation


def _check_options(method, sparsity, pattern, scope, damping, dtype, rounds, iterations,
                   blocksize, holdout):
    method = check_choice(method, "method", tuple(lw.METHODS))
    nm = None
    if pattern is not None and pattern != "unstructured":
        nm = _parse_pattern(pattern)
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts pattern {nm[0]}:{nm[1]} (which removes "
                f"{implied:.3g}); pass only the pattern."
            )
        if method == "obc":
            raise ValueError("method='obc' prunes unstructured rows; use 'iobs' or "
                             "'sparsegpt' for N:M patterns.")
        sparsity = implied
    if sparsity is None:
        sparsity = 0.5
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
        0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}.")
    if scope is None:
        scope = _METHOD_SCOPE[method] or "layer"
    scope = check_choice(scope, "scope", ("layer", "row", "global"))
    if nm is not None and scope == "global":
        raise ValueError("scope='global' needs an unstructured pattern.")
    if method == "obc" and scope == "layer":
        raise ValueError("method='obc' prunes each row to the same sparsity; use "
                         "scope='row' or 'global'.")
    if not (isinstance(damping, (int, float)) and np.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"hessian_dtype must be float32 or float64; got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("hessian_dtype=float64 needs jax.config.update('jax_enable_x64', True).")
    for name, value, low in (("rounds", rounds, 1), ("iterations", iterations, 1),
                             ("blocksize", blocksize, 1), ("holdout_batches", holdout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    return method, float(sparsity), nm, scope, dtype


def _parse_pattern(pattern):
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match:
            raise ValueError(f"pattern must be 'unstructured' or 'n:m' like '2:4'; got "
                             f"{pattern!r}.")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        n, m = (int(v) for v in pattern)
    if not 0 < n < m:
        raise ValueError(f"pattern n:m needs 0 < n < m; got {n}:{m}.")
    return n, m


def _sample_masks(sample_mask, batches):
    """``sample_mask(batch)`` for every batch as float arrays, or None; checked."""
    if sample_mask is None:
        return None
    if callable(sample_mask):
        arrays = [sample_mask(batch) for batch in batches]
    elif isinstance(sample_mask, (list, tuple)):
        arrays = list(sample_mask)
        if len(arrays) != len(batches):
            raise ValueError(f"sample_mask has {len(arrays)} arrays; calib_batches has "
                             f"{len(batches)} batches.")
    else:
        raise TypeError("sample_mask must be a callable batch -> 0/1 array (e.g. "
                        "lambda b: b['attention_mask']) or a list of arrays, one per batch.")
    out = []
    for i, m in enumerate(arrays):
        m = np.asarray(m)
        if m.ndim < 1 or m.dtype.kind not in "biuf" or not np.all((m == 0) | (m == 1)):
            raise ValueError(f"sample_mask(calib_batches[{i}]) must be a 0/1 array over the "
                             f"leading (batch, position) axes; got dtype {m.dtype}, shape "
                             f"{m.shape}.")
        if not m.any():
            raise ValueError(f"sample_mask(calib_batches[{i}]) is all zero.")
        out.append(jnp.asarray(m, jnp.float32))
    return out


def _check_batches(calib_batches, holdout):
    if calib_batches is None:
        raise ValueError("calib_batches is required: an iterable of model inputs.")
    if isinstance(calib_batches, (jax.Array, np.ndarray)):
        calib_batches = [calib_batches]
    batches = list(calib_batches)
    if len(batches) <= holdout:
        raise ValueError(
            f"calib_batches has {len(batches)} batch(es); need more than "
            f"holdout_batches={holdout}."
        )
    for i, batch in enumerate(batches):
        for leaf in jax.tree.leaves(batch):
            arr = np.asarray(leaf)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError(f"calib_batches[{i}] contains NaN or inf.")
    return batches


def _select(found, filt, unsupported):
    names = {p: found[p].name for p in found}
    if filt is None:
        chosen = list(found)
    elif isinstance(filt, str):
        pattern = re.compile(filt)
        chosen = [p for p in found if pattern.search(names[p])]
    elif callable(filt):
        chosen = [p for p in found if filt(names[p], found[p].kernel_shape)]
    else:
        raise TypeError("filter must be None, a regex string or a callable (name, shape) -> bool.")
    for path, why in unsupported.items():
        warnings.warn(f"layer {'/'.join(map(str, path))} is not pruned: {why}.", stacklevel=3)
    if not chosen:
        raise ValueError(
            f"filter selected no layer; the prunable layers are: "
            f"{', '.join(names.values()) or '(none found)'}."
        )
    return set(chosen)
