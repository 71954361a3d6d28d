"""``iobs_jax.prune``: prune every linear map of a JAX model with calibration data.

The model is any JAX program: a Flax Linen module with its ``params``, an NNX module, or
a function ``apply_fn(params, batch)`` (Equinox via ``eqx.partition``, Hugging Face Flax
models as ``lambda p, b: model.module.apply({"params": p}, **b)``, plain JAX). The
program is traced once per batch shape; its linear maps are found in the trace
(:mod:`iobs_jax.pruning.maps`), planned (:mod:`iobs_jax.pruning.plan`), and their inputs' statistics
``H = X X^T / N`` are collected in segments (:mod:`iobs_jax.pruning.engine`) so that sequential
pruning costs about one forward pass over the model. Each weight matrix is then pruned
by a layer-wise method (:mod:`iobs_jax.pruning.layerwise`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iobs_jax.core.curvature import highest_precision
from iobs_jax.core.masks import topk_mask
from iobs_jax.core.validation import check_choice
from iobs_jax.pruning import layerwise as lw
from iobs_jax.pruning import maps as _maps
from iobs_jax.pruning import passes as ps
from iobs_jax.pruning import plan as _plan
from iobs_jax.pruning.engine import Sums, scaled_sum

_METHOD_SCOPE = {"magnitude": "layer", "wanda": "row", "sparsegpt": None, "obc": "row",
                 "iobs": "layer"}


class LayerReport(NamedTuple):
    """What happened to one weight matrix (a linear map of the model).

    ``loss_masked`` is the layer loss of the dense weights with the mask applied (no
    compensation), ``loss`` the loss of the returned weights; both are
    ``||W X - W0 X||^2 / N`` over the layer's calibration inputs (summed over the
    ``problems`` independent matrices of a per-head or grouped map), and
    ``output_energy = ||W0 X||^2 / N`` puts them on a scale. ``info`` holds what the
    method reports (e.g. whether a refit converged).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    loss_masked: float
    loss: float
    output_energy: float
    time_s: float
    problems: int = 1
    info: dict = {}


