"""Running a flattened program in segments and collecting each layer group's statistics.

Sequential pruning needs each group's inputs ``X`` from the model whose earlier groups
are already pruned. Rather than re-running the model's prefix for every group, the
program is cut before the first map of each group: a *segment* evaluates the nodes
between two cuts, starting from the values that are live at the first cut (carried per
calibration batch) and the current parameters, and returns the values live at the next
cut plus the statistics of the group it ends at. The whole model is thus evaluated about
once, whatever the number of groups.

Values that do not depend on the batch (parameter views, constants) are never carried:
each segment recomputes the ones it reads from the current parameters, so a weight
transposed early in the program is still read after it was pruned.

Segments are compiled with ``jax.jit`` and cached by their structure (primitives,
parameters, shapes, how values flow): the identical blocks of a Transformer share one
compiled function per kind of segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jcore

from iobs_jax.pruning.maps import x_matrix
from iobs_jax.pruning.program import Lit, Program, eval_node, prim_name


class Capture(NamedTuple):
    """Statistics wanted at a segment's end: group ``group`` reads value ``x``."""

    group: int
    x: int
    xform: tuple
    weights: tuple | None  # row weights from sample_mask (see row_weights), or None


class Segment(NamedTuple):
    nodes: tuple[int, ...]
    inputs: tuple[int, ...]  # value ids read from outside, in order of first use
    outputs: tuple[int, ...]  # batch-dependent values still needed after the segment
    captures: tuple[Capture, ...]


