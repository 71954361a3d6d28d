"""A model's forward pass as a flat list of primitive applications, and its linear maps.

Pruning works on any JAX program ``apply_fn(params, batch)``: the program is traced once
(``jax.make_jaxpr``) and flattened into :class:`Program`, a straight list of nodes over
integer value ids. Calls (``jit``, ``custom_jvp``/``custom_vjp``, ``remat``) are inlined;
a ``scan`` that reads parameters (``nn.scan``/``nnx.scan``/``lax.scan`` over stacked
layers) is unrolled, one copy of its body per iteration, so each layer's slice of the
stacked parameters becomes its own linear map.

:func:`analyze` then finds the linear maps: every ``dot_general`` or
``conv_general_dilated`` one of whose operands is a *view* of one parameter leaf (the
leaf itself or the leaf through dtype casts, transposes, reshapes and slices). For each
map it records, per weight position, the flat index into the leaf (the view's layout
applied to ``arange(leaf.size)``), so the weight can be read as matrices
``W[b]`` of shape ``(rows, cols)`` = ``(outputs, inputs)`` and written back in place.
Axes shared by weight, input and output (per-head einsums) and feature groups of a
convolution make ``b`` range over independent problems.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jcore

# Calls whose body is inlined: evaluating the body gives the same forward values.
_INLINE = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "remat2", "checkpoint", "custom_lin"}
# Primitives that only move, cast or select entries: a parameter seen through them is
# still the parameter (a "view").
_IDENTITY = {"convert_element_type", "copy", "copy_p", "reduce_precision",
             "sharding_constraint", "mesh_cast", "reshard"}
_LAYOUT = _IDENTITY | {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
                       "slice", "rev", "dynamic_slice", "gather", "index"}


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or NumPy scalar baked into the program)."""

    value: Any


class Node(NamedTuple):
    """One primitive application; ``prim`` is a JAX primitive or ``"index"``/``"stack"``."""

    prim: Any
    params: dict
    ins: tuple  # value ids (int) or Lit
    outs: tuple  # value ids


@dataclasses.dataclass
class Program:
    """A flattened forward pass: values ``0..len(avals)-1``, nodes in evaluation order."""

    avals: list
    nodes: list[Node]
    consts: dict[int, Any]
    param_ids: list[int]
    batch_ids: list[int]
    out_ids: list


def prim_name(node: Node) -> str:
    return node.prim if isinstance(node.prim, str) else node.prim.name


def eval_node(node: Node, vals: list) -> list:
    """Apply one node to its operand values (inside or outside ``jit``)."""
    if node.prim == "index":
        return [lax.dynamic_index_in_dim(vals[0], vals[1], 0, keepdims=False)]
    if node.prim == "stack":
        return [jnp.stack(vals, axis=0)]
    params = node.prim.get_bind_params(node.params)
    out = node.prim.bind(*vals, **params)
    return list(out) if node.prim.multiple_results else [out]


# ----------------------------------------------------------------------- tracing


def trace(fn: Callable, params: Any, batch: Any) -> Program:
    """Trace ``fn(params, batch)`` and flatten it (see the module docstring)."""
    closed = jax.make_jaxpr(fn)(params, batch)
    n_params = len(jax.tree.leaves(params))
    builder = _Builder()
    ins = [builder.new(v.aval) for v in closed.jaxpr.invars]
    for i in range(n_params):
        builder.param_dep[ins[i]] = True
    outs = builder.inline(closed.jaxpr, closed.consts, ins)
    return Program(builder.avals, builder.nodes, builder.consts, ins[:n_params],
                   ins[n_params:], outs)


class _Builder:
    def __init__(self):
        self.avals: list = []
        self.nodes: list[Node] = []
        self.consts: dict[int, Any] = {}
        self.param_dep: dict[int, bool] = {}

    def new(self, aval) -> int:
        self.avals.append(aval)
        return len(self.avals) - 1

    def const(self, value) -> int:
        vid = self.new(jax.typeof(value))
        self.consts[vid] = value
        return vid

    def inline(self, jaxpr, consts, ins: list) -> list:
        env: dict = dict(zip(jaxpr.invars, ins, strict=True))
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = self.const(value)

        def read(v):
            return Lit(v.val) if isinstance(v, jcore.Literal) else env[v]

        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for var, vid in zip(eqn.outvars, outs, strict=True):
                env[var] = vid
        return [read(v) for v in jaxpr.outvars]

    def depends_on_params(self, ins) -> bool:
        return any(isinstance(i, int) and self.param_dep.get(i, False) for i in ins)

    def eqn(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        body = _call_body(eqn) if name in _INLINE else None
        if body is not None:
            return self.inline(body[0], body[1], ins)
        if name == "scan" and self.depends_on_params(ins):
            return self.unroll(eqn, ins)
        outs = [self.new(v.aval) for v in eqn.outvars]
        self.nodes.append(Node(eqn.primitive, dict(eqn.params), tuple(ins), tuple(outs)))
        if self.depends_on_params(ins):
            for o in outs:
                self.param_dep[o] = True
        return outs

    def unroll(self, eqn, ins: list) -> list:
        """A scan as ``length`` copies of its body (each iteration's slice is its own)."""
        p = eqn.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
        body = p["jaxpr"]
        ys: list[list] = [[] for _ in range(len(body.jaxpr.outvars) - ncar)]
        steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for i in steps:
            index = self.const(np.int32(i))
            x_i = [self.apply("index", {}, [x, index], [_index_aval(self.aval(x))])[0]
                   for x in xs]
            outs = self.inline(body.jaxpr, body.consts, [*consts, *carry, *x_i])
            carry = outs[:ncar]
            for slot, y in zip(ys, outs[ncar:], strict=True):
                slot.append(y)
        stacked = []
        for slot, var in zip(ys, eqn.outvars[ncar:], strict=True):
            order = slot[::-1] if p["reverse"] else slot
            stacked.append(self.apply("stack", {}, order, [var.aval])[0])
        return [*carry, *stacked]

    def aval(self, v):
        return jax.typeof(v.value) if isinstance(v, Lit) else self.avals[v]

    def apply(self, prim, params, ins, out_avals) -> list:
        outs = [self.new(a) for a in out_avals]
        self.nodes.append(Node(prim, params, tuple(ins), tuple(outs)))
        if self.depends_on_params(ins):
            for o in outs:
                self.param_dep[o] = True
        return outs


def _index_aval(aval):
    return jcore.ShapedArray(aval.shape[1:], aval.dtype, weak_type=aval.weak_type)


def _call_body(eqn):
    """``(jaxpr, consts)`` of a call-like equation whose body maps its operands 1:1."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if isinstance(body, jcore.ClosedJaxpr):
            jaxpr, consts = body.jaxpr, body.consts
        elif isinstance(body, jcore.Jaxpr):
            jaxpr, consts = body, ()
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None
