"""``iobs-jax sweep`` and ``iobs-jax paper``: recovery sweeps and the paper's figures.

Registered into the ``iobs-jax`` parser by :func:`register`; errors are ``ValueError``
with the option's name, which ``_cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from iobs_jax.cli import common

_SOLVERS = ("iht", "niht", "htp", "topk-iobs", "topk-iobs-plain", "saliency-iobs", "obs-pursuit")
_PRIORS = ("gaussian", "rademacher", "mnist")


def register(sub) -> None:
    """Add the ``sweep`` and ``paper`` subcommands to ``sub`` (argparse subparsers)."""
    _register_sweep(sub)
    _register_paper(sub)


def _register_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", parents=[common.common_parser()],
        help="recovery success of several solvers over an (n, k*) grid",
        description=(
            "Solve --trials random sparse recovery instances y = A x* (+ noise) for every "
            "cell of the grid --n x --k (x --noise) at fixed --d with each solver of "
            "--methods; one compiled program per solver for the whole grid, vmapped and "
            "sharded over all devices. "
            "Writes results.csv and results.json (success rate = relative error < --tol, "
            "median relative error, support recovery, iterations, time) and one "
            "phase-transition heatmap per noise level (phase.png) into --out. The tables are "
            "rewritten after every (n, k) cell, so an interrupted sweep (Ctrl-C) keeps its "
            "finished cells."
        ),
    )
    p.add_argument("--d", type=int, default=256, help="number of unknowns (default 256)")
    p.add_argument("--n", default="64,96,128",
                   help="comma-separated numbers of measurements (default 64,96,128)")
    p.add_argument("--k", default="8,16,24",
                   help="comma-separated sparsities k* (the solvers are told k = k*; with "
                        "--prior mnist only the solvers' k) (default 8,16,24)")
    p.add_argument("--noise", default="0",
                   help="comma-separated noise standard deviations (default 0)")
    p.add_argument("--trials", type=int, default=100, help="instances per cell (default 100)")
    p.add_argument("--methods", default="iht,niht,htp,topk-iobs,obs-pursuit",
                   help=f"comma-separated solvers from {', '.join(_SOLVERS)} "
                        "(default iht,niht,htp,topk-iobs,obs-pursuit)")
    p.add_argument("--design", choices=("gaussian", "correlated", "rademacher"),
                   default="gaussian", help="design matrix: iid N(0, 1/n), Toeplitz-"
                   "correlated columns (--rho) or +-1/sqrt(n) (default gaussian)")
    p.add_argument("--rho", type=float, default=0.0,
                   help="column correlation for --design correlated, in [0, 1) (default 0)")
    p.add_argument("--prior", default="gaussian",
                   help=f"nonzero values: {', '.join(_PRIORS)} (mnist: x* is an MNIST image, "
                        "--d must be its pixel count; see --data) (default gaussian)")
    p.add_argument("--data", default=None,
                   help="directory with MNIST idx files for --prior mnist (default: "
                        "$IOBS_JAX_DATA, else a packaged subset)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="success: ||x - x*|| / ||x*|| below this (default 1e-3)")
    p.add_argument("--maxiter", type=int, default=None,
                   help="iteration cap of every solver (default: the solver's own)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 (default float64, for relative errors of 1e-6)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=sweep_command)


def _register_paper(sub) -> None:
    q = sub.add_parser(
        "paper", parents=[common.common_parser()],
        help="the paper's two synthetic figures (Gaussian and MNIST priors)",
        description=(
            "Reproduce the two synthetic figures of Wu et al. (2024): convergence of k-IHT "
            "and Topk-I-OBS on the Gaussian prior (n=256, d=128, k*=16, k=64) and on the "
            "MNIST prior (n=2d, k=2k*), plus Topk-I-OBS with the true Hessian and step 1. "
            "Writes paper_gaussian.png, paper_mnist.png, paper_mnist_images.png and "
            "paper.json into --out."
        ),
    )
    q.add_argument("--trials", type=int, default=20,
                   help="Gaussian-prior instances (default 20)")
    q.add_argument("--steps", type=int, default=750,
                   help="Gaussian-prior steps per method (default 750)")
    q.add_argument("--images", type=int, default=20, help="MNIST images (default 20)")
    q.add_argument("--mnist-steps", type=int, default=4000,
                   help="MNIST-prior steps per method (default 4000)")
    q.add_argument("--data", default=None,
                   help="directory with the MNIST idx files (default: $IOBS_JAX_DATA, else a "
                        "packaged subset)")
    q.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    q.add_argument("--out", required=True, help="output folder (created if missing)")
    q.add_argument("--quiet", action="store_true",
                   help="print only the summary (no progress bar)")
    q.set_defaults(func=paper_command)


def _int_list(text: str, name: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers; got {text!r}.") from None
    if not values:
        raise ValueError(f"--{name} must list at least one value.")
    bad = [v for v in values if v < low]
    if bad:
        raise ValueError(f"--{name} values must be >= {low}; got {bad[0]}.")
    return values


def _float_list(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers; got {text!r}.") from None
    if not values or any(not v >= 0 for v in values):
        raise ValueError(f"--{name} must list numbers >= 0; got {text!r}.")
    return values


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"--{name} must be >= {low}; got {value}.")


def _images(path: str | None, quiet: bool):
    return common.load_mnist_data(path, quiet).images


def _check_sweep_options(args: argparse.Namespace) -> tuple:
    """``(ns, ks, noises, methods)``; every option checked before any work."""
    _at_least("d", args.d, 1)
    ns = _int_list(args.n, "n", 1)
    ks = _int_list(args.k, "k", 0)
    noises = _float_list(args.noise, "noise")
    _at_least("trials", args.trials, 1)
    _at_least("maxiter", args.maxiter, 0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in _SOLVERS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown solver {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(_SOLVERS)}.")
    if args.prior not in _PRIORS:
        raise ValueError(f"--prior: unknown prior {args.prior!r}; choose from "
                         f"{', '.join(_PRIORS)}.")
    common.finite("rho", args.rho, 0.0, 1.0)
    if not (args.tol > 0 and args.tol < float("inf")):
        raise ValueError(f"--tol must be a finite number > 0; got {args.tol}.")
    if any(not v < float("inf") for v in noises):
        raise ValueError(f"--noise must list finite numbers; got {args.noise!r}.")
    if args.prior != "mnist" and max(ks) > args.d:
        raise ValueError(f"--k: k* = {max(ks)} is larger than --d {args.d}.")
    if args.prior == "mnist" and args.d != 784:
        raise ValueError(f"--d must equal the images' pixel count 784 for --prior mnist; "
                         f"got {args.d}.")
    if not args.no_plots:
        common.require_matplotlib("--no-plots")
    return ns, ks, noises, methods


def _save_rows(result, out: Path) -> tuple[Path, Path]:
    """``results.csv``/``results.json`` replaced atomically (complete tables only)."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".sweep-") as tmp:
        paths = result.save(tmp)
        for p in paths:
            os.replace(p, out / p.name)
    return out / paths[0].name, out / paths[1].name


