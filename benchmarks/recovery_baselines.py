"""Sparse recovery: our batched solvers against scikit-learn, skglm and abess, side by side.

Every method sees the same instances: d = 256, n in {64, 96, 128, 192}, k* in
{8, 16, 24, 32, 48}, ``--trials`` noiseless instances per cell (A_ij ~ N(0, 1/n), x* with
k* N(0, 1) nonzeros), built by :func:`iobs_jax.sweep.sweep`'s own key scheme (trial t of
a cell is ``fold_in(cell_key, t)``). Success: ``||x - x*|| / ||x*|| < 1e-3``.

- ours (told k*), batched: HTP, NIHT, Topk-I-OBS (damped when n < d) and OBSPursuit
  (default schedule: Newton step with 1.5 k* candidates, restart with the gradient step
  and 1.25 k* when the first attempt does not fit y). Success comes from
  :func:`iobs_jax.sweep.sweep`; time per instance is a warm (compiled, run once before)
  pass of the sweep's batch (chunks of its default ``chunk_size`` vmapped instances, the
  solvers as the sweep builds them: for least squares the Gram Hessian computed once per
  instance) over the pre-generated instances that the baselines get, one program per
  cell (static ``k``), divided by ``--trials``. The sweep's own time (one program for the
  grid, traced ``k``, instances generated inside) is reported beside it.
- baselines, one instance at a time (their own compiled loops):
  scikit-learn OrthogonalMatchingPursuit (told k*, no intercept); Lasso (alpha =
  1e-3 alpha_max, no intercept) + least-squares debias on its k* largest coefficients;
  skglm MCPRegression path (30 alphas from alpha_max down to 1e-3 alpha_max, warm
  started, gamma 3, not told k*), each path point debiased by least squares on its
  support, stopping at the first point that fits y (relative residual < 1e-6);
  abess best subset (told k*, no intercept, y scaled by 1e4: abess accepts a swap only
  when the loss drops by a fixed absolute amount).
- throughput: our batched HTP / OBSPursuit (instances/s over the whole grid) against a
  per-instance NumPy loop of the same HTP, and achieved GFLOP/s of HTP and OBSPursuit (an
  analytic count of their matrix work) against the machine's matmul peak in the same
  precision (``--dtype``: float64 by default, as the baselines; float32 is what a sweep
  runs in JAX's default precision: the timed solves get the float64 instances rounded,
  while the sweep's success comes from its own float32 draws of the same keys) (a
  jitted 1024 x 1024 product, which XLA spreads over all cores; the solvers run on one)
  measured in the same run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/recovery_baselines.py [--trials 100]
        [--methods htp,obs-pursuit]
        [--n 64,96,128,192] [--k 8,16,24,32,48] [--out benchmarks/results/recovery.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK threads thrash on 2 cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from iobs_jax.problems import sparse_linear_regression  # noqa: E402

from iobs_jax import sweep as sw  # noqa: E402
from iobs_jax.recovery.grid import _layout, _solver_for  # noqa: E402

jax.config.update("jax_enable_x64", True)

D, TOL = 256, 1e-3
OURS = ("htp", "niht", "topk-iobs", "obs-pursuit")
CHUNK = inspect.signature(sw.sweep).parameters["chunk_size"].default  # the sweep's


def instances(key, n, k, trials):
    """The sweep's instances of cell (n, k): ``(A, y, x*)`` stacked over trials."""
    cell = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, n), k), 0)
    keys = jax.vmap(lambda t: jax.random.fold_in(cell, t))(jnp.arange(trials, dtype=jnp.uint32))
    probs = jax.jit(jax.vmap(lambda kk: sparse_linear_regression(kk, n, D, k)))(keys)
    return probs.design, probs.observations, probs.x_true