class PruneReport(NamedTuple):
    """Returned by :func:`prune` next to the pruned parameters.

    ``masks`` is a pytree like the parameters (True = kept; all True on leaves left
    dense); ``skipped`` lists every parameter with two or more dimensions that was not
    pruned, with the reason (the entries of :func:`prune_plan`).
    """

    method: str
    layers: list[LayerReport]
    masks: Any
    time_s: float
    skipped: list = []
    dense_fraction: float = 0.0  # of the entries of all >= 2-D parameters, left unpruned

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self.layers))

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned weight matrices."""
        sizes = [r.problems * r.shape[0] * r.shape[1] for r in self.layers]
        zeros = sum(r.sparsity * s for r, s in zip(self.layers, sizes, strict=True))
        return zeros / max(sum(sizes), 1)

    def summary(self) -> str:
        head = f"{'layer':<36} {'shape':>12} {'sparsity':>8} {'masked':>10} {'loss':>10} {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.problems}x{r.shape}" if r.problems > 1 else str(r.shape)
            lines.append(
                f"{r.name:<36} {shape:>12} {r.sparsity:8.3f} "
                f"{r.loss_masked / max(r.output_energy, 1e-30):10.3e} "
                f"{r.loss / max(r.output_energy, 1e-30):10.3e} {r.time_s:6.2f}"
            )
        lines.append(f"{self.method}: total layer loss {self.total_loss:.4e}, "
                     f"sparsity {self.sparsity:.3f}, {self.time_s:.2f} s "
                     "(losses relative to each layer's output energy)")
        if self.skipped:
            lines.append(f"{len(self.skipped)} parameter(s) with >= 2 dimensions left dense "
                         f"({self.dense_fraction:.1%} of their entries): "
                         + ", ".join(f"{e.path} ({e.why})" for e in self.skipped[:6])
                         + (" ..." if len(self.skipped) > 6 else ""))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: str
    sparsity: float
    nm: tuple[int, int] | None
    scope: str
    damping: float
    dtype: Any
    blocksize: int
    rounds: int
    iterations: int
    step_size: float
    holdout: int
    target: str
    sequential: bool


class _Model(NamedTuple):
    fn: Callable
    params: Any
    batches: Any
    finish: Callable  # new params pytree -> the first value prune returns
    diagnose: Callable | None = None  # batch -> what is wrong with params, when tracing fails


# ------------------------------------------------------------------ public API


@highest_precision
def prune(
    model: Any,
    params: Any = None,
    calib_batches: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    method: str = "iobs",
    pattern: str | tuple[int, int] | None = None,
    scope: str | None = None,
    filter: Callable | str | None = None,  # noqa: A002
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
    shared: str = "skip",
    variables: dict | None = None,
    apply_kwargs: dict | None = None,
    verbose: bool = False,
    progress: bool | None = None,
):
    """Prune the linear maps of a JAX model with calibration data.

    ``pruned_params, report = prune(model, params, calib_batches, sparsity=0.5)`` for a
    Linen module (``params`` = the ``"params"`` collection) or a function
    ``apply_fn(params, batch)``; ``pruned_module, report = prune(module, calib_batches)``
    for an NNX module (a new module; the input is not modified).

    Every ``dot_general`` or convolution of the traced program whose weight operand is a
    parameter leaf (possibly cast, transposed, reshaped or sliced) is a linear map ``W``
    acting on inputs ``X`` (convolutions: patches); see :func:`prune_plan` for what will
    be pruned and why the rest is not. Each map's layer loss ``||W X - W0 X||^2 / N`` is
    minimized over ``W`` at the requested sparsity using ``H = X X^T / N`` damped by
    ``damping * mean(diag H)``. With ``sequential=True`` (default) each map's ``X``
    comes from the model whose earlier maps are already pruned, computed in one pass
    over the model; otherwise all maps use the dense model's activations.

    Methods: ``"magnitude"``; ``"wanda"`` (``|w| * ||x||``, per row); ``"sparsegpt"``
    (blocked, lazy updates, ``blocksize`` columns per block); ``"obc"`` (exact greedy OBS
    per row, ``O(rows * cols^3)``: small layers only); ``"iobs"`` (default: the mask from
    a sequential OBS column sweep over blocks of ``blocksize`` columns, counted over the
    layer (``scope="layer"``) or per row (``"row"``), then the OBS refit on the support
    (``iobs_jax.pruning.layerwise.iobs``); ``rounds > 1`` reaches the support in rounds;
    ``iterations > 1`` repeats the I-OBS step with ``step_size`` and keeps the iterate
    with the lowest loss on the last ``holdout_batches`` batches).

    Targets: ``target="local"`` (default) reconstructs each map's own dense output on
    the inputs it receives; ``target="dense"`` (sequential mode) reconstructs the dense
    model's output, ``||W X - W0 X_d||^2`` with ``X_d`` the dense model's inputs.

    Args:
      model: a ``flax.linen.Module``, a ``flax.nnx.Module``, or a function
        ``apply_fn(params, batch)``.
      params: the parameter pytree (Linen: the ``"params"`` collection; NNX: pass the
        batches here).
      calib_batches: iterable of batches (kept in memory). Flax modules take an array, a
        tuple of positional arguments or a dict of keyword arguments; a function gets
        each batch as its second argument.
      sparsity: fraction of weights removed per map, in ``[0, 1)``; default 0.5.
      pattern: ``None`` (unstructured) or ``"n:m"``: ``n`` kept in every ``m``
        consecutive inputs of each output.
      scope: ``"layer"``, ``"row"`` or ``"global"`` (one threshold across maps).
      filter: which maps to prune: a regular expression searched in the map's name (its
        parameter's path, without a trailing ``/kernel``) or a callable
        ``(name, leaf) -> bool``.
      hessian_dtype: ``jnp.float32`` or ``jnp.float64`` (needs ``jax_enable_x64``).
      sample_mask: ``sample_mask(batch)`` returns a 0/1 array over the batch's leading
        ``(batch, position)`` axes (e.g. ``lambda b: b["attention_mask"]``); masked
        positions are left out of every map's statistics (maps whose input has no
        position axis, a pooler, weigh each example that has any position). A list of
        arrays (one per batch) is accepted too.
      dense_batches: with ``target="dense"``, the dense model's version of each batch.
      shared: a parameter read by several maps (a layer applied twice), or also read
        otherwise (a tied embedding), is skipped (``"skip"``, default) or pruned jointly
        on the sum of its uses' ``H`` (``"joint"``).
      variables: other Linen collections (e.g. ``{"batch_stats": ...}``).
      apply_kwargs: extra keyword arguments of every Flax forward call.
      verbose: print one line per pruned map.
      progress: show a progress bar over the layer groups (default: when stderr is a
        terminal).

    Returns:
      ``(pruned, report)``: parameters with the same structure and dtypes (NNX: a new
      module) and a :class:`PruneReport`.

    Example:
      >>> import flax.linen as nn
      >>> model = nn.Dense(4)
      >>> x = jnp.ones((8, 6))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> pruned, report = prune(model, params, [x], sparsity=0.5)
      >>> float((pruned["kernel"] == 0).mean())
      0.5
    """
    start = time.perf_counter()
    spec = _as_model(model, params, calib_batches, variables, apply_kwargs)
    opts = _check_options(method, sparsity, pattern, scope, damping, hessian_dtype, rounds,
                          iterations, blocksize, holdout_batches, target, sequential,
                          step_size)
    shared = check_choice(shared, "shared", _plan.SHARED)
    batches = _check_batches(spec.batches, opts.holdout)
    masks = _sample_masks(sample_mask, batches)
    _check_holdout(batches, opts.holdout, masks)
    dense = _dense_batches(dense_batches, batches, opts.target)
    job = _Job(spec, batches, dense, masks, opts, filter, shared)
    job.run(verbose, progress)
    report = PruneReport(opts.method, job.reports, job.mask_tree(), time.perf_counter() - start,
                         job.plan.skipped, job.dense_fraction())
    return spec.finish(job.param_tree()), report


def prune_plan(model: Any, params: Any = None, batch: Any = None, *,
               filter: Callable | str | None = None, shared: str = "skip",  # noqa: A002
               variables: dict | None = None, apply_kwargs: dict | None = None
               ) -> _plan.Plan:
    """What :func:`prune` would do with this model, before any work.

    Traces the model on one ``batch`` and lists every parameter leaf with two or more
    dimensions: pruned as which weight matrix (name, kind, ``(outputs, inputs)`` shape,
    number of independent problems, group: maps reading the same input share one), or
    why not (not read, read by something other than a linear map, shared, excluded by
    the filter). ``print(plan)`` shows the table. NNX: ``prune_plan(module, batch)``.

    Example:
      >>> import flax.linen as nn
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((2, 6)))["params"]
      >>> [e.shape for e in prune_plan(model, params, jnp.ones((2, 6))).entries]
      [(4, 6)]
    """
    spec = _as_model(model, params, None if batch is None else [batch], variables,
                     apply_kwargs)
    if spec.batches is None:
        raise ValueError("prune_plan needs one batch the model takes.")
    batches = list(spec.batches) if batch is not None else [spec.batches]  # NNX: (module, batch)
    shared = check_choice(shared, "shared", _plan.SHARED)
    runs = ps.trace_runs(spec.fn, spec.params, batches, spec.diagnose)
    return _make_plan(runs[0], spec.params, filter, shared, require=False)[0]


# ------------------------------------------------------------------ the job


def _make_plan(run: ps.Run, params: Any, filt: Any, shared: str, require: bool = True):
    paths = _plan.leaf_paths(params)
    leaves = jax.tree.leaves(params)
    targets, why = _plan.find_targets(run.analysis, paths, shared)
    chosen = _plan.select(targets, leaves, filt)
    if require and not any(chosen):
        names = ", ".join(t.name for t in targets) or "(none found)"
        raise ValueError(f"filter selected no layer; the prunable layers are: {names}.")
    groups, group_of = _plan.make_groups(run.analysis, targets, chosen)
    entries = _plan.plan_entries(run.prog, paths, targets, chosen, why, group_of)
    selected = [t for t, c in zip(targets, chosen, strict=True) if c]
    return _plan.Plan(entries, selected, groups), targets, chosen


class _RunState(NamedTuple):
    run: ps.Run
    cal: ps.Envs
    val: ps.Envs
    cal_masks: list | None
    val_masks: list | None
    pos: list  # [first node not yet evaluated]


class _Job:
    """One call of :func:`prune`: the plan, the passes and the per-target results."""

    def __init__(self, spec, batches, dense, masks, opts, filt, shared):
        self.opts = opts
        self.leaves, self.treedef = jax.tree.flatten(spec.params)
        self.paths = _plan.leaf_paths(spec.params)
        self.dense_leaves = list(self.leaves)
        self.mask_leaves = [None] * len(self.leaves)
        self.runs = ps.trace_runs(spec.fn, spec.params, batches, spec.diagnose)
        self.plan, targets, chosen = _make_plan(self.runs[0], spec.params, filt, shared)
        shapes = None if masks is None else [m.shape for m in masks]
        ps.set_groups(self.runs, targets, chosen, shapes)
        self.targets = self.plan.targets
        self._validate()
        n_cal = len(batches) - opts.holdout
        self.batches, self.dense, self.masks, self.n_cal = batches, dense, masks, n_cal
        self.reports: list[LayerReport] = []
        self._states: list[_RunState] | None = None

    def _validate(self) -> None:
        o = self.opts
        for t in self.targets:
            rows, cols = t.shape
            if o.nm is not None and cols % o.nm[1]:
                raise ValueError(
                    f"pattern {o.nm[0]}:{o.nm[1]}: layer {t.name} has {cols} inputs, not a "
                    f"multiple of {o.nm[1]}; exclude it with filter=...")
            if o.method == "obc" and cols > 1024:
                warnings.warn(
                    f"obc on layer {t.name} with {cols} inputs: exact greedy OBS costs "
                    f"O(rows * cols^3) = {rows * cols**3:.1e} operations; consider "
                    f"method='iobs' with rounds>1.", stacklevel=4)

    def home(self, t: _plan.Target) -> int:
        """The group at which ``t`` is pruned: that of its first map in the program."""
        run = self.runs[0]
        first = min(t.maps, key=lambda i: run.analysis.maps[i].node)
        return run.group_of[first]

    def groups_of(self, t: _plan.Target) -> list[int]:
        return sorted({self.runs[0].group_of[i] for i in t.maps})

    def run(self, verbose: bool, progress: bool | None) -> None:
        o = self.opts
        per_target = {t.name: o.sparsity for t in self.targets}
        if o.scope == "global" or not o.sequential:
            dense = self._pass(all_groups=True)
            if o.scope == "global":
                per_target = _allocate(self.targets, self.leaves, dense, self.groups_of, o)
        steps: dict[int, list[_plan.Target]] = {}
        for t in self.targets:
            steps.setdefault(self.home(t), []).append(t)
        bar = _progress(len(steps), progress)
        for g in sorted(steps):
            stats = self._pass(group=g, targets=steps[g]) if o.sequential else dense
            for t in steps[g]:
                self._prune_target(t, stats, per_target[t.name], verbose)
            bar.update(1)
        bar.close()

    # -- statistics ------------------------------------------------------------

    def _envs(self) -> list[_RunState]:
        """Per traced program: the carried values of its calibration and held-out batches."""
        if self._states is None:
            self._states = [self._state(run) for run in self.runs]
        return self._states

    def _state(self, run: ps.Run) -> _RunState:
        cross = self.opts.target == "dense"
        cal = [i for i in run.index if i < self.n_cal]
        val = [i for i in run.index if i >= self.n_cal]

        def pick(seq, idx):
            return None if seq is None else [seq[i] for i in idx]

        def envs(idx):
            return ps.Envs(run, pick(self.batches, idx), pick(self.dense, idx) if cross else None)

        return _RunState(run, envs(cal), envs(val), pick(self.masks, cal),
                         pick(self.masks, val), [0])

    def _pass(self, group: int | None = None, targets=(), all_groups: bool = False) -> dict:
        """Statistics ``{"cal": {g: Sums}, "val": {g: Sums}}``: of every group from the
        dense model (``all_groups``), or of ``group`` after the pruned groups before it."""
        out = {"cal": {}, "val": {}}
        for run, cal, val, mcal, mval, pos in self._envs():
            if all_groups:
                gs = list(range(len(run.groups)))
                seg = run.layout.segment(0, max(run.cut(g) for g in gs),
                                         [run.capture(g) for g in gs], 1 << 62)
                leaves, keep = self.dense_leaves, False
            else:
                seg = run.layout.segment(pos[0], run.cut(group), [run.capture(group)],
                                         run.cut(group))
                leaves, keep = self.leaves, True
            for envs, masks, key in ((cal, mcal, "cal"), (val, mval, "val")):
                self._evaluate(envs, seg, masks, leaves, out[key], keep)
            if not all_groups:
                pos[0] = run.cut(group)
                cal.forget(pos[0])
                val.forget(pos[0])
                self._lookahead(run, cal, val, mcal, mval, group, targets, out)
        return out

    def _lookahead(self, run, cal, val, mcal, mval, group, targets, out) -> None:
        """Statistics of the later uses of jointly pruned shared weights (not carried)."""
        later = sorted({run.group_of[i] for t in targets for i in t.maps} - {group})
        if not later:
            return
        seg = run.layout.segment(run.cut(group), max(run.cut(g) for g in later),
                                 [run.capture(g) for g in later], 1 << 62)
        for envs, masks, key in ((cal, mcal, "cal"), (val, mval, "val")):
            self._evaluate(envs, seg, masks, self.leaves, out[key], False)

    def _evaluate(self, envs, seg, masks, leaves, sums, keep) -> None:
        try:
            envs.evaluate(seg, masks, leaves, self.dense_leaves, self.opts.dtype, sums, keep)
        except ps.NonFiniteActivations:
            _check_params(self.dense_leaves, self.paths)  # name a bad weight if there is one
            raise

    # -- pruning -----------------------------------------------------------------

    def _prune_target(self, t: _plan.Target, stats: dict, sparsity: float, verbose: bool):
        o = self.opts
        groups = self.groups_of(t)
        cal, scale = _combine([stats["cal"][g] for g in groups])
        val = None
        if o.holdout:
            val, _ = _combine([stats["val"][g] for g in groups])
        w0, finite = _read_weights(self.dense_leaves[t.leaf], t.pos, o.dtype)
        if not bool(finite):
            raise ValueError(f"params: {self.paths[t.leaf]} contains NaN or inf; the model's "
                             f"weights must be finite before pruning.")
        t0 = time.perf_counter()
        ws, masks, parts = [], [], []
        for b in range(t.problems):
            st = lw.LayerStats(*(None if a is None else a[b] for a in cal))
            vst = None if val is None else lw.LayerStats(*(None if a is None else a[b]
                                                           for a in val))
            w, mask, info = _run_method(o, w0[b], st, sparsity, vst)
            ws.append(w)
            masks.append(mask)
            parts.append((_losses(w0[b], w, mask, st), info))
        w, mask = jnp.stack(ws), jnp.stack(masks)
        jax.block_until_ready(w)  # JAX is asynchronous: time the work, not the dispatch
        seconds = time.perf_counter() - t0
        leaf = self.leaves[t.leaf]
        self.leaves[t.leaf] = _write_weights(leaf, t.pos, w)
        if self.mask_leaves[t.leaf] is None:  # masks live on the host: no compilation
            self.mask_leaves[t.leaf] = np.ones(np.shape(leaf), bool)
        np.put(self.mask_leaves[t.leaf], t.pos, np.asarray(mask))
        self.reports.append(_report(t, parts, scale, seconds))
        if verbose:
            print(f"pruned {t.name} {t.shape}: loss {self.reports[-1].loss:.4e}")

    def param_tree(self):
        return jax.tree.unflatten(self.treedef, self.leaves)

    def mask_tree(self):
        return jax.tree.unflatten(self.treedef, [
            jnp.ones(np.shape(x), bool) if m is None else jnp.asarray(m)
            for x, m in zip(self.leaves, self.mask_leaves, strict=True)])

    def dense_fraction(self) -> float:
        big = {e.path: e for e in self.plan.entries}
        total = sum(int(np.prod(e.leaf_shape)) for e in big.values())
        pruned = sum(t.problems * t.shape[0] * t.shape[1] for t in self.targets)
        return 1.0 - pruned / max(total, 1)


def _combine(sums: list[Sums]):
    """``LayerStats`` arrays (normalized per use, summed over uses) and the loss scale."""
    big = max(s.scale for s in sums)
    factors = [(s.scale / big) ** 2 / max(s.n, 1.0) for s in sums]
    total = [None if getattr(sums[0], k) is None else
             scaled_sum([getattr(s, k) for s in sums], factors) for k in ("h", "cross", "hd")]
    return total, big * big


@functools.partial(jax.jit, static_argnames="dtype")
def _read_weights(leaf, pos, dtype):
    w = _maps.w_matrix(pos, leaf)
    return w.astype(dtype), jnp.all(jnp.isfinite(w))


_write_weights = jax.jit(_maps.write_back)


def _progress(total: int, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning layer groups", unit="group",
                disable=None if progress is None else not progress, leave=False)


def _run_method(o: PruneOptions, w0, st: lw.LayerStats, sparsity: float, val_stats):
    """``(W, mask, info)`` of one problem; ``info`` is the method's own report (dead
    inputs, jitter added to ``H``, I-OBS refit convergence) for :class:`LayerReport`."""
    hd = lw.damp_hessian(st.h, o.damping)
    if o.method == "magnitude":
        return lw.magnitude(w0, hd, sparsity, o.scope, o.nm, return_info=True)
    if o.method == "wanda":
        return lw.wanda(w0, st.h, sparsity, o.scope, o.nm, return_info=True)
    val_loss = None
    if val_stats is not None:
        val_loss = functools.partial(lw.target_loss, w0=w0, stats=val_stats)
    if st.cross is not None:  # dense-model targets: reconstruct W~ = W0 C H^{-1}
        w0 = lw.dense_target(w0, st, hd)
    if o.method == "sparsegpt":
        return lw.sparsegpt(w0, hd, sparsity, o.nm, min(o.blocksize, w0.shape[1]),
                            return_info=True)
    if o.method == "obc":
        return lw.obc(w0, hd, sparsity, return_info=True)
    return lw.iobs(w0, hd, sparsity, o.scope, o.nm, rounds=o.rounds,
                   iterations=o.iterations, step_size=o.step_size, val_loss=val_loss,
                   blocksize=min(o.blocksize, w0.shape[1]), return_info=True)


@jax.jit
def _losses(w0, w, mask, stats):
    # Losses against the target the layer was fitted to (the dense model's outputs with
    # target="dense"); the energy is always that of the dense outputs.
    dense_h = stats.h if stats.hd is None else stats.hd
    return jnp.stack([
        jnp.sum(mask).astype(stats.h.dtype),
        lw.target_loss(jnp.where(mask, w0, 0.0), w0, stats),
        lw.target_loss(w, w0, stats),
        lw.layer_loss(jnp.zeros_like(w0), w0, dense_h),
    ])


def _report(t: _plan.Target, parts, scale: float, seconds: float) -> LayerReport:
    sums = np.sum([np.asarray(p, np.float64) for p, _ in parts], axis=0)
    size = t.problems * t.shape[0] * t.shape[1]
    info = parts[0][1] if len(parts) == 1 else {"per_problem": [i for _, i in parts]}
    if t.note:
        info = {**info, "note": t.note}
    return LayerReport(t.name, t.kind, t.shape, 1.0 - sums[0] / size, sums[1] * scale,
                       sums[2] * scale, sums[3] * scale, seconds, t.problems, info)


def _allocate(targets, leaves, stats, groups_of, o: PruneOptions) -> dict[str, float]:
    """Per-target sparsities from one global threshold on the method's scores."""
    scores = []
    for t in targets:
        h, _ = _combine([stats["cal"][g] for g in groups_of(t)])
        w0 = _maps.w_matrix(t.pos, leaves[t.leaf]).astype(h[0].dtype)
        if o.method == "magnitude":
            s = jnp.abs(w0)
        elif o.method == "wanda":
            s = jnp.abs(w0) * jnp.sqrt(jnp.maximum(jnp.diagonal(h[0], axis1=1, axis2=2),
                                                   0.0))[:, None, :]
        else:  # OBS saliency: the increase of this layer's loss
            g = jax.vmap(lambda a: lw._inverse(lw.damp_hessian(a, o.damping)))(h[0])
            s = w0**2 / jnp.diagonal(g, axis1=1, axis2=2)[:, None, :]
        scores.append(np.asarray(s, np.float64).ravel())
    allsc = np.concatenate(scores)
    k = lw.keep_count(allsc.size, o.sparsity)
    kept = np.asarray(topk_mask(jnp.asarray(allsc), k))  # the one top-k (ties: lower index)
    out, start = {}, 0
    for t, s in zip(targets, scores, strict=True):
        out[t.name] = float(1.0 - kept[start : start + s.size].mean())
        start += s.size
    return out