def _run_cells(args, ns, ks, noises, methods, signals, out: Path):
    """One library sweep per (n, k) cell (every noise level and solver), the tables
    rewritten after each, so that Ctrl-C keeps the finished cells; a tqdm bar over all."""
    import jax

    from iobs_jax.core.progress import progress_bar
    from iobs_jax.recovery.grid import SweepResult, sweep

    rows, trials, config = [], {}, None
    total = len(ns) * len(ks) * len(noises) * len(methods)
    with progress_bar(total, "sweep", enabled=not args.quiet, unit="cell") as bar:
        def tick(done, _total, label):
            bar.set_postfix_str(label, refresh=False)
            bar.update()

        for nn in ns:
            for kk in ks:
                part = sweep(
                    methods, d=args.d, n=[nn], k=[kk], trials=args.trials,
                    key=jax.random.key(args.seed), noise=noises, design=args.design,
                    rho=args.rho, prior=args.prior, signals=signals, success_tol=args.tol,
                    maxiter=args.maxiter, progress=tick,
                    dtype="float32" if args.float32 else "float64")
                rows += part.rows
                trials.update(part.trials)
                config = dict(part.config, n=list(ns), k=list(ks))
                paths = _save_rows(SweepResult(rows, trials, config), out)
    return SweepResult(rows, trials, config), paths


