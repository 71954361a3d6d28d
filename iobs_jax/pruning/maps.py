"""The linear maps of a flattened program: which parameter, which layout, which input.

A *view* is a value that holds entries of exactly one parameter leaf, moved but not
changed: the leaf itself, or the leaf after casts, transposes, reshapes, slices or
gathers with fixed indices. Its layout is tracked as an integer array holding, at every
position, the flat index of the leaf entry found there (the same primitives applied to
``arange(leaf.size)``). A ``dot_general`` with a view operand, or a
``conv_general_dilated`` whose kernel is a view, is a linear map ``W`` acting on its
other operand ``X``:

- ``dot_general``: the weight's contracted axes are the inputs (columns), its free axes
  the outputs (rows); batch axes shared by both operands (per-head einsums) index
  independent problems, each with its own ``H``.
- ``conv_general_dilated``: inputs are the (channel, window) entries of each patch of
  ``X``; each feature group is an independent problem.

Every map is described by :class:`LinearMap`: ``pos[b, r, c]`` is the leaf's flat index
of weight ``W[b][r, c]``, ``xform`` turns the value of ``X`` into matrices ``(B, N, C)``
whose rows are samples, and ``yform`` turns the map's output into ``(B, N, R)``, so that
``Y[b] = X[b] @ W[b].T`` (what the oracle tests check).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from iobs_jax.pruning.program import _IDENTITY, _LAYOUT, Lit, Program, eval_node, prim_name


class LinearMap(NamedTuple):
    node: int  # index of the dot_general / conv node in program.nodes
    leaf: int  # parameter leaf index
    pos: np.ndarray  # (B, R, C) flat indices into the leaf
    kind: str  # "dense", "batched", "conv" or "grouped_conv"
    x: int  # value id of the input operand
    xform: tuple  # static recipe: X value -> (B, N, C)
    sample_shape: tuple  # shape of X's sample axes (the rows of each X matrix, in order)
    yform: tuple  # static recipe: output value -> (B, N, R)

    shape = property(lambda self: matrix_shape(self.pos))
    problems = property(lambda self: int(self.pos.shape[0]))


def matrix_shape(pos: np.ndarray) -> tuple[int, int]:
    """``(rows, cols)`` = ``(outputs, inputs)`` of each problem of a map laid out as ``pos``."""
    return int(pos.shape[1]), int(pos.shape[2])


class Analysis(NamedTuple):
    maps: list[LinearMap]
    other_uses: dict[int, list[str]]  # leaf -> primitive names that read it otherwise


def analyze(prog: Program) -> Analysis:
    """Find the linear maps and every other use of the parameter leaves."""
    data = _data_dependent(prog)
    views: dict[int, tuple[int, np.ndarray]] = {}
    for leaf, vid in enumerate(prog.param_ids):
        size = int(np.prod(prog.avals[vid].shape, dtype=np.int64))
        dtype = np.int64 if size >= 2**31 else np.int32
        views[vid] = (leaf, np.arange(size, dtype=dtype).reshape(prog.avals[vid].shape))
    maps: list[LinearMap] = []
    other: dict[int, list[str]] = {}
    for n, node in enumerate(prog.nodes):
        at = [j for j, v in enumerate(node.ins) if isinstance(v, int) and v in views]
        if not at:
            continue
        name = prim_name(node)
        if name in _LAYOUT and at == [0]:
            out = _propagate(node, views[node.ins[0]][1], prog, data)
            # Only a gather can repeat entries; the other layout ops permute or select.
            if out is not None and (name != "gather" or _distinct(out)):
                views[node.outs[0]] = (views[node.ins[0]][0], out)
                continue
        found = _linear_map(n, node, at, views, prog) if name in (
            "dot_general", "conv_general_dilated") else None
        if found is not None:
            maps.append(found)
            continue
        for j in at:
            other.setdefault(views[node.ins[j]][0], []).append(name)
    return Analysis(maps, other)


def _data_dependent(prog: Program) -> set[int]:
    dep = set(prog.batch_ids)
    for node in prog.nodes:
        if any(isinstance(v, int) and v in dep for v in node.ins):
            dep.update(node.outs)
    return dep


def _distinct(idx: np.ndarray) -> bool:
    flat = idx.reshape(-1)
    return flat.size == 0 or int(np.bincount(flat).max()) <= 1


def _concrete(v, prog: Program, data: set[int]):
    """The value of a non-view operand if it is fixed by the program (else None)."""
    if isinstance(v, Lit):
        return v.value
    if v in prog.consts and v not in data:
        return prog.consts[v]
    return None


def _propagate(node, idx: np.ndarray, prog: Program, data: set[int]) -> np.ndarray | None:
    """The layout of ``node``'s output when its first operand has layout ``idx``."""
    name, p = prim_name(node), node.params
    rest = [_concrete(v, prog, data) for v in node.ins[1:]]
    if any(r is None for r in rest):
        return None
    if name in _IDENTITY:
        return idx
    if name == "transpose":
        return np.transpose(idx, p["permutation"])
    if name == "reshape":
        return idx.reshape(p["new_sizes"]) if p.get("dimensions") is None else None
    if name == "squeeze":
        return np.squeeze(idx, tuple(p["dimensions"]))
    if name == "broadcast_in_dim":
        shape = tuple(p["shape"])
        return idx.reshape(shape) if int(np.prod(shape)) == idx.size else None
    if name == "slice":
        strides = p.get("strides") or (1,) * idx.ndim
        return idx[tuple(slice(a, b, s) for a, b, s in
                         zip(p["start_indices"], p["limit_indices"], strides, strict=True))]
    if name == "rev":
        return np.flip(idx, tuple(p["dimensions"]))
    if name == "index":
        return idx[int(rest[0])]
    # dynamic_slice / gather with fixed indices: let JAX compute where each entry goes.
    out = eval_node(node, [jnp.asarray(idx), *rest])[0]
    return np.asarray(out)