def solve_time(name, n, k, design, observations):
    """Seconds per instance of a warm batched solve (the sweep's chunked vmap, no generation)."""
    trials = design.shape[0]
    padded, chunk = _layout(trials, 1, CHUNK)  # the sweep's chunks on one device
    pad = padded - trials
    a = jnp.concatenate([design, design[:pad]]).reshape(-1, chunk, n, D)
    y = jnp.concatenate([observations, observations[:pad]]).reshape(-1, chunk, n)

    def one(ai, yi):
        solver, extra = _solver_for(name, k, "linear", ai)
        return solver.run(jnp.zeros(D, ai.dtype), ai, yi, *extra)[0]

    run = jax.jit(lambda a, y: jax.lax.map(lambda ay: jax.vmap(one)(*ay), (a, y)))
    run(a, y).block_until_ready()  # compile and warm up: not timed (as for the baselines)
    t0 = time.perf_counter()
    run(a, y).block_until_ready()
    return (time.perf_counter() - t0) / trials


def _lstsq_on(a, y, support):
    x = np.zeros(a.shape[1])
    if support.size:
        x[support] = np.linalg.lstsq(a[:, support], y, rcond=None)[0]
    return x


def omp(a, y, k):
    from sklearn.linear_model import OrthogonalMatchingPursuit

    return OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(a, y).coef_


def lasso_debiased(a, y, k):
    from sklearn.linear_model import Lasso

    alpha = 1e-3 * np.max(np.abs(a.T @ y)) / a.shape[0]
    coef = Lasso(alpha=alpha, fit_intercept=False, max_iter=20000, tol=1e-8).fit(a, y).coef_
    support = np.argsort(-np.abs(coef))[:k]
    return _lstsq_on(a, y, support[coef[support] != 0])


def mcp_path_debiased(a, y, k):
    from skglm import MCPRegression

    n = a.shape[0]
    alpha_max = np.max(np.abs(a.T @ y)) / n
    model = MCPRegression(alpha=alpha_max, gamma=3.0, fit_intercept=False, warm_start=True,
                          tol=1e-8)
    best = np.zeros(a.shape[1])
    for alpha in alpha_max * np.geomspace(1, 1e-3, 30):
        model.alpha = alpha
        coef = model.fit(a, y).coef_
        support = np.flatnonzero(coef)
        if support.size == 0 or support.size >= n:
            continue
        best = _lstsq_on(a, y, support)
        if np.linalg.norm(a @ best - y) < 1e-6 * np.linalg.norm(y):
            break
    return best


def abess_best_subset(a, y, k):
    from abess import LinearRegression

    scale = 1e4
    model = LinearRegression(support_size=[k], fit_intercept=False)
    return model.fit(a, y * scale).coef_ / scale


BASELINES = {"sklearn OMP": omp, "Lasso + debias": lasso_debiased,
             "skglm MCP path + debias": mcp_path_debiased, "abess": abess_best_subset}


def numpy_htp(a, y, k, maxiter=100):
    """HTP, one instance, NumPy: the per-instance loop the batched solver is timed against."""
    step = 1.0 / np.mean(np.sum(a * a, axis=0))  # Foucart's unit step, as IHT(variant="htp")
    x = np.zeros(a.shape[1])
    support = np.array([], int)
    for _ in range(maxiter):
        v = x + step * (a.T @ (y - a @ x))
        new = np.sort(np.argpartition(-np.abs(v), k)[:k])
        if np.array_equal(new, support):
            break
        support = new
        x = _lstsq_on(a, y, support)
    return x


