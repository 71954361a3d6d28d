"""Prunable layers of Flax models: what they are and how they become ``W X``.

Every supported layer is, for pruning, a matrix ``W`` of shape ``(rows, cols)`` (rows =
output features) applied to input columns ``x`` of length ``cols``:

- Linen ``Dense`` / NNX ``Linear``: kernel ``(in, out)``, ``W = kernel.T``.
- Linen ``DenseGeneral`` / NNX ``LinearGeneral``: kernel ``(*in_dims, *out_dims)``, the
  contracted input axes are moved last and flattened.
- Linen ``Conv`` / NNX ``Conv`` (1-3 spatial dims, any strides, dilations, SAME/VALID or
  explicit padding, one feature group): inputs are unfolded into patches with
  ``lax.conv_general_dilated_patches`` whose features are ordered (channel, *window), so
  ``W = kernel`` transposed to ``(out, in, *window)`` and flattened.
- Linen / NNX ``Einsum`` (``"...ab,bc->...ac"``-style, one input and one kernel): the
  kernel letters that reach the output are the rows, the contracted letters the
  columns. Letters shared by input, kernel and output (a block-diagonal kernel, e.g.
  per-head weights) are not supported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax


class LayerSpec(NamedTuple):
    """Static description of one prunable layer (found by tracing the model)."""

    path: tuple[str, ...]  # the module's path; its kernel is params[*path]["kernel"]
    kind: str  # "dense", "dense_general" or "conv"
    kernel_shape: tuple[int, ...]
    n_in: int  # leading kernel axes that are inputs (conv: the spatial axes + channels)
    in_axes: tuple[int, ...] = ()  # dense_general: the contracted input axes (negative)
    conv: tuple | None = None  # (strides, padding, lhs_dilation, rhs_dilation)
    einsum: tuple | None = None  # (input letters, kernel letters, output letters)

    @property
    def name(self) -> str:
        return "/".join(map(str, self.path)) or "<root>"

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the pruning matrix."""
        shape = self.kernel_shape
        if self.kind == "einsum":
            shape = tuple(shape[i] for i in _einsum_perm(self)[0])
        cols = int(np.prod(shape[: self.n_in]))
        return int(np.prod(shape[self.n_in :])), cols


class Unsupported(ValueError):
    """A layer type we recognise but whose configuration cannot be pruned as ``W X``."""


def _tuple(v, n):
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v)


