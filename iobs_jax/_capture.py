"""Capturing the inputs of a Flax model's prunable layers and their statistics.

Linen: ``nn.intercept_methods``; NNX: the layer classes' ``__call__`` wrapped for the
duration of a forward pass. Both feed ``record(spec, x)``; the jitted statistics pass
turns the captured inputs into ``X^T X`` per layer and lets XLA drop everything after
the last captured layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from . import _layers
from ._layerwise import LayerStats


class _Skipped(NamedTuple):
    """A recognised layer whose configuration cannot be pruned (and why)."""

    path: tuple
    why: str


class LinenModel:
    """Feeds batches to a Linen module and reports its prunable layers' inputs."""

    def __init__(self, model, variables, apply_kwargs):
        self.model, self.extra, self.apply_kwargs = model, variables, apply_kwargs
        self.key = _hashable(("linen", model, tuple(sorted(apply_kwargs.items()))))

    def forward(self, params, extra, args, kwargs, record):
        def interceptor(next_fun, a, kw, context):
            module = context.module
            if context.method_name == "__call__" and a:
                spec = _linen_spec(module, a[0])
                if spec is not None:
                    record(spec, a[0])
            return next_fun(*a, **kw)

        with nn.intercept_methods(interceptor):
            return self.model.apply(
                {**extra, "params": params}, *args, **kwargs, **self.apply_kwargs
            )


def _linen_spec(module, x):
    path = tuple(module.path)
    kernel = module.scope.get_variable("params", "kernel") if module.scope else None
    if kernel is None:
        return None
    shape = tuple(np.shape(kernel))
    try:
        if isinstance(module, nn.Dense):
            return _layers.dense_spec(path, shape)
        if isinstance(module, nn.DenseGeneral):
            return _layers.dense_general_spec(
                path, shape, module.axis, np.ndim(x), module.batch_dims
            )
        if isinstance(module, nn.Conv):
            return _layers.conv_spec(path, shape, module)
        if isinstance(module, nn.Einsum):
            return _layers.einsum_spec(path, shape, module.einsum_str)
    except _layers.Unsupported as err:
        return _Skipped(path, str(err))
    return None


class NNXModel:
    """The same for an NNX module: split once, merge per forward, wrap layer calls."""

    _TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)

    def __init__(self, module, apply_kwargs):
        self.graphdef, self.params, self.extra = nnx.split(module, nnx.Param, ...)
        self.apply_kwargs = apply_kwargs
        self.key = _hashable(("nnx", self.graphdef, tuple(sorted(apply_kwargs.items()))))

    def forward(self, params, extra, args, kwargs, record):
        module = nnx.merge(self.graphdef, self._state(params), extra)
        paths = {id(m): tuple(path) for path, m in nnx.iter_modules(module)}

        originals = {cls: cls.__call__ for cls in self._TYPES}

        def wrap(cls):
            original = originals[cls]

            def call(self_, x, *a, **kw):
                spec = _nnx_spec(self_, paths.get(id(self_), ()), x)
                if spec is not None:
                    record(spec, x)
                return original(self_, x, *a, **kw)

            return call

        try:
            for cls in self._TYPES:
                cls.__call__ = wrap(cls)
            return module(*args, **kwargs, **self.apply_kwargs)
        finally:
            for cls, original in originals.items():
                cls.__call__ = original

    def pure_params(self):
        return nnx.to_pure_dict(self.params)

    def _state(self, pure):
        state = jax.tree.map(lambda v: v, self.params)  # a copy: never mutate the caller's
        nnx.replace_by_pure_dict(state, pure)
        return state


def _hashable(key):
    """``key`` if it can key the compile cache, else None (then nothing is cached)."""
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _nnx_spec(module, path, x):
    shape = tuple(np.shape(module.kernel.get_value()))
    try:
        if isinstance(module, nnx.Linear):
            return _layers.dense_spec(path, shape)
        if isinstance(module, nnx.LinearGeneral):
            if module.batch_axis:
                raise _layers.Unsupported("LinearGeneral with batch_axis")
            return _layers.dense_general_spec(path, shape, module.axis, np.ndim(x))
        if isinstance(module, nnx.Einsum):
            return _layers.einsum_spec(path, shape, module.einsum_str)
        return _layers.conv_spec(path, shape, module)
    except _layers.Unsupported as err:
        return _Skipped(path, str(err))