def matmul_peak(size=1024, repeats=5, dtype="float64") -> float:
    """GFLOP/s of a jitted size x size matmul in ``dtype`` on this machine, now."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def pursuit_flops(n, k, iterations) -> float:
    """Matrix work of one OBSPursuit solve (multiply-adds x 2), from its algorithm (every
    iteration counted as a Newton one with 1.5 k candidates: an upper bound for restarts)."""
    m = min(n, D)
    c = min(k + k // 2, n)
    setup = 2 * n * D * m + m**3 / 3  # Gram, Cholesky
    per_iter = (2 * m * m + 2 * n * D + 2 * n * c * c + c**3 / 3 + 2 * c**3
                + 2 * (c - k) * c * c + 4 * n * D)  # step, candidate Gram, solve, greedy, f/grad
    return setup + iterations * per_iter


def htp_flops(n, k, iterations) -> float:
    """Matrix work of one HTP solve as the sweep runs it: the Gram Hessian once, then per
    iteration the gradient and the loss (two passes over A each) and the (k, k) refit."""
    per_iter = 8 * n * D + k**3 / 3 + 4 * k * k
    return 2 * n * D * D + iterations * per_iter


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="instances per cell (100)")
    parser.add_argument("--n", default="64,96,128,192", help="measurement counts")
    parser.add_argument("--k", default="8,16,24,32,48", help="sparsities k*")
    parser.add_argument("--methods", default=",".join(OURS),
                        help=f"our solvers to run (default {','.join(OURS)})")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="baselines to run (default all; '' for none: ours and the "
                             "NumPy HTP loop only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="precision of our solvers (default float64, as the baselines)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                              "recovery_baselines.json"))
    opts = parser.parse_args()
    ns = [int(v) for v in opts.n.split(",")]
    ks = [int(v) for v in opts.k.split(",")]
    ours_run = [m for m in opts.methods.split(",") if m]
    if not ours_run or any(m not in OURS for m in ours_run):
        parser.error(f"--methods must list some of {', '.join(OURS)}; got {opts.methods!r}")
    base_run = {m: BASELINES[m] for m in opts.baselines.split(",") if m}
    if any(m not in BASELINES for m in base_run):
        parser.error(f"--baselines must list some of {', '.join(BASELINES)}")
    key = jax.random.key(opts.seed)
    peak_before = matmul_peak(dtype=opts.dtype)

    print(f"ours: {', '.join(ours_run)} (batched sweep) ...", flush=True)
    ours = sw.sweep(ours_run, d=D, n=ns, k=ks, trials=opts.trials, key=key, dtype=opts.dtype)
    rows = [dict(method=r["method"], n=r["n"], k=r["k"], success=r["success_rate"],
                 sweep_ms_per_instance=r["ms_per_instance"],
                 mean_iterations=r["mean_iterations"]) for r in ours.rows]
    loop_times = []
    warm = [np.asarray(v[0]) for v in instances(key, ns[0], ks[0], 1)]
    with warnings.catch_warnings():  # first calls compile (numba) or import: not timed
        warnings.simplefilter("ignore")
        for fn in base_run.values():
            fn(warm[0], warm[1], ks[0])
    for n in ns:
        for k in ks:
            stacked = instances(key, n, k, opts.trials)
            for row in rows:
                if row["method"] in OURS and (row["n"], row["k"]) == (n, k):
                    row["ms_per_instance"] = 1e3 * solve_time(
                        row["method"], n, k, *(v.astype(opts.dtype) for v in stacked[:2]))
            probs = list(zip(*(np.asarray(v) for v in stacked), strict=True))
            for name, fn in base_run.items():
                t0, ok = time.perf_counter(), 0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for a, y, x_true in probs:
                        x = fn(a, y, k)
                        ok += np.linalg.norm(x - x_true) < TOL * np.linalg.norm(x_true)
                dt = time.perf_counter() - t0
                rows.append(dict(method=name, n=n, k=k, success=ok / len(probs),
                                 ms_per_instance=1e3 * dt / len(probs)))
            t0 = time.perf_counter()
            ok = sum(np.linalg.norm(numpy_htp(a, y, k) - xt) < TOL * np.linalg.norm(xt)
                     for a, y, xt in probs)
            loop_times.append((time.perf_counter() - t0) / len(probs))
            rows.append(dict(method="HTP, NumPy loop", n=n, k=k, success=ok / len(probs),
                             ms_per_instance=1e3 * loop_times[-1]))
            print(f"  n={n} k*={k} done", flush=True)
    peak = max(peak_before, matmul_peak(dtype=opts.dtype))

    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        summary[m] = dict(overall=float(np.mean([r["success"] for r in rs])),
                          ms_per_instance=float(np.mean([r["ms_per_instance"] for r in rs])),
                          instances_per_s=float(1e3 / np.mean([r["ms_per_instance"]
                                                               for r in rs])))
        if m in OURS:
            summary[m]["sweep_ms_per_instance"] = float(np.mean([r["sweep_ms_per_instance"]
                                                                 for r in rs]))
    baselines = list(base_run) or ["HTP, NumPy loop"]
    best_base = max(baselines, key=lambda m: summary[m]["overall"])
    success = {(r["method"], r["n"], r["k"]): r["success"] for r in rows}
    cell_gap = {m: float(max(max(success[b, n, k] for b in baselines) - success[m, n, k]
                             for n in ns for k in ks)) for m in ours_run}
    gflops = {}
    for m, count in (("obs-pursuit", pursuit_flops), ("htp", htp_flops)):
        pr = [r for r in rows if r["method"] == m]
        flops = sum(count(r["n"], r["k"], r["mean_iterations"]) for r in pr)
        seconds = sum(r["ms_per_instance"] for r in pr) / 1e3
        gflops[m] = flops / seconds / 1e9 if pr else float("nan")

    print("\n| method | overall success | worst cell vs best baseline there | ms per "
          "instance | instances/s | sweep ms (with generation) |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        s = summary[m]
        gap = f"{-100 * cell_gap[m]:+.0f} pts" if m in cell_gap else "-"
        sweep_ms = f"{s['sweep_ms_per_instance']:.2f}" if m in OURS else "-"
        print(f"| {m} | {100 * s['overall']:.1f}% | {gap} | {s['ms_per_instance']:.2f} | "
              f"{s['instances_per_s']:.0f} | {sweep_ms} |")
    print("\nper cell (success %):")
    header = "method".ljust(26) + " ".join(f"{n}/{k}".rjust(7) for n in ns for k in ks)
    print(header)
    for m in methods:
        vals = [success[m, n, k] for n in ns for k in ks]
        print(m[:26].ljust(26) + " ".join(f"{100 * v:7.0f}" for v in vals))
    print(f"\nbest baseline: {best_base} ({100 * summary[best_base]['overall']:.1f}%)")
    if "htp" in summary:
        htp_batched = summary["htp"]["instances_per_s"]
        htp_loop = summary["HTP, NumPy loop"]["instances_per_s"]
        print(f"HTP batched {htp_batched:.0f} instances/s vs NumPy loop {htp_loop:.0f} "
              f"({htp_batched / htp_loop:.1f}x)")
    for m, g in gflops.items():
        if m in summary:
            print(f"{m}: {summary[m]['instances_per_s']:.0f} instances/s, {g:.2f} GFLOP/s "
                  f"achieved vs {opts.dtype} matmul peak {peak:.1f} GFLOP/s "
                  f"({100 * g / peak:.1f}%)")
    best_ours = max(ours_run, key=lambda m: summary[m]["overall"])
    fastest_base = max(baselines, key=lambda m: summary[m]["instances_per_s"])
    bars = {
        f"overall: {best_ours} {100 * summary[best_ours]['overall']:.2f}% >= {best_base} "
        f"{100 * summary[best_base]['overall']:.2f}%":
            summary[best_ours]["overall"] >= summary[best_base]["overall"],
        f"worst cell of {best_ours}: {-100 * cell_gap[best_ours]:+.0f} pts >= -10 pts":
            cell_gap[best_ours] <= 0.10,
        f"throughput: {best_ours} {summary[best_ours]['instances_per_s']:.0f}/s > "
        f"{fastest_base} {summary[fastest_base]['instances_per_s']:.0f}/s":
            summary[best_ours]["instances_per_s"] > summary[fastest_base]["instances_per_s"],
    }
    for text, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(dtype=opts.dtype, jax=jax.__version__, backend=jax.default_backend(),
                machine=platform.machine(), cpus=os.cpu_count(), d=D, n=ns, k=ks,
                trials=opts.trials, tol=TOL, seed=opts.seed)
    out.write_text(json.dumps(dict(meta=meta, rows=rows, summary=summary,
                                   worst_cell_gap=cell_gap, best_baseline=best_base,
                                   gflops=gflops, matmul_peak_gflops=peak, chunk_size=CHUNK,
                                   bars={t: bool(v) for t, v in bars.items()}), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
