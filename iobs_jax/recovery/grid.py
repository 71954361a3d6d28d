"""Recovery sweeps: many random instances per grid cell, one compiled program per solver.

:func:`sweep` runs a set of solvers over a grid (measurements ``n`` x sparsity ``k`` x
noise level at a fixed ``d``), ``trials`` instances per cell. Every trial is generated
inside the compiled program from its own key, ``fold_in(cell_key, t)``, so a cell's
instances do not depend on the solver, the number of devices or the chunking, and every
solver sees the same instances. The batch axis is sharded over all visible devices
(``jax.sharding.Mesh`` + ``jax.shard_map``); on each device the trials run as
``lax.map`` over chunks of ``chunk_size`` vmapped instances (a chunk's working set stays
in cache, which on CPU is several times faster than one huge ``vmap``).

One program per solver for the whole grid: ``k``, ``n`` and the noise level are traced
arguments. Instances are drawn with ``rows=n`` padded to the grid's largest ``n`` (zero
rows, which change no least-squares quantity once the losses divide by ``n`` itself: see
:mod:`iobs_jax.problems`), and the named solvers take ``k`` as a traced value bounded by
the grid's largest (``max_k``: sort-based top-k, padded support blocks). OBSPursuit's
primal/dual choice follows the padded shape, so its cells split into shape buckets,
``n < d`` and ``n >= d``, and its padded candidate blocks cost the cube of their size, so
its ``k`` values are grouped so that each program's ``max_k`` is at most twice its
smallest ``k`` (one group for ``k`` in 4..8 or 24..48): the number of programs depends on
the range of ``n`` and ``k``, not on the number of cells. The programs are kept for the
process: calling :func:`sweep` again with the same settings compiles nothing. Results
equal the per-cell programs' (the tests compare them cell by cell) up to float64
round-off.

The result is a tidy table (one row per solver and cell) with the success rate
(relative error ``||x - x*|| / ||x*|| < success_tol``), median relative error, support
recovery (mean fraction of the true support found), iterations and time, written by
:meth:`SweepResult.save` as CSV and JSON. :func:`convergence` records loss and distance
to ``x*`` per step (for curves), :func:`recover_signals` solves given signals (the MNIST
prior). Plots live in :mod:`iobs_jax.recovery.plots`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iobs_jax.core.validation import check_choice, check_int, check_key, check_nonnegative_scalar
from iobs_jax.recovery import problems
from iobs_jax.solvers.base import Status, trajectory
from iobs_jax.solvers.iht import IHT
from iobs_jax.solvers.iobs import IOBS
from iobs_jax.solvers.pursuit import OBSPursuit, _same_count

__all__ = ["SOLVER_NAMES", "PROBLEMS", "make_solver", "mse_hessian", "sweep", "SweepResult",
           "convergence", "recover_signals"]

SOLVER_NAMES = ("iht", "niht", "htp", "topk-iobs", "topk-iobs-plain", "saliency-iobs",
                "obs-pursuit")
PROBLEMS = ("linear", "logistic", "quadratic")
_LOSSES = {"linear": problems.mse_loss, "logistic": problems.logistic_loss,
           "quadratic": problems.quadratic_loss}
# Relative damping of I-OBS when H = 2 A^T A / n is singular (n < d): 5% of mean diag H.
_IOBS_DAMPING = 0.05
# Compiled grid programs of this process, by their static settings (see _GridSpec).
_PROGRAMS: dict = {}


def mse_hessian(x: jax.Array, design: jax.Array, observations: jax.Array, rows: Any = None
                ) -> jax.Array:
    """The constant Hessian ``2 A^T A / n`` of :func:`problems.mse_loss` (one matmul);
    ``rows``: ``n`` when ``A`` is padded with zero rows."""
    return 2.0 * design.T @ design / (design.shape[0] if rows is None else rows)


def make_solver(name: str, k: int, *, n: int, d: int, problem: str = "linear",
                maxiter: int | None = None) -> Any:
    """A solver by name, configured for ``k`` nonzeros on an ``(n, d)`` instance.

    Names (:data:`SOLVER_NAMES`): ``"iht"`` (step ``1/L``), ``"niht"``, ``"htp"``,
    ``"topk-iobs"`` (exact Hessian, OBS correction, damped by 5% of ``mean diag H`` when
    ``n < d``), ``"topk-iobs-plain"`` (no correction), ``"saliency-iobs"`` and
    ``"obs-pursuit"`` (:class:`OBSPursuit`, least squares only). For least squares the
    second-order solvers use the Gram Hessian ``2 A^T A / n`` (one matmul instead of
    ``d`` autodiff HVPs). Example: ``make_solver("htp", 16, n=96, d=256)``.
    """
    check_choice(name, "solver", SOLVER_NAMES)
    check_choice(problem, "problem", PROBLEMS)
    hessian = mse_hessian if problem == "linear" else "exact"
    return _named_solver(name, k, problem, _LOSSES[problem], hessian,
                         _iobs_damping(problem, n, d), maxiter)


def _iobs_damping(problem: str, n: Any, d: int) -> Any:
    """I-OBS damping: 5% of ``mean diag H`` for least squares with ``n < d`` (``n`` may be
    traced); the quadratic problem is indefinite away from ``x*``: keep Cholesky factorable."""
    if problem == "quadratic":
        return 1e-3
    if problem != "linear":
        return 0.0
    if isinstance(n, int):
        return _IOBS_DAMPING * 2.0 / n if n < d else 0.0
    return jnp.where(n < d, _IOBS_DAMPING * 2.0 / n, 0.0)


def _named_solver(name: str, k: Any, problem: str, loss: Callable, hessian: Any, damping: Any,
                  maxiter: int | None, max_k: int | None = None) -> Any:
    """The solver behind a name; ``max_k`` set: ``k`` may be traced (one program per grid)."""
    first = {} if maxiter is None else {"maxiter": maxiter}
    second = {"maxiter": 100 if maxiter is None else maxiter}
    if name == "obs-pursuit":
        if problem != "linear":
            raise ValueError("solver 'obs-pursuit' is for least squares (problem='linear').")
        return OBSPursuit(k, max_k=max_k, **second)
    if name in ("iht", "niht"):
        return IHT(loss, k, variant=name, maxiter=first.get("maxiter", 3000), max_k=max_k)
    if name == "htp":
        return IHT(loss, k, variant="htp", hessian=hessian, max_k=max_k, **second)
    selection = "saliency" if name == "saliency-iobs" else "topk"
    return IOBS(loss, k, selection=selection, correction=name != "topk-iobs-plain",
                hessian=hessian, damping=damping, max_k=max_k, **second)


class SweepResult(NamedTuple):
    """What :func:`sweep` returns.

    Attributes:
      rows: one dict per (solver, n, k, noise) cell, the tidy table.
      trials: per-trial arrays keyed like the rows' ``(method, n, k, noise)``:
        ``rel_error``, ``support_recovery``, ``iterations``, ``status`` (``(trials,)``).
      config: the sweep's settings (for the JSON file).
    """

    rows: list[dict]
    trials: dict
    config: dict

    def save(self, out: str | Path, stem: str = "results") -> tuple[Path, Path]:
        """Write ``<stem>.csv`` and ``<stem>.json`` (rows + config) into folder ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        json_path.write_text(json.dumps({"config": self.config, "rows": self.rows}, indent=2))
        return csv_path, json_path

    def table(self) -> str:
        """The rows as a Markdown table."""
        cols = ["method", "n", "k", "noise", "success_rate", "median_rel_error",
                "support_recovery", "median_iterations", "ms_per_instance"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _ints(values: Any, name: str, low: int) -> tuple[int, ...]:
    values = (values,) if isinstance(values, int | np.integer) else tuple(values)
    if not values:
        raise ValueError(f"{name} must list at least one value.")
    return tuple(check_int(v, name, low=low) for v in values)


def _generator(problem: str, n: int, d: int, k: Any, noise: Any, design: str, rho: float,
               prior: str, dtype: Any, signals: jax.Array | None, rows: Any = None) -> Callable:
    """``(key, t) -> SparseRegression`` for trial ``t`` of a cell (``rows``: padded to ``n``)."""
    if prior == "mnist":
        return lambda key, t: problems.measure_signal(
            key, signals[t % signals.shape[0]], n, noise=noise, design=design, rho=rho,
            rows=rows)
    kw = dict(dtype=dtype, design=design, rho=rho, prior=prior, rows=rows)
    if problem == "logistic":
        return lambda key, t: problems.sparse_logistic_regression(key, n, d, k, **kw)
    gen = (problems.quadratic_measurements if problem == "quadratic"
           else problems.sparse_linear_regression)
    return lambda key, t: gen(key, n, d, k, noise=noise, **kw)


def _trial_metrics(problem: str, solver: Any, k: Any, prob: problems.SparseRegression,
                   extra: tuple = ()) -> dict:
    """Run ``solver`` on one instance (``run(x0, A, y, *extra)``); the per-trial numbers."""
    a, y, x_true = prob.design, prob.observations, prob.x_true
    x0 = (problems.spectral_init(a, y, k) if problem == "quadratic"
          else jnp.zeros(a.shape[1], a.dtype))
    x, state = solver.run(x0, a, y, *extra)
    scale = jnp.maximum(jnp.linalg.norm(x_true), jnp.finfo(a.dtype).tiny)
    err = jnp.linalg.norm(x - x_true)
    if problem == "quadratic":  # identifiable only up to sign
        err = jnp.minimum(err, jnp.linalg.norm(x + x_true))
    found = jnp.sum((x != 0) & prob.support) / jnp.maximum(jnp.sum(prob.support), 1)
    return dict(rel_error=err / scale, support_recovery=found,
                iterations=state.iter_num, status=state.status)


def _batched(fn: Callable, chunk_size: int, devices: Sequence, shared: int = 0
             ) -> tuple[Callable, Any, Any]:
    """``(keys (T,), idx (T,), *shared) -> fn(key, t, *shared) over the trials``, sharded
    over ``devices`` and chunked on each; ``shared`` arguments are replicated. Returns the
    jitted function and the trials' and the shared arguments' shardings."""
    mesh = Mesh(np.asarray(devices), ("batch",))

    def local(keys, idx, *rest):
        return jax.lax.map(lambda a: fn(*a, *rest), (keys, idx), batch_size=chunk_size)

    # check_vma=False: the solvers start their loops from constants (x0 = 0), which the
    # varying-axes type check would otherwise ask to pcast by hand.
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P("batch"), *[P()] * shared),
                           out_specs=P("batch"), check_vma=False)
    return jax.jit(mapped), NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