class Layout:
    """Where each value comes from and until when it is needed, for one program."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.producer: dict[int, int] = {}
        self.last_use: dict[int, int] = {}
        self.data = set(prog.batch_ids)
        for n, node in enumerate(prog.nodes):
            for v in node.outs:
                self.producer[v] = n
            for v in node.ins:
                if isinstance(v, int):
                    self.last_use[v] = n
            if any(isinstance(v, int) and v in self.data for v in node.ins):
                self.data.update(node.outs)

    def segment(self, start: int, stop: int, captures: Sequence[Capture], keep_after: int
                ) -> Segment:
        """Nodes ``[start, stop)`` plus what they need recomputed; outputs: the
        batch-dependent values produced here that are read at node ``keep_after`` or later."""
        nodes = list(range(start, stop))
        wanted = [v for n in nodes for v in self.prog.nodes[n].ins] + [c.x for c in captures]
        prefix = self._recompute([v for v in wanted if isinstance(v, int)], start)
        order = prefix + nodes
        produced = {v for n in order for v in self.prog.nodes[n].outs}
        inputs: dict[int, None] = {}
        for v in [v for n in order for v in self.prog.nodes[n].ins] + [c.x for c in captures]:
            if isinstance(v, int) and v not in produced:
                inputs[v] = None
        outputs = tuple(v for n in nodes for v in self.prog.nodes[n].outs
                        if v in self.data and self.last_use.get(v, -1) >= keep_after)
        return Segment(tuple(order), tuple(inputs), outputs, tuple(captures))

    def _recompute(self, values: list[int], start: int) -> list[int]:
        """Producers (before ``start``) of the batch-independent values read, recursively."""
        seen: set[int] = set()
        stack = [v for v in values if v not in self.data]
        while stack:
            v = stack.pop()
            n = self.producer.get(v)
            if n is None or n >= start or n in seen:
                continue
            seen.add(n)
            stack += [u for u in self.prog.nodes[n].ins if isinstance(u, int)]
        return sorted(seen)


# ------------------------------------------------------------------ compile cache


_COMPILED: dict = {}
_JAXPR_STR: dict = {}


def compiled(prog: Program, seg: Segment, dtype, cross: bool):
    """The jitted ``(inputs, dense_inputs, mask) -> (outputs, dense_outputs, stats)`` of
    a segment, shared by every segment of the same structure."""
    key = (_structure(prog, seg), jnp.dtype(dtype).name, cross)
    fn = _COMPILED.get(key)
    if fn is None:
        if len(_COMPILED) >= 512:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = _COMPILED[key] = _build(prog, seg, dtype, cross)
    return fn


def _build(prog: Program, seg: Segment, dtype, cross: bool):
    def run(vals):
        env = dict(zip(seg.inputs, vals, strict=True))
        read = lambda v: v.value if isinstance(v, Lit) else env[v]
        for n in seg.nodes:
            node = prog.nodes[n]
            env.update(zip(node.outs, eval_node(node, [read(v) for v in node.ins]), strict=True))
        return [env[v] for v in seg.outputs], [env[c.x] for c in seg.captures]

    def fn(vals, dense_vals, mask):
        outs, xs = run(vals)
        dense_outs, xds = run(dense_vals) if cross else (None, [None] * len(xs))
        stats = [gram(c, x, xd, mask, dtype) for c, x, xd in zip(seg.captures, xs, xds,
                                                                 strict=True)]
        return outs, dense_outs, stats

    return jax.jit(fn)


def _structure(prog: Program, seg: Segment) -> tuple:
    local = {}
    for i, n in enumerate(seg.nodes):
        for j, v in enumerate(prog.nodes[n].outs):
            local[v] = (i, j)
    pos = {v: i for i, v in enumerate(seg.inputs)}

    def ref(v):
        if isinstance(v, Lit):
            return ("lit", repr(v.value), str(np.result_type(v.value)))
        return ("n", *local[v]) if v in local else ("in", pos[v])

    nodes = tuple((prim_name(node), _freeze(node.params), tuple(ref(v) for v in node.ins),
                   tuple(str(prog.avals[v]) for v in node.outs))
                  for node in (prog.nodes[n] for n in seg.nodes))
    ins = tuple(str(prog.avals[v]) for v in seg.inputs)
    caps = tuple((ref(c.x), c.xform, c.weights) for c in seg.captures)
    return nodes, ins, tuple(ref(v) for v in seg.outputs), caps


def _freeze(v: Any) -> Any:
    if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)):
        if id(v) not in _JAXPR_STR:
            _JAXPR_STR[id(v)] = (v, str(v))  # keep v alive so its id is not reused
        return ("jaxpr", _JAXPR_STR[id(v)][1])
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_freeze(x) for x in v))
    if isinstance(v, np.ndarray):
        return ("array", v.shape, str(v.dtype), v.tobytes())
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return v


# ------------------------------------------------------------------ statistics


def row_weights(rule: tuple | None, mask: jax.Array, dtype) -> jax.Array | None:
    """Per-row weights of an ``X`` matrix from a batch's ``sample_mask``.

    ``("rows", sample_shape)``: the mask covers the leading sample axes (batch, position)
    and is broadcast over the others; ``("examples", sample_shape)``: the input has no
    position axis (a pooler), each example weighs 1 if it has any unmasked position.
    """
    if rule is None or mask is None:
        return None
    kind, shape = rule
    m = mask.astype(dtype)
    if kind == "examples":
        m = (m.reshape(m.shape[0], -1).max(axis=1) > 0).astype(dtype)
    m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
    return jnp.broadcast_to(m, shape).reshape(-1)


def gram(capture: Capture, x, xd, mask, dtype) -> dict:
    """``X^T X`` per problem (and ``X_d^T X``, ``X_d^T X_d`` for dense targets).

    ``X`` is divided by ``2**exponent >= max |X|`` first, so the sums cannot overflow
    (inputs around 1e20 square to 1e40 > float32's range) and the result is exactly
    ``(X/2^e)^T (X/2^e)`` for ordinary inputs; the caller keeps ``exponent``. The
    division is two multiplications by normal powers of two: XLA multiplies by the
    reciprocal, and ``2**-128`` would flush to zero.
    """
    mats = [x_matrix(capture.xform, v).astype(dtype) for v in (x, xd) if v is not None]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in mats]))
    amax = jnp.max(jnp.stack([jnp.max(jnp.abs(a), initial=0.0) for a in mats]))
    ok = finite & (amax > 0)
    exponent = jnp.where(ok, jnp.ceil(jnp.log2(jnp.where(ok, amax, 1.0))), 0.0)
    half = jnp.floor(exponent / 2)
    mats = [a * jnp.exp2(-half).astype(dtype) * jnp.exp2(half - exponent).astype(dtype)
            for a in mats]
    w = row_weights(capture.weights, mask, dtype)
    weighted = [a if w is None else a * w[None, :, None] for a in mats]
    n = jnp.asarray(mats[0].shape[1], dtype) if w is None else jnp.sum(w)
    out = {"h": jnp.einsum("bnc,bnd->bcd", weighted[0], mats[0]), "n": n,
           "finite": finite, "exponent": exponent, "cross": None, "hd": None}
    if len(mats) == 2:
        out["cross"] = jnp.einsum("bnc,bnd->bcd", weighted[1], mats[0])
        out["hd"] = jnp.einsum("bnc,bnd->bcd", weighted[1], mats[1])
    return out


@jax.jit
def _weighted(arrays: list, factors: jax.Array) -> jax.Array:
    return sum(a * f for a, f in zip(arrays, factors, strict=True))


def scaled_sum(arrays: list, factors: list[float]) -> jax.Array:
    """``sum_i arrays[i] * factors[i]`` in one compiled call (factors traced)."""
    return _weighted(list(arrays), jnp.asarray(factors, arrays[0].dtype))


class Sums:
    """Statistics summed over batches, kept divided by ``scale**2`` (a power of two)."""

    def __init__(self):
        self.h = self.cross = self.hd = None
        self.n = 0.0
        self.scale = None

    def add(self, st: dict) -> None:
        s = 2.0 ** float(st["exponent"])  # a Python float: 2**128 does not overflow
        if self.scale is None:
            self.scale, self.h, self.cross, self.hd = s, st["h"], st["cross"], st["hd"]
        else:
            big = max(self.scale, s)
            f = [(self.scale / big) ** 2, (s / big) ** 2]
            self.h = scaled_sum([self.h, st["h"]], f)
            if self.cross is not None:
                self.cross = scaled_sum([self.cross, st["cross"]], f)
                self.hd = scaled_sum([self.hd, st["hd"]], f)
            self.scale = big
        self.n += float(st["n"])
