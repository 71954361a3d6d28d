"""Post-training pruning of MNIST classifiers: magnitude, Wanda, SparseGPT, OBC and I-OBS.

Trains the MLP (784-300-100-10) and the CNN of :mod:`iobs_jax.mnist` on the first 8,000
images of the MNIST set found (``--data``, default ``../shared/data/mnist`` next to the
repository, else the loader's fallback), tests on the rest (2,000 for the 10,000-image
test files), and prunes every Dense/Conv layer with :func:`iobs_jax.prune` (sequential
calibration on ``--calib`` training images in batches of 250, damping 0.01) at 50%, 70%,
90% unstructured and 2:4.

Methods: ``magnitude``, ``wanda``, ``sparsegpt``, ``obc`` (exact greedy OBS per row,
``scope="row"``: slow, MLP at unstructured sparsities only; ``--skip-obc``), ``iobs``
(one round) and ``iobs-rounds`` (``rounds=8``; rounds do not apply to N:M patterns, so
at 2:4 it is the same computation as ``iobs``).

For each model, setting and method: test accuracy of the pruned model, total layer loss
(``report.total_loss``, the sum over layers of ``||W X - W0 X||^2 / N``; in sequential
mode each method's ``X`` comes from its own pruned predecessors), that loss relative to
SparseGPT's in the same setting, the achieved sparsity (``report.sparsity``, over the
pruned kernels) and wall time. Each configuration is called twice with the same inputs:
``cold`` includes XLA compilation, ``warm`` (the second call) is the reported time.
Times are for this machine only; compare them as ratios within one run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/prune_mnist.py [--quick] [--models mlp,cnn]
        [--epochs 15] [--calib 1000] [--seed 0] [--skip-obc] [--repeats 1]
        [--settings 50%,70%,90%,2:4] [--methods ...] [--data DIR]
        [--out benchmarks/results/prune_mnist.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK threads thrash on 2 cores

import jax  # noqa: E402
import numpy as np  # noqa: E402
from iobs_jax.mnist import (  # noqa: E402
    CNN,
    MLP,
    accuracy,
    load_mnist,
    split_train_test,
    train_classifier,
)

import iobs_jax as ij  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {"mlp": MLP, "cnn": CNN}
SETTINGS = {
    "50%": dict(sparsity=0.5),
    "70%": dict(sparsity=0.7),
    "90%": dict(sparsity=0.9),
    "2:4": dict(pattern="2:4"),
}
METHODS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "obc": dict(method="obc", scope="row"),
    "iobs": dict(method="iobs"),
    "iobs-rounds": dict(method="iobs", rounds=8),
}
CALIB_BATCH = 250
DAMPING = 0.01
NUM_TRAIN = 8000


def kernel_inputs(params) -> dict[str, int]:
    """Layer name ("Dense_0") -> number of inputs of its pruning matrix (Dense and Conv)."""
    flat = {"/".join(map(str, k)): v for k, v in _flatten(params)}
    return {name[: -len("/kernel")]: int(np.prod(np.shape(v)[:-1]))
            for name, v in flat.items() if name.endswith("/kernel")}


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def layer_filter(params, setting: dict):
    """For an N:M pattern, skip layers whose input count is not a multiple of M."""
    if "pattern" not in setting:
        return None, []
    m = int(setting["pattern"].split(":")[1])
    skipped = [n for n, c in kernel_inputs(params).items() if c % m]
    if not skipped:
        return None, []
    return (lambda name, shape: name not in skipped), skipped


def run_one(model, params, calib, test, setting: dict, method_kw: dict, flt,
            repeats: int) -> dict:
    """Prune once cold, then ``repeats`` times warm (fastest kept); evaluate the last."""
    kw = dict(setting, **method_kw, damping=DAMPING, sequential=True, filter=flt)
    times, layer_times = [], []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        pruned, report = ij.prune(model, params, calib, **kw)
        jax.block_until_ready(pruned)
        times.append(time.perf_counter() - t0)
        layer_times.append(sum(r.time_s for r in report.layers))
    acc = accuracy(model, pruned, test.images, test.labels)
    warm = 1 + int(np.argmin(times[1:]))
    return dict(
        accuracy=acc, total_loss=report.total_loss, sparsity=report.sparsity,
        cold_s=times[0], warm_s=times[warm], warm_all_s=times[1:],
        # the per-layer method time of that call (sum of LayerReport.time_s), without the
        # calibration passes that collect H
        warm_layers_s=layer_times[warm], report_time_s=report.time_s,
        layers=[dict(r._asdict(), shape=list(r.shape)) for r in report.layers],
    )


def bench_model(name: str, data_train, test, opts, settings, methods) -> dict:
    model = MODELS[name]()
    t0 = time.perf_counter()
    params = train_classifier(model, data_train.images, data_train.labels,
                              key=jax.random.key(opts.seed), epochs=opts.epochs)
    train_s = time.perf_counter() - t0
    dense = accuracy(model, params, test.images, test.labels)
    print(f"{name}: dense test accuracy {100 * dense:.2f}% ({opts.epochs} epochs, "
          f"{train_s:.1f} s)", flush=True)
    calib_x = data_train.images[: opts.calib]
    calib = [calib_x[i: i + CALIB_BATCH] for i in range(0, len(calib_x), CALIB_BATCH)]
    results: dict[str, dict[str, dict]] = {}
    notes = []
    for sname in settings:
        setting = SETTINGS[sname]
        flt, skipped = layer_filter(params, setting)
        if skipped:
            notes.append(f"{sname}: layers {', '.join(skipped)} not pruned (inputs not a "
                         f"multiple of {setting['pattern'].split(':')[1]})")
        for mname in methods:
            if mname == "obc" and (name != "mlp" or "pattern" in setting or opts.skip_obc):
                continue
            try:
                r = run_one(model, params, calib, test, setting, METHODS[mname], flt,
                            opts.repeats)
            except Exception as err:  # noqa: BLE001 - recorded and reported, run goes on
                r = dict(error=f"{type(err).__name__}: {err}")
            if skipped:
                r["unpruned_layers"] = skipped
            results.setdefault(mname, {})[sname] = r
            msg = r.get("error") or (f"acc {100 * r['accuracy']:.2f}%, loss "
                                     f"{r['total_loss']:.4g}, cold {r['cold_s']:.2f} s, "
                                     f"warm {r['warm_s']:.2f} s")
            print(f"  {name} {sname:4s} {mname:12s} {msg}", flush=True)
    for sname in settings:
        base = results.get("sparsegpt", {}).get(sname, {}).get("total_loss")
        for per in results.values():
            r = per.get(sname)
            if r and "total_loss" in r:
                r["loss_vs_sparsegpt"] = r["total_loss"] / base if base else None
    return dict(dense_accuracy=dense, train_seconds=train_s, epochs=opts.epochs,
                results=results, notes=notes)


def _table(title: str, results: dict, settings, cell) -> list[str]:
    """A markdown table, methods x settings; ``cell(r)`` formats one successful result."""
    out = [title, "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for mname, per in results.items():
        cells = []
        for s in settings:
            r = per.get(s)
            cells.append("-" if r is None else "error" if "error" in r else cell(r))
        out.append(f"| {mname} | " + " | ".join(cells) + " |")
    return out


def _accuracy_cell(r: dict) -> str:
    ratio = r.get("loss_vs_sparsegpt")
    ratio = f"{ratio:.3g}x" if ratio is not None else "-"
    return f"{100 * r['accuracy']:.1f} / {ratio} / {r['warm_s']:.2f}"


def _time_cell(r: dict) -> str:
    return f"{r['cold_s']:.2f} / {r['warm_s']:.2f} / {r['warm_layers_s']:.2f}, {r['sparsity']:.3f}"


def format_tables(name: str, res: dict, settings) -> str:
    results = res["results"]
    out = _table(f"\n{name.upper()}: dense {100 * res['dense_accuracy']:.2f}%; cells: test "
                 "accuracy % / total layer loss relative to SparseGPT's / warm seconds\n",
                 results, settings, _accuracy_cell)
    out += _table(f"\n{name.upper()}: seconds cold (includes compilation) / warm / warm "
                  "per-layer method time only (sum of LayerReport.time_s), achieved sparsity\n",
                  results, settings, _time_cell)
    for note in res["notes"]:
        out.append(f"note: {note}")
    for mname, per in results.items():
        for s, r in per.items():
            if "error" in r:
                out.append(f"error: {mname} at {s}: {r['error']}")
    return "\n".join(out)


def check_bars(name: str, res: dict) -> list[dict]:
    """The issue's quality and speed bars; each is PASS, FAIL or SKIP (missing data)."""
    dense = res["dense_accuracy"]
    results = res["results"]

    def get(m, s, key):
        r = results.get(m, {}).get(s)
        return None if r is None or key not in r else r[key]

    bars = []

    def add(bar, text, ok):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        bars.append(dict(model=name, bar=bar, status=status, detail=text))

    lo, lsg = get("iobs", "50%", "total_loss"), get("sparsegpt", "50%", "total_loss")
    ok = None if None in (lo, lsg) else lo <= 0.7 * lsg
    add(1, "50%: iobs total layer loss <= 0.7x sparsegpt's"
        + ("" if ok is None else f" (ratio {lo / lsg:.3f})"), ok)

    ai, asg, am = (get(m, "70%", "accuracy") for m in ("iobs", "sparsegpt", "magnitude"))
    ok = None if None in (ai, asg, am) else (ai >= asg >= am and ai >= dense - 0.01)
    add(2, "70%: acc iobs >= sparsegpt >= magnitude and iobs within 1 point of dense"
        + ("" if ok is None else f" ({100 * ai:.2f} / {100 * asg:.2f} / {100 * am:.2f}, "
                                 f"dense {100 * dense:.2f})"), ok)

    ar = get("iobs-rounds", "90%", "accuracy")
    ok = None if ar is None else ar >= dense - 0.03
    add(3, "90%: iobs-rounds acc within 3 points of dense"
        + ("" if ok is None else f" ({100 * ar:.2f} vs {100 * dense:.2f}, "
                                 f"{100 * (ar - dense):+.2f})"), ok)

    def time_bars(bar, ours, ref, within, describe, missing):
        """One timing bar per setting where both methods ran (warm call and layers only)."""
        for s in SETTINGS:
            t, t_ref = get(ours, s, "warm_s"), get(ref, s, "warm_s")
            if None in (t, t_ref):
                continue
            lay, lay_ref = get(ours, s, "warm_layers_s"), get(ref, s, "warm_layers_s")
            add(bar, describe(s, t, t_ref, lay, lay_ref), within(t, t_ref))
        if not any(b["bar"] == bar for b in bars):
            add(bar, missing, None)

    time_bars(
        4, "iobs", "sparsegpt", lambda t, r: t <= 3 * r,
        lambda s, t, r, lt, lr: (f"{s}: iobs warm time <= 3x sparsegpt's ({t:.3f} s vs "
                                 f"{r:.3f} s, {t / r:.2f}x; per-layer method time only "
                                 f"{lt:.3f} s vs {lr:.3f} s, {lt / lr:.2f}x)"),
        "iobs warm time <= 3x sparsegpt's")
    time_bars(
        5, "iobs-rounds", "obc", lambda t, r: t <= r / 10,
        lambda s, t, r, lt, lr: (f"{s}: iobs-rounds warm time <= obc's / 10 ({t:.3f} s vs "
                                 f"{r:.3f} s, 1/{r / t:.1f}; per-layer method time only "
                                 f"1/{lr / lt:.1f})"),
        "iobs-rounds warm time <= obc's / 10 (obc not run)")
    return bars