class _GridSpec(NamedTuple):
    """The static settings of one grid program (its cache key): everything but the cell."""

    name: str
    problem: str
    design: str
    rho: float
    prior: str
    d: int
    n_pad: int
    max_k: int
    dtype: str
    maxiter: int | None
    padded: int
    chunk: int
    devices: tuple


def _mse_given_gram(x, design, observations, rows, gram):
    return problems.mse_loss(x, design, observations, rows)


def _given_gram(x, design, observations, rows, gram):
    return gram


def _solver_for(name: str, k: Any, problem: str, design: jax.Array, rows: Any = None,
                maxiter: int | None = None, max_k: int | None = None) -> tuple[Any, tuple]:
    """The named solver for one ``(n, d)`` instance and the extra arguments of its
    ``run(x0, A, y, *extra)`` (``rows``: ``A`` padded with zero rows, may be traced).

    Least squares has structure that :func:`make_solver`'s generic solvers do not use:

    - HTP runs as ``OBSPursuit(k, candidates=k, step="gradient", monotone=False)``: the
      same iteration (Foucart's unit step ``x + A^T r / L``, ``L`` the mean squared column
      norm = ``1 / mean diag H``; top-k of ``|x~|``; the least-squares fit on that
      support; stop when the support repeats), with the fit on the ``k`` gathered columns
      instead of a restricted Newton step on the ``(d, d)`` Hessian (2-3x faster at
      d = 256; equal to ``IHT(variant="htp")`` up to round-off, same iterations: tested).
    - I-OBS gets the Gram Hessian ``2 A^T A / n`` computed here, once: the per-cell
      solvers recompute it every step (XLA does not hoist a loop-invariant product that is
      larger than its operands).
    """
    n = design.shape[0] if rows is None else rows
    loss, hessian, extra = _LOSSES[problem], "exact", () if rows is None else (rows,)
    if problem == "linear" and name == "htp":
        solver = OBSPursuit(k, candidates=k if max_k is None else _same_count, step="gradient",
                            monotone=False, maxiter=100 if maxiter is None else maxiter,
                            max_k=max_k)
        return solver, extra
    if problem == "linear" and name != "obs-pursuit":
        gram = mse_hessian(None, design, None, rows)
        loss, hessian, extra = _mse_given_gram, _given_gram, (rows, gram)
    solver = _named_solver(name, k, problem, loss, hessian,
                           _iobs_damping(problem, n, design.shape[1]), maxiter, max_k)
    return solver, extra