def _linear_map(n: int, node, at: list[int], views: dict, prog: Program) -> LinearMap | None:
    if len(at) != 1:
        return None  # both operands are parameters: not a map acting on data
    side = at[0]
    leaf, idx = views[node.ins[side]]
    x = node.ins[1 - side]
    if not isinstance(x, int):
        return None
    x_shape = tuple(prog.avals[x].shape)
    if prim_name(node) == "dot_general":
        return _dot_map(n, node, side, leaf, idx, x, x_shape)
    if side != 1:
        return None
    return _conv_map(n, node, leaf, idx, x, x_shape, tuple(prog.avals[node.outs[0]].shape))


def _dot_map(n, node, side, leaf, idx, x, x_shape) -> LinearMap:
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    wc, wb = (tuple(lc), tuple(lb)) if side == 0 else (tuple(rc), tuple(rb))
    xc, xb = (tuple(rc), tuple(rb)) if side == 0 else (tuple(lc), tuple(lb))
    wf = tuple(d for d in range(idx.ndim) if d not in wc + wb)
    xf = tuple(d for d in range(len(x_shape)) if d not in xc + xb)
    size = lambda dims, shape: int(np.prod([shape[d] for d in dims], dtype=np.int64))
    b, r, c = size(wb, idx.shape), size(wf, idx.shape), size(wc, idx.shape)
    pos = np.transpose(idx, wb + wf + wc).reshape(b, r, c)
    rows = size(xf, x_shape)
    nb, nwf = len(wb), len(wf)
    # dot_general's output axes: batch, lhs free, rhs free.
    if side == 0:
        yperm = tuple(range(nb)) + tuple(range(nb + nwf, nb + nwf + len(xf))) + tuple(
            range(nb, nb + nwf))
    else:
        yperm = tuple(range(nb + len(xf) + nwf))
    kind = "dense" if b == 1 and not wb else "batched"
    return LinearMap(n, leaf, pos, kind, x, ("dot", xb + xf + xc, (b, rows, c)),
                     tuple(x_shape[d] for d in xf), ("perm", yperm, (b, rows, r)))


def _conv_map(n, node, leaf, idx, x, x_shape, out_shape) -> LinearMap | None:
    p = node.params
    if p["batch_group_count"] != 1 or idx.ndim - 2 > 3:
        return None
    lhs, rhs, out = p["dimension_numbers"]
    groups = int(p["feature_group_count"])
    kernel = np.transpose(idx, tuple(rhs))  # (O, I, *window)
    o, i, window = kernel.shape[0], kernel.shape[1], kernel.shape[2:]
    pos = kernel.reshape(groups, o // groups, i * int(np.prod(window, dtype=np.int64)))
    samples = (out_shape[out[0]],) + tuple(out_shape[d] for d in out[2:])
    rows = int(np.prod(samples, dtype=np.int64))
    xform = ("conv", tuple(lhs), tuple(window), tuple(p["window_strides"]),
             tuple(tuple(q) for q in p["padding"]), tuple(p["lhs_dilation"]),
             tuple(p["rhs_dilation"]), groups, (groups, rows, pos.shape[2]))
    yperm = (out[0], *out[2:], out[1])
    kind = "conv" if groups == 1 else "grouped_conv"
    return LinearMap(n, leaf, pos, kind, x, xform, samples,
                     ("conv", yperm, (groups, rows, o // groups)))


# ----------------------------------------------------------------- matrices


def x_matrix(xform: tuple, x: Any) -> jnp.ndarray:
    """The input of a map as ``(B, N, C)`` matrices (rows = samples)."""
    if xform[0] == "dot":
        _, perm, shape = xform
        return jnp.transpose(x, perm).reshape(shape)
    _, lhs, window, strides, padding, lhs_dil, rhs_dil, groups, shape = xform
    x = jnp.transpose(x, lhs)  # (N, C, *spatial)
    spatial = "DHW"[3 - len(window):]
    patches = lax.conv_general_dilated_patches(
        x, window, strides, padding, lhs_dil, rhs_dil,
        dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial),
        precision=lax.Precision.HIGHEST,
    )  # (N, C * prod(window), *out_spatial), features ordered (channel, *window)
    patches = jnp.moveaxis(patches, 1, -1).reshape(shape[1], groups, shape[2])
    return jnp.transpose(patches, (1, 0, 2))


def y_matrix(yform: tuple, y: Any) -> jnp.ndarray:
    """A map's output as ``(B, N, R)`` matrices, lined up with :func:`x_matrix`."""
    _, perm, shape = yform
    y = jnp.transpose(y, perm)
    if yform[0] == "perm":
        return y.reshape(shape)
    b, n, r = shape
    return jnp.transpose(y.reshape(n, b, r), (1, 0, 2))


def w_matrix(pos: np.ndarray, leaf: Any) -> jnp.ndarray:
    """The weights ``(B, R, C)`` of a map, read from its parameter leaf."""
    return jnp.asarray(leaf).reshape(-1)[jnp.asarray(pos)]


def write_back(leaf: Any, pos: np.ndarray, w: Any) -> jnp.ndarray:
    """``leaf`` with the entries at ``pos`` replaced by ``w`` (cast to the leaf's dtype)."""
    leaf = jnp.asarray(leaf)
    flat = leaf.reshape(-1).at[jnp.asarray(pos).reshape(-1)].set(
        jnp.asarray(w).reshape(-1).astype(leaf.dtype))
    return flat.reshape(leaf.shape)
