"""The calibration passes of :func:`iobs_jax.prune`: one program per batch shape, the
carried values per batch, and the statistics of each group, sequential or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from iobs_jax.pruning import engine as eng
from iobs_jax.pruning import maps as _maps
from iobs_jax.pruning import plan as _plan
from iobs_jax.pruning.program import trace


class Run:
    """One traced program and the calibration batches that share its shapes."""

    def __init__(self, fn: Callable, params: Any, batch: Any, index: list[int],
                 diagnose: Callable | None = None):
        try:
            self.prog = trace(fn, params, batch)
        except Exception as err:  # noqa: BLE001 - re-raised with the option named
            first = str(err).splitlines()[0] if str(err) else ""
            why = _diagnose(diagnose, batch)
            if why is not None:
                shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
                raise ValueError(
                    f"params and calib_batches[{index[0]}] (array shapes {shapes}) do not fit "
                    f"the model together: {why} for this batch. Pass this model's parameters "
                    f"and batches it takes ({type(err).__name__}: {first}).") from err
            raise ValueError(
                f"calib_batches[{index[0]}] could not be fed to the model "
                f"({type(err).__name__}: {first}). Each batch must be what the model takes: "
                f"for a Flax module an array, a tuple of positional arguments or a dict of "
                f"keyword arguments; for a function, its second argument."
            ) from err
        self.analysis = _maps.analyze(self.prog)
        self.layout = eng.Layout(self.prog)
        self.index = index  # which calibration batches use this program
        self.leaf_of = {v: i for i, v in enumerate(self.prog.param_ids)}
        self.groups: list[tuple[int, ...]] = []
        self.rules: dict[int, tuple | None] = {}

    def cut(self, g: int) -> int:
        return self.analysis.maps[self.groups[g][0]].node

    def capture(self, g: int) -> eng.Capture:
        m = self.analysis.maps[self.groups[g][0]]
        return eng.Capture(g, m.x, m.xform, self.rules.get(g))


def signature(batch: Any) -> tuple:
    leaves, tree = jax.tree.flatten(batch)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__)))
                       for x in leaves)


def _diagnose(diagnose, batch) -> str | None:
    if diagnose is None:
        return None
    try:
        return diagnose(batch)
    except Exception:  # noqa: BLE001 - the batch itself is bad: say so instead
        return None


def trace_runs(fn: Callable, params: Any, batches: list, diagnose=None) -> list[Run]:
    """A :class:`Run` per distinct batch signature; all must find the same maps."""
    by_sig: dict[tuple, list[int]] = {}
    for i, b in enumerate(batches):
        by_sig.setdefault(signature(b), []).append(i)
    runs = [Run(fn, params, batches[idx[0]], idx, diagnose) for idx in by_sig.values()]
    first = runs[0].analysis.maps
    for run in runs[1:]:
        maps = run.analysis.maps
        same = len(maps) == len(first) and all(
            a.leaf == b.leaf and np.array_equal(a.pos, b.pos)
            for a, b in zip(maps, first, strict=True))
        if not same:
            raise ValueError(
                f"calib_batches[{run.index[0]}] and calib_batches[{runs[0].index[0]}] have "
                f"different shapes and the model uses its weights differently for them "
                f"({len(maps)} vs {len(first)} linear maps); give batches of one shape.")
    return runs


class Envs:
    """The values carried between segments for each batch (and its dense twin)."""

    def __init__(self, run: Run, batches: list, dense_batches: list | None):
        self.run = run
        self.env = [self._initial(b) for b in batches]
        self.dense = None if dense_batches is None else [self._initial(b) for b in dense_batches]

    def _initial(self, batch) -> dict:
        leaves = [jax.numpy.asarray(x) for x in jax.tree.leaves(batch)]
        return dict(zip(self.run.prog.batch_ids, leaves, strict=True))

    def inputs(self, seg: eng.Segment, env: dict, leaves: list) -> list:
        prog, out = self.run.prog, []
        for v in seg.inputs:
            if v in self.run.leaf_of:
                out.append(leaves[self.run.leaf_of[v]])
            elif v in prog.consts:
                out.append(prog.consts[v])
            else:
                out.append(env[v])
        return out

    def evaluate(self, seg, masks, leaves, dense_leaves, dtype, sums: dict, keep: bool):
        """Run ``seg`` on every batch; add the captured statistics into ``sums``."""
        if not self.env:
            return
        cross = self.dense is not None
        fn = eng.compiled(self.run.prog, seg, dtype, cross)
        for i, env in enumerate(self.env):
            denv = self.dense[i] if cross else None
            vals = self.inputs(seg, env, leaves)
            dvals = self.inputs(seg, denv, dense_leaves) if cross else None
            outs, douts, stats = fn(vals, dvals, None if masks is None else masks[i])
            for cap, st in zip(seg.captures, stats, strict=True):
                _check_finite(st, cap, self.run, i)
                sums.setdefault(cap.group, eng.Sums()).add(st)
            if keep:
                env.update(zip(seg.outputs, outs, strict=True))
                if cross:
                    denv.update(zip(seg.outputs, douts, strict=True))

    def forget(self, before: int) -> None:
        """Drop carried values not read at node ``before`` or later."""
        last = self.run.layout.last_use
        for env in self.env + (self.dense or []):
            for v in [v for v in env if last.get(v, -1) < before]:
                del env[v]


class NonFiniteActivations(ValueError):
    """A layer's calibration inputs hold NaN or inf."""