def _padding(padding, n):
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise Unsupported(f"padding={padding!r} (only SAME, VALID or explicit padding)")
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pads = []
    for p in padding:
        pads.append((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return tuple(pads)


def conv_spec(path, kernel_shape, module) -> LayerSpec:
    """Spec of a Linen or NNX ``Conv`` from its attributes."""
    n = len(kernel_shape) - 2
    if int(getattr(module, "feature_group_count", 1)) != 1:
        raise Unsupported("grouped / depthwise convolution (feature_group_count > 1)")
    conv = (
        _tuple(getattr(module, "strides", None), n),
        _padding(getattr(module, "padding", "SAME"), n),
        _tuple(getattr(module, "input_dilation", None), n),
        _tuple(getattr(module, "kernel_dilation", None), n),
    )
    return LayerSpec(tuple(path), "conv", tuple(kernel_shape), n + 1, (), conv)


def dense_general_spec(path, kernel_shape, axis, x_ndim, batch_dims=()) -> LayerSpec:
    """Spec of a ``DenseGeneral`` / ``LinearGeneral`` contracting ``axis`` of its input."""
    if batch_dims:
        raise Unsupported("DenseGeneral with batch_dims (a block-diagonal kernel)")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a - x_ndim if a >= 0 else a for a in axes)
    return LayerSpec(tuple(path), "dense_general", tuple(kernel_shape), len(axes), axes)


def einsum_spec(path, kernel_shape, einsum_str) -> LayerSpec:
    """Spec of an ``Einsum`` layer ``"<input>,<kernel>-><output>"``."""
    if not isinstance(einsum_str, str):
        raise Unsupported("Einsum whose einsum_str is passed at call time")
    spec = einsum_str.replace(" ", "")
    try:
        lhs, rest = spec.split(",")
        rhs, out = rest.split("->")
    except ValueError:
        raise Unsupported(f"einsum {einsum_str!r} (needs one input and one kernel)") from None
    if "." in rhs:
        raise Unsupported(f"einsum {einsum_str!r} (ellipsis in the kernel)")
    shared = [c for c in rhs if c in lhs and c in out]
    if shared:
        raise Unsupported(f"einsum {einsum_str!r} (letters {''.join(shared)} shared by input, "
                          f"kernel and output: a block-diagonal kernel)")
    contracted = "".join(c for c in rhs if c in lhs)
    outs = "".join(c for c in rhs if c in out)
    if len(contracted) + len(outs) != len(rhs):
        raise Unsupported(f"einsum {einsum_str!r} (a kernel axis that is summed away)")
    lhs_letters = lhs.replace("...", "")
    if any(c not in out for c in lhs_letters if c not in contracted):
        raise Unsupported(f"einsum {einsum_str!r} (an input axis that is summed away)")
    return LayerSpec(tuple(path), "einsum", tuple(kernel_shape), len(contracted),
                     einsum=(lhs, rhs, contracted + "|" + outs))


def _einsum_perm(spec: LayerSpec):
    """Kernel axes ordered (contracted..., outputs...) and the input letters."""
    lhs, rhs, order = spec.einsum
    contracted, outs = order.split("|")
    return [rhs.index(c) for c in contracted + outs], lhs, contracted


def dense_spec(path, kernel_shape) -> LayerSpec:
    return LayerSpec(tuple(path), "dense", tuple(kernel_shape), 1)


def inputs_matrix(spec: LayerSpec, x: Any) -> jnp.ndarray:
    """The layer's input columns as a ``(samples, cols)`` matrix."""
    x = jnp.asarray(x)
    if spec.kind == "dense":
        return x.reshape(-1, spec.kernel_shape[0])
    if spec.kind == "dense_general":
        moved = jnp.moveaxis(x, spec.in_axes, tuple(range(-len(spec.in_axes), 0)))
        return moved.reshape(-1, spec.shape[1])
    if spec.kind == "einsum":
        _, lhs, contracted = _einsum_perm(spec)
        if "..." in lhs:  # expand the ellipsis into the letters it stands for
            free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in lhs]
            n = x.ndim - (len(lhs) - 3)
            lhs = lhs.replace("...", "".join(free[:n]))
        axes = [lhs.index(c) for c in contracted]
        moved = jnp.moveaxis(x, axes, tuple(range(-len(axes), 0)))
        return moved.reshape(-1, spec.shape[1])
    n = spec.n_in - 1
    x = x.reshape((-1,) + x.shape[-(n + 1) :])  # flax convs accept any batch rank
    strides, padding, lhs_dil, rhs_dil = spec.conv
    spatial = "DHW"[-n:] if n <= 3 else None
    lhs = "N" + spatial + "C"
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=spec.kernel_shape[:n],
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=(lhs, spatial + "IO", lhs),
        precision=lax.Precision.HIGHEST,
    )
    return patches.reshape(-1, spec.shape[1])


def kernel_to_matrix(spec: LayerSpec, kernel: jnp.ndarray) -> jnp.ndarray:
    """``W`` of shape ``(rows, cols)`` whose columns line up with :func:`inputs_matrix`."""
    rows, cols = spec.shape
    if spec.kind == "conv":
        n = spec.n_in - 1
        # (*window, in, out) -> (out, in, *window): patches are ordered (channel, *window).
        perm = (n + 1, n) + tuple(range(n))
        return jnp.transpose(kernel, perm).reshape(rows, cols)
    if spec.kind == "einsum":
        kernel = jnp.transpose(kernel, _einsum_perm(spec)[0])
    return kernel.reshape(cols, rows).T


def matrix_to_kernel(spec: LayerSpec, w: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`kernel_to_matrix`."""
    if spec.kind == "conv":
        n = spec.n_in - 1
        window, cin, cout = spec.kernel_shape[:n], spec.kernel_shape[n], spec.kernel_shape[n + 1]
        w = w.reshape((cout, cin) + tuple(window))
        return jnp.transpose(w, tuple(range(2, n + 2)) + (1, 0))
    if spec.kind == "einsum":
        perm = _einsum_perm(spec)[0]
        shape = tuple(spec.kernel_shape[i] for i in perm)
        return jnp.transpose(w.T.reshape(shape), np.argsort(perm))
    return w.T.reshape(spec.kernel_shape)