def _grid_trial(spec: _GridSpec, key, t, rows, k, noise, signals=None) -> dict:
    """One trial of a grid cell: the instance padded to ``spec.n_pad`` rows, solved with
    the traced ``k`` and ``rows``."""
    gen = _generator(spec.problem, spec.n_pad, spec.d, k, noise, spec.design, spec.rho,
                     spec.prior, jnp.dtype(spec.dtype), signals, rows)
    prob = gen(key, t)
    solver, extra = _solver_for(spec.name, k, spec.problem, prob.design, rows, spec.maxiter,
                                spec.max_k)
    return _trial_metrics(spec.problem, solver, k, prob, extra)


def _compile_programs(specs: dict, args: tuple) -> dict:
    """Compile the grid programs of ``specs`` (``spec -> its shared arguments``) that this
    process has not compiled yet; returns ``spec -> compile seconds`` for those.

    Tracing runs one program at a time; XLA compiles them in parallel threads (it
    releases the GIL), one per CPU, since a cold sweep's time is mostly compilation.
    """
    todo = {spec: _batched(functools.partial(_grid_trial, spec), spec.chunk, spec.devices,
                           shared=len(extra))[0].lower(*args, *extra)
            for spec, extra in specs.items() if spec not in _PROGRAMS}

    def timed(lowered):
        t0 = time.perf_counter()
        return lowered.compile(), time.perf_counter() - t0

    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        done = dict(zip(todo, pool.map(timed, todo.values()), strict=True))
    _PROGRAMS.update({spec: compiled for spec, (compiled, _) in done.items()})
    return {spec: seconds for spec, (_, seconds) in done.items()}