def _check_finite(st: dict, cap: eng.Capture, run: Run, i: int) -> None:
    if bool(st["finite"]):
        return
    maps = run.analysis.maps
    names = sorted({run.names[m] for m in run.groups[cap.group] if m in run.names})
    raise NonFiniteActivations(
        f"non-finite activations at the input of layer {', '.join(names)} "
        f"(calibration batch {run.index[i] if i < len(run.index) else i}): the batch and "
        f"the parameters are finite, so the model itself overflows or divides by zero on "
        f"this input before that layer ({len(maps)} maps in the program)."
    )


def weight_rule(sample_shape: tuple, mask_shape: tuple) -> tuple | None:
    """How a ``sample_mask`` of ``mask_shape`` weights the rows of an input whose sample
    axes are ``sample_shape`` (see :func:`iobs_jax.pruning.engine.row_weights`); None if it
    does not line up."""
    m = len(mask_shape)
    if tuple(sample_shape[:m]) == tuple(mask_shape):
        return ("rows", tuple(sample_shape))
    if 0 < len(sample_shape) < m and sample_shape[0] == mask_shape[0]:
        return ("examples", tuple(sample_shape))  # a pooler: no position axis
    return None


def set_groups(runs: list[Run], targets: list[_plan.Target], chosen: list[bool],
               mask_shapes: list | None) -> None:
    """Groups (the same in every run) and the sample-mask rule of each, checked now."""
    for run in runs:
        run.groups, run.group_of = _plan.make_groups(run.analysis, targets, chosen)
        run.names = {i: t.name for t, c in zip(targets, chosen, strict=True) if c
                     for i in t.maps}
    for run in runs[1:]:
        if run.groups != runs[0].groups:
            raise ValueError(f"calib_batches[{run.index[0]}] has other shapes than "
                             f"calib_batches[0] and its layers group differently; give "
                             f"batches of one shape.")
    if mask_shapes is None:
        return
    for run in runs:
        shapes = {tuple(mask_shapes[i]) for i in run.index}
        for g, group in enumerate(run.groups):
            m = run.analysis.maps[group[0]]
            rules = {weight_rule(m.sample_shape, s) for s in shapes}
            if None in rules or len(rules) > 1:
                raise ValueError(
                    f"sample_mask of shape {sorted(shapes)[0]} does not line up with the input "
                    f"of layer {run.names[group[0]]}, whose sample axes are {m.sample_shape}: "
                    f"the mask must cover the leading (batch, position) axes of every pruned "
                    f"layer's input (or just the batch axis, for an input without positions).")
            run.rules[g] = rules.pop()