# ------------------------------------------------------------------ models


def _as_model(model, params, batches, variables, apply_kwargs) -> _Model:
    from flax import linen as nn
    from flax import nnx

    kwargs = dict(apply_kwargs or {})
    if isinstance(model, nnx.Module):
        if batches is not None:
            raise TypeError(
                "prune(module, calib_batches, ...): an NNX module carries its own "
                "parameters; pass the calibration batches as the second argument.")
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)

        def fn(p, batch):
            s = jax.tree.map(lambda v: v, state)  # a copy: never mutate the caller's
            nnx.replace_by_pure_dict(s, p)
            args, kw = _split_batch(batch)
            return nnx.merge(graphdef, s, rest)(*args, **kw, **kwargs)

        def finish(p):
            s = jax.tree.map(lambda v: v, state)
            nnx.replace_by_pure_dict(s, p)
            return nnx.merge(graphdef, s, rest)

        return _Model(fn, nnx.to_pure_dict(state), params, finish)
    if isinstance(model, nn.Module):
        extra = dict(variables or {})

        def fn(p, batch):
            args, kw = _split_batch(batch)
            return model.apply({**extra, "params": p}, *args, **kw, **kwargs)

        def diagnose(batch):
            args, kw = _split_batch(batch)
            init = lambda: model.init(jax.random.key(0), *args, **kw, **kwargs)
            return _params_mismatch(jax.eval_shape(init).get("params", {}), params)

        return _Model(fn, params, batches, lambda p: p, diagnose)
    if hasattr(model, "module") and hasattr(model, "params") and not callable(
            getattr(model, "apply", None)) or _is_hf_model(model):
        raise TypeError(
            f"{type(model).__name__} is a Hugging Face model object; pass "
            f"(lambda p, b: model.module.apply({{'params': p}}, **b), model.params) — a "
            f"function of (params, batch) — with the batches it should see.")
    if callable(model):
        if variables is not None or apply_kwargs is not None:
            raise ValueError("variables= and apply_kwargs= are for Flax modules; a "
                             "function model takes everything through its batch.")
        return _Model(model, params, batches, lambda p: p)
    raise TypeError(f"model must be a flax.linen Module, a flax.nnx Module or a function "
                    f"apply_fn(params, batch); got {type(model).__name__}.")