def _k_buckets(name: str, ks: Sequence[int]) -> dict[int, int]:
    """``k -> max_k`` of its program: the grid's largest ``k``, or for OBSPursuit groups
    whose largest ``k`` is at most twice their smallest. OBSPursuit's candidate blocks
    are padded to the counts of ``max_k``, and their Cholesky factor, inverse and greedy
    OBS grow with the cube of that: measured at d = 256, n = 128, k = 8, a 1.5k-candidate
    program padded for ``max_k = 48`` took 2.4x the per-cell time, padded for 16 1.0x."""
    if name != "obs-pursuit":
        return {k: max(ks) for k in ks}
    out, rest = {}, sorted(set(ks), reverse=True)
    while rest:
        top = rest[0]
        out.update({k: top for k in rest if 2 * k >= top})
        rest = [k for k in rest if 2 * k < top]
    return out


def _n_buckets(name: str, ns: Sequence[int], d: int) -> dict[int, int]:
    """``n -> padded n``: the grid's largest ``n``, or per side of ``d`` for OBSPursuit
    (its primal or dual form follows the padded shape)."""
    if name != "obs-pursuit":
        return {n: max(ns) for n in ns}
    low, high = [n for n in ns if n < d], [n for n in ns if n >= d]
    return {n: max(low) if n < d else max(high) for n in ns}


def _layout(trials: int, ndev: int, chunk_size: int) -> tuple[int, int]:
    """``(padded trials, chunk)``: equal chunks of at most ``chunk_size`` on every device.

    Padding to whole chunks keeps ``lax.map`` from compiling a second copy of the body
    for a remainder; the chunk is shrunk so that the padding stays below one chunk.
    """
    per_device = math.ceil(trials / ndev)
    num_chunks = math.ceil(per_device / chunk_size)
    chunk = math.ceil(per_device / num_chunks)
    return ndev * num_chunks * chunk, chunk