def plot(all_res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(all_res), figsize=(6 * len(all_res), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], all_res.items(), strict=True):
        for mname, per in res["results"].items():
            i = list(METHODS).index(mname)  # one color per method across subplots
            pts = [(SETTINGS[s]["sparsity"], 100 * r["accuracy"]) for s, r in per.items()
                   if "sparsity" in SETTINGS[s] and "accuracy" in r]
            color = f"C{i}"
            if pts:
                x, y = zip(*sorted(pts), strict=True)
                ax.plot(x, y, "o-", color=color, label=mname)
            r24 = per.get("2:4", {})
            if "accuracy" in r24:
                ax.plot([0.5 + 0.01 * (i - 2.5)], [100 * r24["accuracy"]], "s", color=color,
                        mfc="none", label=f"{mname} 2:4" if not pts else None)
        ax.axhline(100 * res["dense_accuracy"], color="k", ls=":", label="dense")
        has24 = any("accuracy" in per.get("2:4", {}) for per in res["results"].values())
        ax.set_title(name.upper() + (" (open squares: 2:4, at 50%)" if has24 else ""))
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def git_state() -> dict:
    """The commit and the modified tracked files: the library changes between runs."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=git("rev-parse", "HEAD"),
                modified=dirty.splitlines() if dirty else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help=f"MNIST idx directory (default: {DEFAULT_DATA} if it exists, "
                             "else the loader's fallback)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (15)")
    parser.add_argument("--calib", type=int, default=1000,
                        help=f"calibration images, batches of {CALIB_BATCH} (1000)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for training (0)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from {', '.join(SETTINGS).replace('%', '%%')} "
                             "(default: all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="warm calls after the cold one; the fastest is reported (1)")
    parser.add_argument("--skip-obc", action="store_true", help="do not run obc (slow)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MLP, 3 epochs, 50%% only, no obc, no iobs-rounds "
                             "(its first call compiles for about a minute)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default benchmarks/results/prune_mnist.json; "
                             "--quick: prune_mnist_quick.json); the plot goes next to it")
    parser.add_argument("--docs", default=None,
                        help="the docs page written from this run (default docs/prune_mnist.md, "
                             "none with --quick; '' for none)")
    opts = parser.parse_args()
    if opts.quick:
        opts.models, opts.settings, opts.skip_obc = "mlp", "50%", True
        opts.methods = ",".join(m for m in opts.methods.split(",") if m != "iobs-rounds")
        opts.epochs = 3 if opts.epochs is None else opts.epochs
    opts.epochs = 15 if opts.epochs is None else opts.epochs
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    settings = [s.strip() for s in opts.settings.split(",") if s.strip()]
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    if (not models or any(m not in MODELS for m in models) or not settings
            or any(s not in SETTINGS for s in settings)
            or any(m not in METHODS for m in methods) or opts.calib < 1 or opts.epochs < 0
            or opts.repeats < 1):
        parser.error(f"--models from {list(MODELS)}, --settings from {list(SETTINGS)}, "
                     f"--methods from {list(METHODS)}, --calib >= 1, --epochs >= 0, --repeats >= 1")
    if "sparsegpt" not in methods:
        methods.insert(0, "sparsegpt")  # the loss ratios' reference

    git = git_state()  # at the start: the library may be edited while this runs
    data_dir = opts.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    data = load_mnist(data_dir)
    print(f"data: {data.source}")
    if len(data.labels) <= NUM_TRAIN:
        parser.error(f"need more than {NUM_TRAIN} images; the data has {len(data.labels)}")
    train, test = split_train_test(data, NUM_TRAIN)
    print(f"train {len(train.labels)}, test {len(test.labels)}, calibration "
          f"{min(opts.calib, len(train.labels))} in batches of {CALIB_BATCH}; "
          f"device {jax.devices()[0]}", flush=True)

    start = time.perf_counter()
    all_res = {m: bench_model(m, train, test, opts, settings, methods) for m in models}
    bars = []
    for m, res in all_res.items():
        print(format_tables(m, res, settings))
        bars += check_bars(m, res)
    print("\nbars:")
    for b in bars:
        print(f"{b['status']}  {b['model']} ({b['bar']}) {b['detail']}")
    total = time.perf_counter() - start
    print(f"\ntotal {total:.1f} s")

    out = Path(opts.out) if opts.out else RESULTS / (
        "prune_mnist_quick.json" if opts.quick else "prune_mnist.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(jax=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0]), machine=platform.machine(),
                cpus=os.cpu_count(), data=data.source, num_train=len(train.labels),
                num_test=len(test.labels), calib=min(opts.calib, len(train.labels)),
                calib_batch=CALIB_BATCH, damping=DAMPING, sequential=True,
                epochs=opts.epochs, seed=opts.seed, repeats=opts.repeats,
                quick=opts.quick, skip_obc=opts.skip_obc,
                settings={s: SETTINGS[s] for s in settings},
                methods={m: METHODS[m] for m in methods}, total_seconds=total,
                git=git, iobs_jax=str(Path(ij.__file__).parent))
    out.write_text(json.dumps(dict(meta=meta, models=all_res, bars=bars), indent=2))
    print(f"wrote {out}")
    plot(all_res, out.with_suffix(".png"))
    docs = opts.docs if opts.docs is not None else (
        "" if opts.quick else str(REPO / "docs" / "prune_mnist.md"))
    if docs:
        Path(docs).write_text(docs_page(meta, all_res, bars, settings))
        print(f"wrote {docs}")
        if out.with_suffix(".png").exists():  # the figure of this run, next to the page
            shutil.copyfile(out.with_suffix(".png"), Path(docs).with_suffix(".png"))


def docs_page(meta: dict, all_res: dict, bars: list[dict], settings) -> str:
    """The docs page of this run: settings, machine, the tables and the bars."""
    tables = "\n".join(format_tables(m, res, settings) for m, res in all_res.items())
    checks = "\n".join(f"- {b['status']} {b['model']} ({b['bar']}): {b['detail']}"
                        for b in bars)
    return f"""# Post-training pruning of MNIST classifiers: the benchmark