def _split_batch(batch):
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def discover(adapter, params, batch):
    """Prunable layers in call order, grouped by identical inputs (q/k/v share one)."""
    found: dict[tuple, Any] = {}
    groups: list[list[tuple]] = []
    seen_inputs: dict[int, int] = {}
    keep_alive = []
    unsupported: dict[tuple, str] = {}

    def record(spec, x):
        if isinstance(spec, _Skipped):
            unsupported[spec.path] = spec.why
            return
        if spec.path in found:
            return
        found[spec.path] = spec
        keep_alive.append(x)
        if id(x) in seen_inputs:
            groups[seen_inputs[id(x)]].append(spec.path)
        else:
            seen_inputs[id(x)] = len(groups)
            groups.append([spec.path])

    args, kwargs = _split_batch(batch)
    try:
        jax.eval_shape(
            lambda p, e, a, k: adapter.forward(p, e, a, k, record), params, adapter.extra,
            args, kwargs,
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the option named
        raise ValueError(
            f"calib_batches: the first calibration batch could not be fed to the model "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Each batch "
            f"must be what model.apply / module(...) accepts: an array, a tuple of "
            f"positional arguments, or a dict of keyword arguments."
        ) from err
    return found, groups, unsupported


# ------------------------------------------------------------------ statistics


_STATS_CACHE: dict = {}


def make_stats(adapter, specs: list, dtype, *, masked: bool = False, cross: bool = False):
    """Jitted ``(params, dense_params, extra, args, kwargs, mask) -> {path: sums}``.

    ``sums = (X^T X, samples, all finite, X_d^T X, X_d^T X_d)`` per layer, ``X`` the
    layer's inputs under ``params``; with ``cross`` also ``X_d``, its inputs under
    ``dense_params`` (else the last two are None). With ``masked`` the rows of ``X``
    (token positions) are weighted by ``mask`` (0 for padding) and ``samples`` is the
    mask's sum. Cached per (model, layers, dtype, flags): repeated ``prune`` calls on the
    same model (a sweep over sparsities or methods) do not recompile the forward passes.
    """
    key = None if adapter.key is None else (
        adapter.key, tuple(specs), jnp.dtype(dtype).name, masked, cross)
    if key is not None and key in _STATS_CACHE:
        return _STATS_CACHE[key]
    wanted = {s.path: s for s in specs}

    def inputs(params, extra, args, kwargs, mask):
        captured: dict[tuple, list] = {p: [] for p in wanted}

        def record(spec, x):
            if not isinstance(spec, _Skipped) and spec.path in wanted:
                captured[spec.path].append(x)

        # Outputs are discarded: XLA drops everything downstream of the last capture.
        adapter.forward(params, extra, args, kwargs, record)
        out = {}
        for path, xs in captured.items():
            mats = [_weighted_rows(wanted[path], x, mask, dtype) for x in xs]
            out[path] = jnp.concatenate(mats, axis=0)
        return out

    @jax.jit
    def stats(params, dense_params, extra, args, kwargs, mask, dense_args, dense_kwargs):
        xp = inputs(params, extra, args, kwargs, mask)
        xd = inputs(dense_params, extra, dense_args, dense_kwargs, mask) if cross else {}
        n_rows = {p: x.shape[0] for p, x in xp.items()}
        out = {}
        for path, x in xp.items():
            n = n_rows[path] if mask is None else jnp.sum(mask) * (x.shape[0] // mask.size)
            finite = jnp.all(jnp.isfinite(x))
            if cross:
                out[path] = (x.T @ x, n, finite, xd[path].T @ x, xd[path].T @ xd[path])
            else:
                out[path] = (x.T @ x, n, finite, None, None)
        return out

    if key is not None:
        if len(_STATS_CACHE) >= 64:
            _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
        _STATS_CACHE[key] = stats
    return stats


def _weighted_rows(spec, x, mask, dtype):
    """The layer's input matrix, rows multiplied by ``mask`` (token positions) if given."""
    mat = _layers.inputs_matrix(spec, x).astype(dtype)
    if mask is None:
        return mat
    lead = tuple(np.shape(x))[: mask.ndim]
    ok = spec.kind == "dense" or (
        spec.kind == "dense_general"
        and tuple(spec.in_axes) == tuple(range(np.ndim(x) - len(spec.in_axes), np.ndim(x)))
    )
    if not ok or lead != tuple(mask.shape) or mat.shape[0] % mask.size:
        raise ValueError(
            f"sample_mask of shape {tuple(mask.shape)} does not line up with the inputs "
            f"{tuple(np.shape(x))} of layer {spec.name}: the mask must cover the leading "
            f"(batch, position) axes of every pruned Dense layer's input."
        )
    # Rows of a dense input are its leading axes flattened in order (mask.size divides).
    reps = mat.shape[0] // mask.size
    weights = jnp.repeat(mask.reshape(-1).astype(dtype), reps)
    return mat * weights[:, None]


def accumulate(stats, adapter, params, batches, specs, dtype, *, dense_params=None,
               masks=None, dense_batches=None):
    """Average the statistics over ``batches``: ``{path: LayerStats}``.

    ``masks`` (one per batch, or None) weight token positions; ``dense_params`` and
    ``dense_batches`` (default: ``batches``) feed the cross statistics of a ``cross=True``
    stats function.
    """
    totals: dict[tuple, list] = {s.path: [None, None, None, 0.0] for s in specs}
    masks = [None] * len(batches) if masks is None else masks
    dense_batches = batches if dense_batches is None else dense_batches
    for batch, mask, dense_batch in zip(batches, masks, dense_batches, strict=True):
        args, kwargs = _split_batch(batch)
        # Without cross statistics the dense inputs are never read: do not pass them in.
        dargs, dkwargs = _split_batch(dense_batch) if dense_params is not None else ((), {})
        out = stats(params, dense_params, adapter.extra, args, kwargs, mask, dargs, dkwargs)
        for path, (xtx, n, finite, cross, dtd) in out.items():
            if path not in totals:  # a pass over more layers than asked for
                continue
            if not bool(finite):
                name = "/".join(map(str, path))
                raise ValueError(
                    f"non-finite activations at the input of layer {name}: check "
                    f"the calibration data and the layers before it."
                )
            acc = totals[path]
            for i, value in enumerate((xtx, cross, dtd)):
                if value is not None:
                    acc[i] = value if acc[i] is None else acc[i] + value
            acc[3] += float(n)
    out = {}
    for spec in specs:
        h, cross, dtd, n = totals[spec.path]
        if h is None:  # no batch (an empty held-out set is never asked for)
            h = jnp.zeros((spec.shape[1],) * 2, dtype)
        scale = 1.0 / max(n, 1.0)
        out[spec.path] = LayerStats(
            h * scale, None if cross is None else cross * scale,
            None if dtd is None else dtd * scale,
        )
    return out
