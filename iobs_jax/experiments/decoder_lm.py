"""The decoder LM experiment: train (or load from the cache) the byte-level decoder,
prune every linear map with each method, and report test perplexity. The engine of
``iobs-jax train-lm``/``prune-lm`` and ``benchmarks/prune_lm.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from iobs_jax.core import files

LM_METHODS = ("magnitude", "wanda", "sparsegpt", "iobs")
DEFAULT_PATTERNS = ("0.5", "0.6", "0.7", "2:4")


class LMData(NamedTuple):
    calib: list  # batches of input windows (B, T), int32
    val: list  # batches of held-out input windows (the selection uses val_windows)
    val_windows: np.ndarray  # (N, T + 1) validation windows (perplexity)
    test_windows: np.ndarray  # (N, T + 1) non-overlapping test windows (perplexity)


def lm_data(seq_len: int, *, calib: int = 128, batch: int = 16, val: int = 128,
            test: int = 256, seed: int = 0, root: str | None = None) -> LMData:
    """Calibration: ``calib`` random training windows; validation: ``val`` random
    validation windows; test: the first ``test`` non-overlapping test windows."""
    from iobs_jax.models import text

    rng = np.random.default_rng(seed)
    cal = text.random_windows(text.stdlib_source("train", root), calib, seq_len, rng)
    valw = text.random_windows(text.stdlib_source("validation", root), val, seq_len, rng)
    testw = text.sequential_windows(text.stdlib_source("test", root), seq_len, limit=test)
    split = lambda w: [w[i:i + batch, :-1] for i in range(0, len(w), batch)]
    return LMData(split(cal), split(valw), valw, testw)


class LMConfig(NamedTuple):
    method: str
    pattern: str  # "0.5" (unstructured sparsity) or "2:4"
    iterations: int = 1
    scope: str | None = None  # comparison group of magnitude / Wanda: "row" or "layer"


# Magnitude and Wanda rank weights within a comparison group, and which group is better
# depends on the model (the Wanda paper: per output row for LLMs, per layer elsewhere).
# Both are run; the one kept is chosen on validation windows, each method's usual group
# first (magnitude: the layer, as the Wanda paper's baseline; Wanda: the output row).
SCOPES = {"magnitude": ("layer", "row"), "wanda": ("row", "layer")}


def _prune_kwargs(cfg: LMConfig, damping: float, step_size: float) -> dict:
    kwargs: dict[str, Any] = dict(method=cfg.method, damping=damping, progress=False)
    if cfg.scope is not None:
        kwargs["scope"] = cfg.scope
    if ":" in cfg.pattern:
        kwargs["pattern"] = cfg.pattern
    else:
        kwargs["sparsity"] = float(cfg.pattern)
    if cfg.iterations > 1:
        kwargs.update(iterations=cfg.iterations, step_size=step_size)
    return kwargs


def run_lm_experiment(model, data: LMData, configs: Sequence[LMConfig], *,
                      damping: float = 0.01, step_size: float = 0.5,
                      say: Callable[[str], None] = print,
                      on_record: Callable[[list], None] | None = None) -> list[dict]:
    """Prune ``model`` once per configuration; one record per configuration.

    Records: ``method, pattern, sparsity`` (zeros over the pruned maps), ``iterations``,
    ``perplexity`` and ``bits_per_byte`` on the test windows, ``val_perplexity``,
    ``dense_perplexity``, ``layer_loss``, ``layers``, ``seconds`` (the pruning call).
    ``on_record`` gets the records so far after each one (to write them as they come).
    """
    from iobs_jax import prune
    from iobs_jax.models import evaluate, window_nll

    dense_nll = evaluate(model, data.test_windows)
    records = []
    for cfg in configs:
        t0 = time.perf_counter()
        pruned, report = prune(model, data.calib, **_prune_kwargs(cfg, damping, step_size))
        seconds = time.perf_counter() - t0
        nll, val_nll = evaluate(pruned, data.test_windows), window_nll(pruned, data.val_windows)
        rec = dict(method=cfg.method, pattern=cfg.pattern, sparsity=report.sparsity,
                   # a comparison group is kept or not once both ran (choose_scopes)
                   iterations=cfg.iterations, scope=cfg.scope,
                   chosen=True if cfg.scope is None else None,
                   perplexity=math.exp(nll),
                   bits_per_byte=nll / math.log(2),
                   val_perplexity=math.exp(float(np.mean(val_nll))),
                   val_window_nll=[round(float(v), 6) for v in val_nll],
                   dense_perplexity=math.exp(dense_nll), layer_loss=report.total_loss,
                   layers=len(report.layers), seconds=seconds)
        records.append(rec)
        say(f"{cfg.method:>10} {cfg.pattern:>5} it={cfg.iterations}"
            f"{'' if cfg.scope is None else ' ' + cfg.scope}: perplexity "
            f"{rec['perplexity']:.4f} (dense {rec['dense_perplexity']:.4f}), "
            f"{seconds:.1f} s")
        if on_record is not None:
            on_record(records)
    return records


def choose_scopes(records: list[dict]) -> list[dict]:
    """Mark which comparison group of magnitude and Wanda is kept (``chosen``) per
    pattern: the method's usual group unless the other is better on the validation
    windows by more than one standard error (:func:`one_standard_error`). N:M patterns
    have one group (each block of ``M``): their single run is kept."""
    out = [dict(r) for r in records]
    for method, order in SCOPES.items():
        for pattern in dict.fromkeys(r["pattern"] for r in out):
            runs = sorted((r for r in out if r["method"] == method and r["pattern"] == pattern
                           and r.get("scope") is not None), key=lambda r: order.index(r["scope"]))
            pick = one_standard_error([r["val_window_nll"] for r in runs]) if runs else 0
            for i, r in enumerate(runs):
                r["chosen"] = i == pick
    return out


def best_iterates(records: list[dict]) -> list[dict]:
    """Per pattern, the I-OBS iterate one keeps without looking at the test set: the
    fewest iterations whose validation NLL is within one standard error of the lowest
    (:func:`one_standard_error`)."""
    out = []
    for pattern in dict.fromkeys(r["pattern"] for r in records):
        runs = sorted((r for r in records if r["method"] == "iobs" and r["pattern"] == pattern),
                      key=lambda r: r["iterations"])
        if runs:
            best = runs[one_standard_error([r["val_window_nll"] for r in runs])]
            out.append({**best, "method": "iobs-best", "selected_iterations": best[
                "iterations"]})
    return out


def one_standard_error(window_nll: Sequence[Sequence[float]]) -> int:
    """Index of the first candidate (ordered simplest first) whose mean NLL exceeds the
    lowest mean by at most the standard error of their paired per-window differences.

    A paired variant of the "one-standard-error rule" of model selection (Breiman et
    al. 1984; glmnet's ``lambda.1se`` uses the SE of the best alone; here each
    candidate's differences from the best on the same windows are used): a later I-OBS
    iterate is kept only when its gain on the validation windows is larger than the noise
    of measuring it there. Plain arg-min picks an iterate whose validation gain of ~0.1%
    need not hold on other windows.

    >>> one_standard_error([[1.0, 2.0, 3.0], [0.99, 1.99, 3.02], [0.5, 1.5, 2.5]])
    2
    >>> one_standard_error([[1.0, 2.0, 3.0], [0.99, 2.01, 2.99]])
    0
    """
    nll = np.asarray(window_nll, dtype=np.float64)
    if nll.ndim != 2 or nll.shape[1] < 2:
        raise ValueError(f"need (candidates, windows >= 2) NLLs; got shape {nll.shape}.")
    if not np.all(np.isfinite(nll)):
        raise ValueError("validation NLLs are not all finite (a pruned model produced "
                         "NaN/inf): no candidate can be chosen.")
    best = int(np.argmin(nll.mean(axis=1)))
    diff = nll - nll[best]
    se = diff.std(axis=1, ddof=1) / np.sqrt(nll.shape[1])
    return int(np.flatnonzero(diff.mean(axis=1) <= se)[0])


def lm_configs(methods: Sequence[str], patterns: Sequence[str], max_iterations: int
               ) -> list[LMConfig]:
    out = []
    for pattern in patterns:
        for m in methods:
            if m in SCOPES and ":" not in pattern:  # N:M: one group per block of M
                out += [LMConfig(m, pattern, 1, scope) for scope in SCOPES[m]]
            else:
                out.append(LMConfig(m, pattern, 1))
        if "iobs" in methods:
            out += [LMConfig("iobs", pattern, t) for t in range(2, max_iterations + 1)]
    return out


def table(records: Sequence[dict]) -> str:
    """One line per record; ``scope`` is the comparison group of magnitude and Wanda,
    ``*`` marks the one kept (:func:`choose_scopes`)."""
    head = (f"{'method':>10} {'pattern':>7} {'it':>3} {'scope':>6} {'sparsity':>8} "
            f"{'perplexity':>10} {'bits/byte':>9} {'val ppl':>8} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        scope = "" if r.get("scope") is None else r["scope"] + ("*" if r.get("chosen") else "")
        lines.append(f"{r['method']:>10} {r['pattern']:>7} {r['iterations']:>3} {scope:>6} "
                     f"{r['sparsity']:8.3f} {r['perplexity']:10.4f} {r['bits_per_byte']:9.4f} "
                     f"{r['val_perplexity']:8.4f} {r['seconds']:8.1f}")
    if records:
        lines.append(f"dense perplexity {records[0]['dense_perplexity']:.4f} "
                     f"({math.log2(records[0]['dense_perplexity']):.4f} bits per byte)")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: Path) -> list[Path]:
    """Perplexity against sparsity per method; perplexity against I-OBS iteration with
    the iterate kept on validation marked (one line per pattern)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in LM_METHODS:
        pts = sorted((float(r["pattern"]), r["perplexity"]) for r in records
                     if r["method"] == method and ":" not in r["pattern"]
                     and r["iterations"] == 1 and r.get("chosen", True))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if records:
        ax.axhline(records[0]["dense_perplexity"], color="gray", ls="--", label="dense")
    ax.set(xlabel="sparsity", ylabel="test perplexity (bytes)", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths.append(path.with_name(path.stem + "_sparsity.png"))
    files.save_figure(fig, paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for best in best_iterates(list(records)):
        runs = sorted((r["iterations"], r["perplexity"]) for r in records
                      if r["method"] == "iobs" and r["pattern"] == best["pattern"])
        line, = ax.plot(*zip(*runs, strict=True), marker="o", label=best["pattern"])
        ax.plot([best["iterations"]], [best["perplexity"]], marker="*", ms=14,
                color=line.get_color())
    ax.set(xlabel="I-OBS iterations", ylabel="test perplexity (bytes)",
           title="star: iterate kept (1-SE rule on validation)")
    ax.legend(title="pattern")
    fig.tight_layout()
    paths.append(path.with_name(path.stem + "_iterations.png"))
    files.save_figure(fig, paths[-1], dpi=120)
    return paths


@dataclasses.dataclass(frozen=True)
class LMSizes:
    """The default decoder and its training (``quick``: a tiny one for tests)."""

    model: Any
    train: Any


def default_sizes(quick: bool = False) -> LMSizes:
    from iobs_jax.models import DecoderConfig, TrainConfig

    if quick:
        return LMSizes(DecoderConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64, max_seq_len=64),
                       TrainConfig(steps=40, batch_size=8, learning_rate=1e-2, warmup=4))
    return LMSizes(DecoderConfig(), TrainConfig())


def model_key(sizes: LMSizes) -> str:
    """A name for a trained model: its sizes, its training and this Python's stdlib."""
    raw = json.dumps([dataclasses.asdict(sizes.model), dataclasses.asdict(sizes.train),
                      sys.version_info[:2]], sort_keys=True)
    return "decoder-" + hashlib.sha1(raw.encode()).hexdigest()[:10]


def lm_cache(sizes: LMSizes) -> Path:
    """Where a trained model is kept: ``<cache>/lm/<model_key>``, next to the compilation
    cache (``$IOBS_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/iobs_jax`` or ``~/.cache``)."""
    return files.cache_dir().parent / "lm" / model_key(sizes)


def train_or_load(sizes: LMSizes, *, force: bool = False, progress: bool = True,
                  say: Callable[[str], None] = print):
    """The cached model for ``sizes``, trained (about 30 minutes on 2 CPU cores for the
    default sizes) and cached first if there is none; ``(model, info, folder)``."""
    from iobs_jax.models import load_decoder, save_decoder, stdlib_source, train_decoder

    folder = lm_cache(sizes)
    if not force and (folder / "train.json").is_file():
        say(f"using the trained model cached in {folder}")
        return load_decoder(folder), json.loads((folder / "train.json").read_text()), folder
    say(f"training the decoder ({sizes.train.steps} steps); it is cached in {folder}")
    t0 = time.perf_counter()
    model, history = train_decoder(sizes.model, sizes.train, stdlib_source("train"),
                                   progress=progress)
    seconds = time.perf_counter() - t0
    info = dict(model=dataclasses.asdict(sizes.model), train=dataclasses.asdict(sizes.train),
                seconds=seconds, history=history,
                tokens_per_second=sizes.train.steps * sizes.train.batch_size
                * sizes.model.max_seq_len / seconds, **_scores(model, sizes))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_decoder(model, tmp)
    files.write_text(tmp / "train.json", json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)  # a complete folder, or none
    return model, info, folder


def _scores(model, sizes: LMSizes) -> dict:
    from iobs_jax.models import bits_per_byte, evaluate, sequential_windows, stdlib_source

    t = sizes.model.max_seq_len
    out = {}
    for split in ("validation", "test"):
        nll = evaluate(model, sequential_windows(stdlib_source(split), t, limit=256))
        out[f"{split}_bits_per_byte"] = bits_per_byte(nll)
        out[f"{split}_perplexity"] = math.exp(nll)
    return out
