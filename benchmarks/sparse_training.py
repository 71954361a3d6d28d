"""Sparse training benchmark: MNIST MLP and CNN at 90/95/98% sparsity, 3 seeds, every
method of ``examples/sparse_training_mnist.py`` (dense, GMP, OBS projection with Fisher
curvature corrected every step or at mask updates, and with diagonal curvature, STE,
SET, RigL), same budget each.

    python benchmarks/sparse_training.py             # the full grid (hours on 2 CPU cores)
    python benchmarks/sparse_training.py --quick     # MLP, 90/95%, 1 seed, 3 epochs
    python benchmarks/sparse_training.py --models mlp --seeds 0,1,2   # the bar's runs

Every finished run is appended to the JSON at once (``--out``; default
``benchmarks/results/sparse_training.json``, git-ignored) and a rerun with the same
settings skips it, so a long grid can be stopped and resumed. At the end it writes the
table and the plot, and the docs page ``docs/sparse_training.md`` (``--docs``) with
``docs/sparse_training.png``. Times are wall seconds per run on whatever machine ran it
(OPENBLAS_NUM_THREADS=1 is set; other work on the machine slows every method alike).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _example():
    path = ROOT / "examples" / "sparse_training_mnist.py"
    spec = importlib.util.spec_from_file_location("sparse_training_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _key(r):
    return (r["model"], r["method"], r["sparsity"], r["seed"], r["epochs"])


def run_grid(ex, args, out: Path) -> list[dict]:
    """Every (model, sparsity, method, seed) not already in ``out``; dense once per seed."""
    records = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {_key(r) for r in records}
    train, test = ex.load(args.data)
    import iobs_jax.mnist as mnist

    for model_name in args.models:
        model = mnist.MLP() if model_name == "mlp" else mnist.CNN()
        for sparsity in args.sparsities:
            for method in args.methods:
                s = 0.0 if method == "dense" else sparsity
                for seed in args.seeds:
                    epochs = args.epochs[model_name]
                    key = (model_name, method, s, seed, epochs)
                    if key in done:
                        continue
                    r = ex.run(model, method, s, seed, epochs, train, test)
                    r.update(model=model_name, method=method, sparsity=s, seed=seed,
                             epochs=epochs)
                    records.append(r)
                    done.add(key)
                    print(f"{model_name} {method:<13} {s:.2f} seed {seed}: "
                          f"{r['accuracy']:.2f}% zeros {r['sparsity']:.3f} "
                          f"{r['wall_s']:.0f} s", flush=True)
                    _save(out, records)
    return records


def _save(out: Path, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": records, "machine": platform.platform(),
                               "written": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


def summarize(records, args):
    """``{model: {method: {sparsity: (mean, std, n, mean wall)}}}`` for this run's grid."""
    table = {}
    for r in records:
        if r["model"] not in args.models or r["epochs"] != args.epochs[r["model"]] or \
                r["seed"] not in args.seeds or r["method"] not in args.methods:
            continue
        sparsities = args.sparsities if r["method"] != "dense" else [0.0]
        if r["sparsity"] not in sparsities:
            continue
        table.setdefault(r["model"], {}).setdefault(r["method"], {}).setdefault(
            r["sparsity"], []).append(r)
    # Rows in the example's order of methods (columns are looked up by sparsity).
    return {m: {k: {s: (np.mean([x["accuracy"] for x in rs]), np.std([x["accuracy"] for x in rs]),
                        len(rs), np.mean([x["wall_s"] for x in rs]))
                    for s, rs in sorted(by_m[k].items())}
                for k in args.methods if k in by_m}
            for m, by_m in table.items()}