def _trial_keys(cell_key: jax.Array, padded: int):
    """Keys ``fold_in(cell_key, t)``: trial ``t``'s instance does not depend on padding."""
    idx = jnp.arange(padded, dtype=jnp.uint32)
    return jax.vmap(lambda t: jax.random.fold_in(cell_key, t))(idx), idx.astype(jnp.int32)


def sweep(
    solvers: Sequence[str] | Mapping[str, Callable[[int], Any]],
    *,
    d: int,
    n: int | Sequence[int],
    k: int | Sequence[int],
    trials: int,
    key: jax.Array,
    noise: float | Sequence[float] = 0.0,
    problem: str = "linear",
    design: str = "gaussian",
    rho: float = 0.0,
    prior: str = "gaussian",
    signals: Any = None,
    success_tol: float = 1e-3,
    dtype: Any = None,
    chunk_size: int = 4,
    devices: Sequence | None = None,
    maxiter: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    per_cell: bool = False,
) -> SweepResult:
    """Run ``solvers`` on ``trials`` random instances per cell of the grid ``n x k x noise``.

    Args:
      solvers: names from :data:`SOLVER_NAMES`, or a mapping ``name -> factory`` where
        ``factory(k)`` returns a solver with ``run(x0, A, y)`` (for example
        ``lambda k: IHT(mse_loss, k, variant="htp")``).
      d: number of unknowns (with ``prior="mnist"``: must equal ``signals.shape[1]``).
      n, k, noise: the grid (ints / floats or sequences). Solvers are told ``k`` (for
        synthetic priors it is also ``k*``; with ``prior="mnist"`` ``k*`` is each image's
        number of nonzero pixels and ``k`` only the solvers' sparsity).
      trials: instances per cell. key: the PRNG key; same key, same instances and results.
      problem: ``"linear"``, ``"logistic"`` or ``"quadratic"`` (see :mod:`iobs_jax.problems`).
      design, rho, prior: the generator's options; ``prior="mnist"`` measures the rows of
        ``signals`` (``(N, d)``, e.g. :func:`problems.mnist_signals`), trial ``t`` uses row
        ``t mod N``.
      success_tol: a trial succeeds when ``||x - x*|| / ||x*|| < success_tol``.
      chunk_size: instances vmapped together inside each device's ``lax.map`` (4: a
        vmapped while loop runs until its slowest instance stops, so small chunks waste
        less; on the d = 256 grid 4 was 1.1-1.8x faster than 16).
      devices: devices to shard the trials over (default: all of ``jax.devices()``).
      maxiter: override the named solvers' iteration caps.
      progress: called as ``progress(done, total, label)`` after each solver and cell.
      per_cell: compile one program per cell and solver (each cell's own shapes, a
        static ``k``; what factories always get) instead of one per solver for the grid.
        Same results up to round-off; slower to compile. For checking.

    Returns:
      :class:`SweepResult`. Times are wall times of the compiled batch (compilation
      excluded and reported separately as ``compile_seconds``, on the first cell that
      uses a program: later cells, and later calls with the same settings, reuse it),
      divided by ``trials`` for ``ms_per_instance``.

    Example:
      >>> import jax
      >>> res = sweep(["htp"], d=32, n=[16, 24], k=[2], trials=4, key=jax.random.key(0))
      >>> [(row["n"], row["k"]) for row in res.rows]
      [(16, 2), (24, 2)]
      >>> import tempfile
      >>> csv_path, json_path = res.save(tempfile.mkdtemp())  # results.csv, results.json
    """
    st = _Settings.checked(d=d, n=n, k=k, noise=noise, trials=trials, problem=problem,
                           design=design, rho=rho, prior=prior, signals=signals,
                           success_tol=success_tol, dtype=dtype, chunk_size=chunk_size,
                           maxiter=maxiter)
    key = check_key(key)
    factories = _factories(solvers)
    devices = list(jax.devices() if devices is None else devices)
    # One program per solver needs padded instances equal to the unpadded ones: a draw of
    # n rows must start with the draw of m rows (JAX's default partitionable PRNG).
    grid = (not per_cell and not isinstance(solvers, Mapping)
            and jax.config.jax_threefry_partitionable)
    rows, per_trial = _run_cells(st, factories, key, devices, grid, progress)
    config = dict(d=st.d, n=list(st.ns), k=list(st.ks), noise=list(st.noises), trials=st.trials,
                  problem=problem, design=design, rho=rho, prior=prior,
                  success_tol=success_tol, methods=list(factories), devices=len(devices),
                  chunk_size=st.chunk_size, backend=jax.default_backend(),
                  dtype=st.dtype.name)
    return SweepResult(rows, per_trial, config)