def _params_mismatch(expected: Any, given: Any) -> str | None:
    """The first difference between the parameters a model makes and those given."""
    want = {p: np.shape(v) for p, v in zip(_plan.leaf_paths(expected),
                                            jax.tree.leaves(expected), strict=True)}
    have = {p: np.shape(v) for p, v in zip(_plan.leaf_paths(given), jax.tree.leaves(given),
                                            strict=True)}
    for path, shape in want.items():
        if path not in have:
            return f"params has no {path!r} (shape {shape}), which the model reads"
        if have[path] != shape:
            return f"params {path!r} has shape {have[path]}; the model expects {shape}"
    extra = [p for p in have if p not in want]
    return f"params has {extra[0]!r}, which the model does not have" if extra else None


def _is_hf_model(model) -> bool:
    return any(c.__name__ == "FlaxPreTrainedModel" for c in type(model).__mro__)


def _split_batch(batch):
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


# ------------------------------------------------------------------ validation


def _check_options(method, sparsity, pattern, scope, damping, dtype, rounds, iterations,
                   blocksize, holdout, target, sequential, step_size=1.0) -> PruneOptions:
    method = check_choice(method, "method", tuple(lw.METHODS))
    nm = None
    if pattern is not None and pattern != "unstructured":
        nm = parse_pattern(pattern)
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts pattern {nm[0]}:{nm[1]} (which removes "
                f"{implied:.3g}); pass only the pattern.")
        if method == "obc":
            raise ValueError("method='obc' prunes unstructured rows; use 'iobs' or "
                             "'sparsegpt' for N:M patterns.")
        sparsity = implied
    if sparsity is None:
        sparsity = 0.5
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
            0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}.")
    if scope is None:
        scope = _METHOD_SCOPE[method] or "layer"
    scope = check_choice(scope, "scope", ("layer", "row", "global"))
    if nm is not None and scope == "global":
        raise ValueError("scope='global' needs an unstructured pattern.")
    if method == "obc" and scope == "layer":
        raise ValueError("method='obc' prunes each row to the same sparsity; use "
                         "scope='row' or 'global'.")
    if isinstance(damping, bool) or not (isinstance(damping, (int, float))
                                         and np.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
    if isinstance(step_size, bool) or not (isinstance(step_size, (int, float))
                                           and np.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0; got {step_size!r}.")
    dtype = _check_dtype(dtype)
    for name, value, low in (("rounds", rounds, 1), ("iterations", iterations, 1),
                             ("blocksize", blocksize, 1), ("holdout_batches", holdout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    target = check_choice(target, "target", ("local", "dense"))
    if target == "dense" and not sequential:
        raise ValueError("target='dense' needs sequential=True (without it every layer "
                         "already sees the dense model's inputs).")
    return PruneOptions(method, float(sparsity), nm, scope, float(damping), dtype, blocksize,
                        rounds, iterations, float(step_size), holdout, target,
                        bool(sequential))


def _check_dtype(dtype):
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"hessian_dtype must be float32 or float64; got {dtype!r}.") from None
    if dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"hessian_dtype must be float32 or float64; got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("hessian_dtype=float64 needs jax.config.update('jax_enable_x64', True).")
    return dtype


def parse_pattern(pattern) -> tuple[int, int]:
    """``"n:m"`` (or ``(n, m)``) as a checked pair of ints with ``0 < n < m``."""
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match:
            raise ValueError(f"pattern must be 'unstructured' or 'n:m' like '2:4'; got "
                             f"{pattern!r}.")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        try:
            n, m = (int(v) for v in pattern)
        except (TypeError, ValueError):
            raise ValueError(f"pattern must be 'unstructured' or 'n:m' like '2:4'; got "
                             f"{pattern!r}.") from None
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
            f"holdout_batches={holdout}.")
    for i, batch in enumerate(batches):
        for leaf in jax.tree.leaves(batch):
            arr = np.asarray(leaf)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError(f"calib_batches[{i}] contains NaN or inf.")
    return batches


def _check_holdout(batches, holdout, masks) -> None:
    """The held-out batches (which pick the best I-OBS iterate) may hold at most half of
    the calibration samples: the statistics come from the rest."""
    if not holdout:
        return

    def samples(i):
        if masks is not None:
            return float(np.sum(masks[i]))
        leaves = [x for x in jax.tree.leaves(batches[i]) if np.ndim(x) >= 1]
        return float(np.shape(leaves[0])[0]) if leaves else 1.0

    counts = [samples(i) for i in range(len(batches))]
    held, total = sum(counts[-holdout:]), sum(counts)
    if held > total / 2:
        raise ValueError(
            f"holdout_batches={holdout}: the last {holdout} batch(es) hold {held:.0f} of the "
            f"{total:.0f} calibration samples, more than half; the statistics would come from "
            f"{total - held:.0f}. Hold out fewer or smaller batches.")


def _dense_batches(dense_batches, batches, target):
    if dense_batches is None:
        return batches
    if target != "dense":
        raise ValueError("dense_batches is only used with target='dense'.")
    dense_batches = list(dense_batches)
    if len(dense_batches) != len(batches):
        raise ValueError(f"dense_batches has {len(dense_batches)} batches; "
                         f"calib_batches has {len(batches)}.")
    return dense_batches


def _check_params(leaves: list, paths: list[str]) -> None:
    """Raise naming the first parameter leaf with NaN or inf (on the error path only)."""
    for path, leaf in zip(paths, leaves, strict=True):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not bool(
                jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"params: {path} contains NaN or inf; the model's weights must "
                             f"be finite before pruning.")
