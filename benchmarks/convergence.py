"""Iterations and wall time to tolerance: IHT family against I-OBS, side by side.

Settings (float64, noiseless, mean-squared loss, A_ij ~ N(0, 1/n), x* with k* N(0, 1)
nonzeros on a uniform support):

- ``paper``: the paper's setting, n = 256, d = 128, k* = 16, training sparsity k = 64.
  With the exact Hessian and n > d one I-OBS step lands on the least-squares point.
- ``cs``: compressed sensing, n = 100, d = 256, k = k* = 12. The Hessian is singular, so
  the I-OBS solvers are damped (damping 1e-3, 5% of mean diag H); a harder test of the
  support search.

For each method and seed the benchmark runs the solver's own ``update`` in a jitted
``lax.while_loop`` until ``||x_t - x*|| / ||x*|| < tol`` (default 1e-6) or a step cap,
so the wall time is time to tolerance, set-up included (power iteration for IHT's 1/L,
the first gradient). Every method is compiled first, then the seeds are timed one
instance at a time. Times are reported as medians and as ratios to k-IHT measured in
the same run; absolute times depend on the machine.

    OPENBLAS_NUM_THREADS=1 python benchmarks/convergence.py [--seeds 20] [--tol 1e-6]
        [--settings paper,cs] [--out benchmarks/results/convergence.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK threads thrash on 2 cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from iobs_jax.problems import mse_loss, sparse_linear_regression  # noqa: E402

import iobs_jax as ij  # noqa: E402

jax.config.update("jax_enable_x64", True)  # relative error 1e-6 is a float64 target

SETTINGS = {
    "paper": dict(n=256, d=128, k_star=16, k=64, damping=0.0),
    "cs": dict(n=100, d=256, k_star=12, k=12, damping=1e-3),
}
FIRST_ORDER_CAP = 5000
SECOND_ORDER_CAP = 100


def methods(k: int, damping: float) -> dict[str, tuple[object, int]]:
    """Name -> (solver, step cap). Tolerances are the benchmark's, not the solver's."""
    iobs = lambda **kw: ij.IOBS(mse_loss, k, damping=damping, **kw)
    return {
        "k-IHT (1/L)": (ij.IHT(mse_loss, k), FIRST_ORDER_CAP),
        "NIHT": (ij.IHT(mse_loss, k, variant="niht"), FIRST_ORDER_CAP),
        "HTP": (ij.IHT(mse_loss, k, variant="htp"), SECOND_ORDER_CAP),
        "Topk-I-OBS plain": (iobs(correction=False), SECOND_ORDER_CAP),
        "Topk-I-OBS": (iobs(), SECOND_ORDER_CAP),
        "Topk-I-OBS (CG on HVPs)": (iobs(hessian="cg", cg_tol=1e-12), SECOND_ORDER_CAP),
        "saliency I-OBS": (iobs(selection="saliency"), SECOND_ORDER_CAP),
        "greedy I-OBS": (iobs(selection="greedy"), SECOND_ORDER_CAP),
    }


def make_solve_to_tol(solver, cap: int, tol: float):
    """A jitted ``(x0, A, y, x*) -> (x, iterations, reached, status)``."""

    def solve(x0, a, y, x_true):
        scale = jnp.linalg.norm(x_true)
        state = solver.init_state(x0, a, y)

        def cond(carry):
            x, state = carry
            err = jnp.linalg.norm(x - x_true) / scale
            return (err >= tol) & (state.iter_num < cap) & (state.status != ij.Status.NONFINITE)

        def body(carry):
            return solver.update(*carry, a, y)

        x, state = jax.lax.while_loop(cond, body, (x0, state))
        reached = jnp.linalg.norm(x - x_true) / scale < tol
        return x, state.iter_num, reached, state.status

    return jax.jit(solve)


def bench_setting(name: str, cfg: dict, seeds: int, tol: float) -> list[dict]:
    n, d = cfg["n"], cfg["d"]
    probs = [sparse_linear_regression(jax.random.key(s), n, d, cfg["k_star"]) for s in range(seeds)]
    x0 = jnp.zeros(d)
    rows = []
    for method, (solver, cap) in methods(cfg["k"], cfg["damping"]).items():
        solve = make_solve_to_tol(solver, cap, tol)
        p = probs[0]
        t0 = time.perf_counter()
        jax.block_until_ready(solve(x0, p.design, p.observations, p.x_true))
        compile_s = time.perf_counter() - t0
        iters, times, reached = [], [], []
        for p in probs:
            t0 = time.perf_counter()
            out = jax.block_until_ready(solve(x0, p.design, p.observations, p.x_true))
            times.append(time.perf_counter() - t0)
            iters.append(int(out[1]))
            reached.append(bool(out[2]))
        iters, times, reached = np.array(iters), np.array(times), np.array(reached)
        ok = iters[reached]
        rows.append(dict(
            setting=name, method=method, cap=cap, seeds=seeds,
            reached=int(reached.sum()),
            iterations_median=float(np.median(ok)) if ok.size else None,
            iterations_min=int(ok.min()) if ok.size else None,
            iterations_max=int(ok.max()) if ok.size else None,
            seconds_median=float(np.median(times)),
            seconds_per_iteration=float(np.sum(times) / max(int(np.sum(iters)), 1)),
            compile_seconds=compile_s,
        ))
        print(f"  {name:6s} {method:26s} done", flush=True)
    base = next(r for r in rows if r["method"] == "k-IHT (1/L)")
    for r in rows:
        r["time_vs_iht"] = r["seconds_median"] / base["seconds_median"]
        r["iterations_vs_iht"] = (
            base["iterations_median"] / r["iterations_median"]
            if r["iterations_median"] and base["iterations_median"] else None
        )
    return rows


def format_table(rows: list[dict], tol: float) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        cfg = SETTINGS[setting]
        seeds = rows[0]["seeds"]
        out.append(
            f"\n{setting}: n={cfg['n']} d={cfg['d']} k*={cfg['k_star']} k={cfg['k']} "
            f"damping={cfg['damping']:g}, {seeds} seeds, tolerance {tol:g}\n"
        )
        out.append("| method | reached | iterations median [min-max] | time median (ms) "
                   "| time / k-IHT's | k-IHT's iterations / method's |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            if r["setting"] != setting:
                continue
            if r["iterations_median"] is None:
                its = f"none within {r['cap']}"
            else:
                its = f"{r['iterations_median']:g} [{r['iterations_min']}-{r['iterations_max']}]"
            speed = f"{r['iterations_vs_iht']:.0f}x" if r["iterations_vs_iht"] else "-"
            out.append(
                f"| {r['method']} | {r['reached']}/{r['seeds']} | {its} | "
                f"{1e3 * r['seconds_median']:.2f} | {r['time_vs_iht']:.3f} | {speed} |"
            )
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="instances per setting (20)")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative error target (1e-6)")
    parser.add_argument("--settings", default="paper,cs",
                        help=f"comma-separated, from {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                              "convergence.json"), help="JSON output path")
    parser.add_argument("--docs", default=str(Path(__file__).parents[1] / "docs" /
                                               "convergence.md"),
                        help="the docs page written from this run ('' for none)")
    opts = parser.parse_args()
    settings = [s.strip() for s in opts.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or opts.seeds < 1 or not 0 < opts.tol < 1:
        parser.error(f"--settings must be from {list(SETTINGS)}, --seeds >= 1, 0 < --tol < 1")

    rows = []
    for s in settings:
        rows += bench_setting(s, SETTINGS[s], opts.seeds, opts.tol)
    table = format_table(rows, opts.tol)
    print(table)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(jax=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0]), machine=platform.machine(),
                cpus=os.cpu_count(), tol=opts.tol, settings={s: SETTINGS[s] for s in settings})
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"\nwrote {out}")
    if opts.docs:
        Path(opts.docs).write_text(docs_page(table, meta, opts))
        print(f"wrote {opts.docs}")


def docs_page(table: str, meta: dict, opts) -> str:
    """The docs page of this run: settings, machine and the tables (no hand edits)."""
    command = "OPENBLAS_NUM_THREADS=1 python benchmarks/convergence.py"
    if opts.settings != "paper,cs" or opts.seeds != 20 or opts.tol != 1e-6:
        command += f" --settings {opts.settings} --seeds {opts.seeds} --tol {opts.tol:g}"
    return f"""# Convergence benchmark: iterations and time to tolerance

Written by `benchmarks/convergence.py` (do not edit by hand); rerun it to refresh:

```bash
{command}
```

Float64, noiseless least squares, `A_ij ~ N(0, 1/n)`, `x*` with `k*` Gaussian nonzeros.
Each method runs its own jitted `update` in a `lax.while_loop` until
`||x - x*|| / ||x*|| < {opts.tol:g}` or its cap (5,000 steps for first-order methods, 100
for second-order ones), one instance at a time after compilation; "time" is wall time to
tolerance including the set-up (power iteration, first gradient). Iteration medians are
over the seeds that reached the tolerance. Ratios are to k-IHT in the same run; absolute
times move by up to about 50% between runs on a shared machine.

Machine: {meta['cpus']} CPUs ({meta['machine']}), JAX {meta['jax']} on {meta['backend']},
`OPENBLAS_NUM_THREADS=1`.
{table}
"""


if __name__ == "__main__":
    main()