@dataclasses.dataclass(frozen=True, eq=False)
class _Settings:
    """A sweep's checked settings (the grid, the generator, the solvers' shared options)."""

    d: int
    ns: tuple
    ks: tuple
    noises: tuple
    trials: int
    problem: str
    design: str
    rho: float
    prior: str
    signals: Any
    success_tol: float
    dtype: Any
    chunk_size: int
    maxiter: int | None

    @classmethod
    def checked(cls, *, d, n, k, noise, trials, problem, design, rho, prior, signals,
                success_tol, dtype, chunk_size, maxiter) -> _Settings:
        dtype = jnp.dtype(problems._dtype(dtype))  # None: float64 if x64 is on, else float32
        d = check_int(d, "d", low=1)
        ns, ks = _ints(n, "n", 1), _ints(k, "k", 0)
        noises = tuple(float(check_nonnegative_scalar(v, "noise"))
                       for v in (noise if isinstance(noise, Sequence) else (noise,)))
        if not noises:
            raise ValueError("noise must list at least one value.")
        check_choice(problem, "problem", PROBLEMS)
        check_choice(prior, "prior", (*problems.PRIORS, "mnist"))
        if not 0 < success_tol:
            raise ValueError(f"success_tol must be > 0; got {success_tol}.")
        if prior == "mnist":
            if signals is None or problem != "linear":
                raise ValueError("prior='mnist' needs signals=(N, d) images and "
                                 "problem='linear'.")
            signals = jnp.asarray(signals, dtype)
            if signals.ndim != 2 or signals.shape[1] != d:
                raise ValueError(f"signals must be (N, d={d}); got shape {signals.shape}.")
        elif signals is not None:
            raise ValueError(f"signals= is only used with prior='mnist' (got prior={prior!r}).")
        if max(ks) > d:
            raise ValueError(f"k must be <= d={d}; got k={max(ks)}.")
        return cls(d, ns, ks, noises, check_int(trials, "trials", low=1), problem, design,
                   float(rho), prior, signals, success_tol, dtype,
                   check_int(chunk_size, "chunk_size", low=1), maxiter)

    def cells(self) -> list[tuple[int, int, int]]:
        return [(nn, kk, ii) for nn in self.ns for kk in self.ks for ii in range(len(self.noises))]


def _factories(solvers) -> dict:
    """``name -> factory`` (``None`` for a named solver, built by the sweep itself)."""
    if isinstance(solvers, Mapping):
        factories = dict(solvers)
        if not all(callable(f) for f in factories.values()):
            raise TypeError("solvers must map names to factories k -> solver.")
    else:
        names = [solvers] if isinstance(solvers, str) else list(solvers)
        for name in names:
            check_choice(name, "solver", SOLVER_NAMES)
        factories = {name: None for name in names}
    if not factories:
        raise ValueError("solvers must name at least one solver.")
    return factories


