"""Sweep compile cost: cold and warm times of one sweep, in one process and from the CLI.

The grid of issue 17 (``iobs-jax sweep --d 64 --n 24,32 --k 4,8 --trials 10 --methods
htp,obs-pursuit``), measured side by side in one run:

- in one process: the first :func:`iobs_jax.sweep.sweep` call (cold: it compiles one
  program per solver) and the same call again (warm: the programs are reused), with the
  compile share of the cold call (compile seconds / wall seconds; the programs compile in
  parallel threads, so the sum of their compile times can exceed the wall time) and the
  number of XLA compilations of each call (JAX's backend-compile events);
- the compile count of a larger grid (``--n 24,28,32 --k 4,6,8``, ``d = 65`` so that
  nothing is reused): it does not grow with the number of cells;
- from the command line: the command itself in fresh processes, cold (empty persistent
  compilation cache) then warm (the cache filled by the cold run), with JAX's persistent
  cache turned on through its environment variables (what the CLI's cache does) unless
  ``--no-cli``.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sweep_compile.py [--no-cli]
        [--out benchmarks/results/sweep_compile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

from iobs_jax import sweep as sw  # noqa: E402

jax.config.update("jax_enable_x64", True)

GRID = dict(d=64, n=[24, 32], k=[4, 8], trials=10)
# Another d, so that nothing compiled for GRID is reused: its compile count is comparable.
LARGER = dict(d=65, n=[24, 28, 32], k=[4, 6, 8], trials=10)
METHODS = ["htp", "obs-pursuit"]
COMMAND = ["sweep", "--d", "64", "--n", "24,32", "--k", "4,8", "--trials", "10",
           "--methods", "htp,obs-pursuit"]
_COMPILES = [0]


def _count(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def timed_sweep(grid: dict, seed: int) -> dict:
    """Wall time, compile seconds and compile count of one sweep call."""
    before = _COMPILES[0]
    t0 = time.perf_counter()
    res = sw.sweep(METHODS, key=jax.random.key(seed), **grid)
    wall = time.perf_counter() - t0
    compile_s = sum(r["compile_seconds"] for r in res.rows)
    return dict(wall_s=wall, compile_s=compile_s, compiles=_COMPILES[0] - before,
                programs=sum(r["compile_seconds"] > 0 for r in res.rows),
                cells=len(grid["n"]) * len(grid["k"]),
                success={m: sum(r["success_rate"] for r in res.rows if r["method"] == m)
                         / sum(1 for r in res.rows if r["method"] == m) for m in METHODS})


def cli_runs(out: Path) -> dict:
    """The command cold and warm in fresh processes sharing a persistent cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        times = {}
        for label in ("cold", "warm"):
            argv = [sys.executable, "-m", "iobs_jax.cli.main", *COMMAND, "--out",
                    str(out / f"cli_{label}"), "--quiet"]
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
            times[label] = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return dict(cold_s=times["cold"], warm_s=times["warm"],
                ratio=times["cold"] / times["warm"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                              "sweep_compile.json"))
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jax.monitoring.register_event_duration_secs_listener(_count)
    cold = timed_sweep(GRID, 0)
    warm = timed_sweep(GRID, 0)
    larger = timed_sweep(LARGER, 1)
    cli = None if opts.no_cli else cli_runs(out.parent)
    print("| run | cells | wall s | compile s | compile share | programs | XLA compiles |")
    print("|---|---|---|---|---|---|---|")
    for label, r in (("in-process cold", cold), ("in-process warm (same call again)", warm),
                     ("in-process, 3x3 grid, d = 65 (cold)", larger)):
        print(f"| {label} | {r['cells']} | {r['wall_s']:.2f} | {r['compile_s']:.2f} | "
              f"{min(1.0, r['compile_s'] / r['wall_s']):.0%} | {r['programs']} | "
              f"{r['compiles']} |")
    print(f"\nin-process cold / warm: {cold['wall_s'] / warm['wall_s']:.0f}x "
          f"(warm runs {cold['cells']} cells x {GRID['trials']} trials "
          f"x {len(METHODS)} solvers, nothing compiled)")
    if cli is not None:
        print(f"command line (`iobs-jax {' '.join(COMMAND)}`): cold {cli['cold_s']:.1f} s, "
              f"warm (persistent cache) {cli['warm_s']:.1f} s: {cli['ratio']:.2f}x")
    meta = dict(jax=jax.__version__, backend=jax.default_backend(), machine=platform.machine(),
                cpus=os.cpu_count(), grid=GRID, larger=LARGER, methods=METHODS)
    out.write_text(json.dumps(dict(meta=meta, cold=cold, warm=warm, larger=larger, cli=cli),
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
