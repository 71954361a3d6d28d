"""The MiniLM pruning experiment: prune a BERT sentence encoder with each method and
score it on held-out sentences (embedding cosine to the dense model, nearest-neighbour
agreement). The engine of ``iobs-jax prune-transformer`` and ``benchmarks/prune_minilm.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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
    from iobs_jax.core.progress import progress_bar
    from iobs_jax.models import bert
    from iobs_jax.pruning.encoder import prune_encoder

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
        pruned, report = prune_encoder(model, params, use, **kwargs)
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
    from iobs_jax.core.files import save_figure

    return save_figure(fig, path, dpi=120)