def _run_cells(st: _Settings, factories: dict, key, devices: list, grid: bool, progress):
    """Every cell x solver: ``(rows, per_trial)``. With ``grid`` one compiled program per
    solver (and shape bucket) serves all cells, its ``n``, ``k`` and noise traced."""
    padded, chunk = _layout(st.trials, len(devices), st.chunk_size)
    mesh = Mesh(np.asarray(devices), ("batch",))
    split, shared = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    place = lambda *values: tuple(jax.device_put(v, shared) for v in values)
    extra = () if st.signals is None else place(st.signals)
    specs = _grid_specs(st, factories, padded, chunk, devices)
    if grid:  # compiled from shapes only: any cell's arguments stand for all
        example = tuple(jax.device_put(v, split) for v in _trial_keys(key, padded))
        compile_times = _compile_programs(
            {spec: place(np.int32(st.ns[0]), np.int32(st.ks[0]),
                         np.asarray(st.noises[0], st.dtype)) + extra
             for spec in set(specs.values())}, example)
    rows, per_trial, cells = [], {}, st.cells()
    total = len(cells) * len(factories)
    for nn, kk, ii in cells:
        cell_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, nn), kk), ii)
        keys, idx = _trial_keys(cell_key, padded)
        args = (jax.device_put(keys, split), jax.device_put(idx, split))
        for name, factory in factories.items():
            if grid:
                spec = specs[name, nn, kk]
                compiled, compile_s = _PROGRAMS[spec], compile_times.pop(spec, 0.0)
                cell_args = args + place(np.int32(nn), np.int32(kk),
                                         np.asarray(st.noises[ii], st.dtype)) + extra
            else:
                compiled, compile_s = _cell_program(
                    name, factory, st.problem, nn, st.d, kk, st.noises[ii], st.design, st.rho,
                    st.prior, st.dtype, st.signals, st.maxiter, chunk, devices, args)
                cell_args = args
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*cell_args))
            seconds = time.perf_counter() - t0
            out = {f: np.asarray(v)[:st.trials] for f, v in out.items()}
            rows.append(_row(name, nn, st.d, kk, st.noises[ii], out, st.success_tol, seconds,
                             compile_s))
            per_trial[(name, nn, kk, st.noises[ii])] = out
            if progress is not None:
                progress(len(rows), total, f"{name} n={nn} k={kk} noise={st.noises[ii]:g}")
    return rows, per_trial


def _grid_specs(st: _Settings, factories: dict, padded: int, chunk: int, devices: list) -> dict:
    """``(name, n, k) -> _GridSpec``: the compiled program (shape bucket) of each cell."""
    buckets = {name: _n_buckets(name, st.ns, st.d) for name in factories}
    k_buckets = {name: _k_buckets(name, st.ks) for name in factories}
    return {(name, nn, kk): _GridSpec(name, st.problem, st.design, st.rho, st.prior, st.d,
                                      buckets[name][nn], k_buckets[name][kk], st.dtype.name,
                                      st.maxiter, padded, chunk, tuple(devices))
            for name in factories for nn in st.ns for kk in st.ks}


def _cell_program(name, factory, problem, n, d, k, noise, design, rho, prior, dtype, signals,
                  maxiter, chunk, devices, args) -> tuple[Any, float]:
    """The per-cell program (static ``k`` and shapes) and its compile time."""
    gen = _generator(problem, n, d, k, noise, design, rho, prior, dtype, signals)
    solver = (make_solver(name, k, n=n, d=d, problem=problem, maxiter=maxiter)
              if factory is None else factory(k))
    fn = lambda key, t: _trial_metrics(problem, solver, k, gen(key, t))
    run, _, _ = _batched(fn, chunk, devices)
    t0 = time.perf_counter()
    compiled = run.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _row(name, n, d, k, noise, out, success_tol, seconds, compile_s) -> dict:
    err = out["rel_error"]
    return dict(
        method=name, n=n, d=d, k=k, noise=noise, trials=int(err.shape[0]),
        success_rate=float(np.mean(err < success_tol)),
        median_rel_error=float(np.median(err)),
        support_recovery=float(np.mean(out["support_recovery"])),
        mean_iterations=float(np.mean(out["iterations"])),
        median_iterations=float(np.median(out["iterations"])),
        nonfinite=int(np.sum(out["status"] == Status.NONFINITE)),
        seconds=seconds, ms_per_instance=1e3 * seconds / err.shape[0], compile_seconds=compile_s,
    )