def markdown(summary, args) -> str:
    lines = []
    for model, by_method in summary.items():
        dense = by_method.get("dense", {}).get(0.0)
        head = f"**{model.upper()}**, {args.epochs[model]} epochs" + (
            f" (dense AdamW: {dense[0]:.2f} ± {dense[1]:.2f})" if dense else "")
        lines += [head, "", "| method | " + " | ".join(f"{s:.0%}" for s in args.sparsities)
                  + " | s/run |", "|---|" + "---|" * (len(args.sparsities) + 1)]
        for method, by_s in by_method.items():
            if method == "dense":
                continue
            cells = [_cell(by_s[s], len(args.seeds)) if s in by_s else "-"
                     for s in args.sparsities]
            wall = np.mean([v[3] for v in by_s.values()])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {wall:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _cell(stats, seeds: int) -> str:
    """``mean ± std``, with the number of seeds when fewer than asked ran."""
    mean, std, n, _ = stats
    if n == 1:
        return f"{mean:.2f}" + (" (1 seed)" if seeds > 1 else "")
    return f"{mean:.2f} ± {std:.2f}" + (f" ({n} seeds)" if n < seeds else "")


def bar_verdicts(summary) -> list[str]:
    """The issue's bar: OBS projection (chained after AdamW) >= GMP on the MLP at 90/95%."""
    out = []
    mlp = summary.get("mlp", {})
    for method in ("obs-fisher", "obs-fisher-masks", "obs-diagonal"):
        for s in (0.9, 0.95):
            if s in mlp.get(method, {}) and s in mlp.get("gmp", {}):
                a, g = mlp[method][s], mlp["gmp"][s]
                out.append(f"- MLP {s:.0%}: {method} {a[0]:.2f} vs GMP {g[0]:.2f} "
                           f"({min(a[2], g[2])} seeds): "
                           f"{'>= GMP' if a[0] >= g[0] else 'below GMP'}")
    return out


def plot(summary, args, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
    for ax, (model, by_method) in zip(axes[0], summary.items(), strict=True):
        for method, by_s in by_method.items():
            if method == "dense":
                ax.axhline(by_s[0.0][0], color="k", ls="--", lw=1, label="dense")
                continue
            xs = [s for s in args.sparsities if s in by_s]
            ax.errorbar([100 * s for s in xs], [by_s[s][0] for s in xs],
                        yerr=[by_s[s][1] for s in xs], marker="o", capsize=3, label=method)
        ax.set_title(f"MNIST {model.upper()}, {args.epochs[model]} epochs")
        ax.set_xlabel("kernel sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def write_docs(path: Path, table: str, verdicts: list[str], args, ex) -> None:
    seeds = ",".join(map(str, args.seeds))
    text = f"""# Sparse training with Optax: MNIST benchmark

Written by `benchmarks/sparse_training.py` (do not edit by hand); rerun it to refresh.
Settings: models {", ".join(args.models)}; kernel sparsities {", ".join(
        f"{s:.0%}" for s in args.sparsities)}; seeds {seeds}; {_epochs_text(args.epochs)} of batch
{ex.BATCH} on 8,000 of the packaged MNIST images, test on the other 2,000; AdamW lr
{ex.LR} under every method; test accuracy (%) as mean ± std over seeds, then the mean
wall time of one run (s; 2 shared CPU cores unless noted).

{table}
Methods (see `examples/sparse_training_mnist.py` for the exact settings):

- **gmp**: gradual magnitude pruning, `chain(adamw, hard_threshold(cubic_sparsity_schedule(...),
  update_every=F))`, cubic schedule from epoch 1 to 70% of training, mask every quarter epoch.
- **obs-fisher** / **obs-diagonal**: `chain(adamw, obs_projection(cubic, "fisher" | "diagonal",
  update_every=F))`: the same schedule; mask by OBS saliency; Fisher: kept weights
  corrected by the OBS formula every step (32 per-example gradients per step,
  Woodbury); diagonal: the projection of a diagonal curvature is the mask itself.
- **obs-fisher-masks**: obs-fisher with `compensate="mask_updates"`: the Fisher and the
  OBS correction only when the mask is recomputed, pruned coordinates zeroed in between.
- **ste**: straight-through magnitude pruning (`ste(cubic)`, masked forward with
  `masked_params`, mask every step).
- **set** / **rigl**: `sparse_evolutionary(adamw, s)` / `rigl(adamw, s)`: random ERK
  topology at the final sparsity from step 0, connectivity update every half epoch until
  75% of training, drop fraction 0.3 (RigL: cosine decay), regrown weights at zero with
  AdamW moments reset.

Bar (issue 16: the OBS projection chained after AdamW reaches at least GMP at 90% and
95% on the MLP, mean of 3 seeds, same budget):

{chr(10).join(verdicts) if verdicts else "- (not run: needs the MLP at 90% and 95%)"}

![accuracy against sparsity](sparse_training.png)
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _parse_epochs(text: str, models: list[str], parser) -> dict[str, int]:
    """``"10"`` (every model) or ``"mlp=10,cnn=5"`` -> ``{model: epochs}``."""
    try:
        if "=" not in text:
            return dict.fromkeys(models, int(text))
        pairs = [part.split("=") for part in text.split(",")]
        given = {m: int(e) for m, e in pairs}
    except ValueError:
        parser.error(f"--epochs must be an int or model=int pairs; got {text!r}")
    if len(given) != len(pairs):
        parser.error(f"--epochs names a model twice: {text!r}")
    missing = [m for m in models if m not in given]
    if missing:
        parser.error(f"--epochs names no epoch count for {', '.join(missing)}")
    return {m: given[m] for m in models}


def _epochs_text(epochs: dict[str, int]) -> str:
    if len(set(epochs.values())) == 1:
        return f"{next(iter(epochs.values()))} epochs"
    return ", ".join(f"{e} epochs ({m.upper()})" for m, e in epochs.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", default="10",
                        help="epochs of every run (10), or per model: mlp=10,cnn=5")
    parser.add_argument("--methods", default=None, help="subset of the example's methods")
    parser.add_argument("--data", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="MLP, 90/95%%, seed 0, 3 epochs (~15 min on 2 busy cores)")
    parser.add_argument("--out", default=str(RESULTS / "sparse_training.json"))
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: write the table and docs from what --out holds")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "sparse_training.md"))
    args = parser.parse_args()
    ex = _example()
    if args.quick:
        args.models, args.sparsities, args.seeds, args.epochs = "mlp", "0.9,0.95", "0", "3"
    args.models = args.models.split(",")
    args.epochs = _parse_epochs(args.epochs, args.models, parser)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",") if args.methods else list(ex.METHODS)
    unknown = set(args.methods) - set(ex.METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {', '.join(ex.METHODS)}")
    out = Path(args.out)
    if args.no_train:
        if not out.is_file():
            sys.exit(f"--no-train: {out} does not exist (run the grid first)")
        records = json.loads(out.read_text())["runs"]
    else:
        records = run_grid(ex, args, out)
    summary = summarize(records, args)
    table = markdown(summary, args)
    verdicts = bar_verdicts(summary)
    print("\n" + table + "\n" + "\n".join(verdicts))
    docs = Path(args.docs)
    plot(summary, args, docs.with_suffix(".png"))
    write_docs(docs, table, verdicts, args, ex)
    print(f"wrote {out}, {docs} and {docs.with_suffix('.png')}")


if __name__ == "__main__":
    main()