def sweep_command(args: argparse.Namespace) -> dict:
    ns, ks, noises, methods = _check_sweep_options(args)
    out = common.out_dir(args.out)
    import jax

    jax.config.update("jax_enable_x64", not args.float32)
    from iobs_jax.recovery import plots as _plots
    from iobs_jax.recovery import problems

    signals = None
    if args.prior == "mnist":
        images = _images(args.data, args.quiet)
        signals = problems.mnist_signals(images, min(args.trials, len(images)))
    result, (csv_path, json_path) = _run_cells(args, ns, ks, noises, methods, signals, out)
    figures = []
    if not args.no_plots:
        for noise in noises:
            name = "phase.png" if len(noises) == 1 else f"phase_noise{noise:g}.png"
            figures.append(str(_plots.plot_phase_transition(result.rows, out / name,
                                                            noise=noise)))
    if not args.quiet:
        print(result.table())
    overall = {m: sum(r["success_rate"] for r in result.rows if r["method"] == m)
               / sum(1 for r in result.rows if r["method"] == m) for m in methods}
    print("overall success: " + ", ".join(f"{m} {100 * v:.1f}%" for m, v in overall.items())
          + f"; wrote {csv_path}, {json_path}" + (f" and {len(figures)} figure(s)"
                                                   if figures else ""))
    return {"overall": overall, "csv": str(csv_path), "json": str(json_path),
            "figures": figures}


def paper_command(args: argparse.Namespace) -> dict:
    for name in ("trials", "steps", "images", "mnist_steps"):
        _at_least(name.replace("_", "-"), getattr(args, name), 1)
    common.require_matplotlib("(no way to skip the paper's figures)")
    out = common.out_dir(args.out)
    images = _images(args.data, args.quiet)
    if args.images > len(images):
        raise ValueError(f"--images must be <= the {len(images)} images available.")
    import jax

    jax.config.update("jax_enable_x64", True)
    from iobs_jax.core.progress import progress_bar
    from iobs_jax.recovery.paper import paper_gaussian, paper_mnist

    key = jax.random.key(args.seed)
    result: dict = {"seconds": {}}
    with progress_bar(2, "paper", enabled=not args.quiet, unit="part") as bar:
        bar.set_postfix_str("Gaussian prior")
        t0 = time.perf_counter()
        result["gaussian"] = paper_gaussian(out, key=jax.random.fold_in(key, 0),
                                            trials=args.trials, steps=args.steps)
        result["seconds"]["gaussian"] = time.perf_counter() - t0
        # Written now: an interrupted MNIST part keeps the Gaussian results.
        common.write_text(out / "paper.json", json.dumps(result, indent=2))
        bar.update()
        bar.set_postfix_str("MNIST prior")
        t1 = time.perf_counter()
        result["mnist"] = paper_mnist(out, images, key=jax.random.fold_in(key, 1),
                                      count=args.images, steps=args.mnist_steps)
        result["seconds"]["mnist"] = time.perf_counter() - t1
        common.write_text(out / "paper.json", json.dumps(result, indent=2))
        bar.update()
    gaussian, mnist_summary = result["gaussian"], result["mnist"]
    for prior, summary in (("Gaussian", gaussian), ("MNIST", mnist_summary)):
        for method, s in summary.items():
            if method != "recovery":
                print(f"{prior:8s} {method:32s} final ||x - x*||/||x*||: median "
                      f"{s['final_distance_median']:.1e}, max {s['final_distance_max']:.1e} "
                      f"after {s['steps']} steps")
    worst = {m: max(v) for m, v in mnist_summary["recovery"].items()}
    print("MNIST worst relative error over the images: "
          + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()) + f"; figures in {out}")
    return result