def convergence(
    solvers: Mapping[str, Any],
    probs: problems.SparseRegression,
    num_steps: int,
    *,
    loss: Callable = problems.mse_loss,
) -> dict[str, dict[str, np.ndarray]]:
    """Loss and relative distance ``||x_t - x*|| / ||x*||`` per step, for each solver.

    ``probs`` is a batch of instances (leading axis ``T``); each solver runs exactly
    ``num_steps`` updates from ``x0 = 0`` (:func:`iobs_jax.trajectory`, vmapped and
    jitted). Returns ``{name: {"loss": (T, steps + 1), "distance": (T, steps + 1),
    "x": (T, d)}}``: step 0 is ``x0``, ``x`` the last iterate.
    Example: ``convergence({"iht": IHT(mse_loss, 64)}, probs, 750)``.
    """
    num_steps = check_int(num_steps, "num_steps", low=1)
    out = {}
    for name, solver in solvers.items():

        @jax.jit
        def curves(a, y, x_true, solver=solver):
            x0 = jnp.zeros(a.shape[-1], a.dtype)
            xs, states = trajectory(solver, x0, a, y, num_steps=num_steps)
            xs = jnp.concatenate([x0[None], xs])
            values = jnp.concatenate([loss(x0, a, y)[None], states.value])
            dist = jnp.linalg.norm(xs - x_true, axis=-1) / jnp.linalg.norm(x_true)
            return values, dist, xs[-1]

        values, dist, x = jax.vmap(curves)(probs.design, probs.observations, probs.x_true)
        out[name] = {"loss": np.asarray(values), "distance": np.asarray(dist),
                     "x": np.asarray(x)}
    return out


def recover_signals(
    solver: Any, signals: Any, n: int, *, key: jax.Array, noise: float = 0.0,
    chunk_size: int = 4,
) -> dict[str, np.ndarray]:
    """Measure each row of ``signals`` (``(N, d)``) with ``n`` Gaussian measurements and
    solve; returns ``{"x": (N, d), "rel_error": (N,), "iterations": (N,), "status"}``.

    Signal ``i`` is measured with ``fold_in(key, i)`` (one compiled, chunked batch).
    ``solver`` may be a callable ``k_i -> solver`` of the signal's own ``k* = nnz`` when
    the sparsity differs per signal (then one compile per distinct ``k``). Example:
    ``recover_signals(OBSPursuit(300), mnist_signals(images, 20), n=1568, key=key)``.
    """
    signals = jnp.asarray(signals)
    if signals.ndim != 2:
        raise ValueError(f"signals must be (N, d); got shape {signals.shape}.")
    n = check_int(n, "n", low=1)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(signals.shape[0], dtype=jnp.uint32))
    ks = np.asarray(jnp.sum(signals != 0, axis=1))
    groups = ({None: np.arange(signals.shape[0])} if not callable(solver) or hasattr(solver, "run")
              else {int(kk): np.flatnonzero(ks == kk) for kk in np.unique(ks)})
    result = {"x": np.zeros(signals.shape, signals.dtype),
              "rel_error": np.zeros(signals.shape[0]),
              "iterations": np.zeros(signals.shape[0], np.int32),
              "status": np.zeros(signals.shape[0], np.int32)}
    for kk, rows in groups.items():
        s = solver if kk is None else solver(kk)
        x, it, st = _recover_batch(s, keys[rows], signals[rows], n=n, noise=noise,
                                   chunk_size=chunk_size)
        sig = np.asarray(signals[rows])
        result["x"][rows] = np.asarray(x)
        result["rel_error"][rows] = (np.linalg.norm(np.asarray(x) - sig, axis=1)
                                     / np.linalg.norm(sig, axis=1))
        result["iterations"][rows] = np.asarray(it)
        result["status"][rows] = np.asarray(st)
    return result


@functools.partial(jax.jit, static_argnames=("n", "noise", "chunk_size"))
def _recover_batch(solver, keys, signals, *, n, noise, chunk_size):
    def one(args):
        prob = problems.measure_signal(args[0], args[1], n, noise=noise)
        x, state = solver.run(jnp.zeros_like(args[1]), prob.design, prob.observations)
        return x, state.iter_num, state.status

    return jax.lax.map(one, (keys, signals), batch_size=chunk_size)