Written by `benchmarks/prune_mnist.py` (do not edit by hand); rerun it to refresh:

```bash
OPENBLAS_NUM_THREADS=1 python benchmarks/prune_mnist.py        # ~20 min (OBC is most of it)
```

The MLP (784-300-100-10) and the CNN (conv 16, conv 32, dense 128, dense 10) of
`iobs_jax.mnist` are trained for {meta['epochs']} epochs on {meta['num_train']:,} MNIST
images and tested on the other {meta['num_test']:,}; every Dense/Conv layer is pruned by
`iobs_jax.prune` with sequential calibration ({meta['calib']:,} training images in
batches of {meta['calib_batch']}, damping {meta['damping']:g}). `iobs-rounds` is
`method="iobs", rounds=8`; `obc` is exact greedy OBS per row (MLP, unstructured only).
Layer loss: `report.total_loss`, the sum over layers of `||W X - W0 X||^2 / N`, each
method's `X` from its own pruned predecessors. Every configuration is called twice: cold
(with compilation) and warm; compare times as ratios within one run.

Machine: {meta['cpus']} CPUs ({meta['machine']}), JAX {meta['jax']} on {meta['backend']},
`OPENBLAS_NUM_THREADS=1`; whole run {meta['total_seconds'] / 60:.1f} min.
{tables}

![MNIST pruning](prune_mnist.png)

Checks the benchmark makes on its own numbers:

{checks}
"""


if __name__ == "__main__":
    main()
