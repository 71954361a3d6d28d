"""``iobs-jax train-lm`` and ``iobs-jax prune-lm``: the paper's LLM experiment, small.

``train-lm`` trains the byte-level decoder (:mod:`iobs_jax.models`) on the standard
library's source and caches it; ``prune-lm`` prunes every linear map of it with
:func:`iobs_jax.prune` (sequential, 128 random training windows of calibration) and
reports perplexity on non-overlapping test windows, as the LLM pruning papers do.
"""

from __future__ import annotations

import argparse
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

from . import _cli_common as common

LM_METHODS = ("magnitude", "wanda", "sparsegpt", "iobs")
DEFAULT_PATTERNS = ("0.5", "0.6", "0.7", "2:4")


class LMData(NamedTuple):
    calib: list  # batches of input windows (B, T), int32
    val: list  # batches of held-out input windows, for picking the best iterate
    val_windows: np.ndarray  # (N, T + 1) validation windows (perplexity)
    test_windows: np.ndarray  # (N, T + 1) non-overlapping test windows (perplexity)


def lm_data(seq_len: int, *, calib: int = 128, batch: int = 16, val: int = 64,
            test: int = 256, seed: int = 0, root: str | None = None) -> LMData:
    """Calibration: ``calib`` random training windows; validation: ``val`` random
    validation windows; test: the first ``test`` non-overlapping test windows."""
    from .models import text

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


def _prune_kwargs(cfg: LMConfig, damping: float, step_size: float) -> dict:
    kwargs: dict[str, Any] = dict(method=cfg.method, damping=damping, progress=False)
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
    from . import prune
    from .models import evaluate

    dense_nll = evaluate(model, data.test_windows)
    records = []
    for cfg in configs:
        t0 = time.perf_counter()
        pruned, report = prune(model, data.calib, **_prune_kwargs(cfg, damping, step_size))
        seconds = time.perf_counter() - t0
        nll, val_nll = evaluate(pruned, data.test_windows), evaluate(pruned, data.val_windows)
        rec = dict(method=cfg.method, pattern=cfg.pattern, sparsity=report.sparsity,
                   iterations=cfg.iterations, perplexity=math.exp(nll),
                   bits_per_byte=nll / math.log(2), val_perplexity=math.exp(val_nll),
                   dense_perplexity=math.exp(dense_nll), layer_loss=report.total_loss,
                   layers=len(report.layers), seconds=seconds)
        records.append(rec)
        say(f"{cfg.method:>10} {cfg.pattern:>5} it={cfg.iterations}: perplexity "
            f"{rec['perplexity']:.4f} (dense {rec['dense_perplexity']:.4f}), "
            f"{seconds:.1f} s")
        if on_record is not None:
            on_record(records)
    return records


def best_iterates(records: list[dict]) -> list[dict]:
    """Per pattern, the I-OBS record whose iteration count has the lowest validation
    perplexity (the iterate one keeps without looking at the test set)."""
    out = []
    for pattern in dict.fromkeys(r["pattern"] for r in records):
        runs = [r for r in records if r["method"] == "iobs" and r["pattern"] == pattern]
        if runs:
            best = min(runs, key=lambda r: (r["val_perplexity"], r["iterations"]))
            out.append({**best, "method": "iobs-best", "selected_iterations": best[
                "iterations"]})
    return out


def lm_configs(methods: Sequence[str], patterns: Sequence[str], max_iterations: int
               ) -> list[LMConfig]:
    out = []
    for pattern in patterns:
        for m in methods:
            out.append(LMConfig(m, pattern, 1))
        if "iobs" in methods:
            out += [LMConfig("iobs", pattern, t) for t in range(2, max_iterations + 1)]
    return out


def table(records: Sequence[dict]) -> str:
    head = (f"{'method':>10} {'pattern':>7} {'it':>3} {'sparsity':>8} {'perplexity':>10} "
            f"{'bits/byte':>9} {'val ppl':>8} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['method']:>10} {r['pattern']:>7} {r['iterations']:>3} "
                     f"{r['sparsity']:8.3f} {r['perplexity']:10.4f} {r['bits_per_byte']:9.4f} "
                     f"{r['val_perplexity']:8.4f} {r['seconds']:8.1f}")
    if records:
        lines.append(f"dense perplexity {records[0]['dense_perplexity']:.4f} "
                     f"({math.log2(records[0]['dense_perplexity']):.4f} bits per byte)")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: Path) -> list[Path]:
    """Perplexity against sparsity per method; perplexity against I-OBS iteration with
    the best validation point marked (one line per pattern)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in LM_METHODS:
        pts = sorted((float(r["pattern"]), r["perplexity"]) for r in records
                     if r["method"] == method and ":" not in r["pattern"]
                     and r["iterations"] == 1)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    if records:
        ax.axhline(records[0]["dense_perplexity"], color="gray", ls="--", label="dense")
    ax.set(xlabel="sparsity", ylabel="test perplexity (bytes)", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths.append(path.with_name(path.stem + "_sparsity.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for best in best_iterates(list(records)):
        runs = sorted((r["iterations"], r["perplexity"]) for r in records
                      if r["method"] == "iobs" and r["pattern"] == best["pattern"])
        line, = ax.plot(*zip(*runs, strict=True), marker="o", label=best["pattern"])
        ax.plot([best["iterations"]], [best["perplexity"]], marker="*", ms=14,
                color=line.get_color())
    ax.set(xlabel="I-OBS iterations", ylabel="test perplexity (bytes)",
           title="star: best on validation windows")
    ax.legend(title="pattern")
    fig.tight_layout()
    paths.append(path.with_name(path.stem + "_iterations.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


@dataclasses.dataclass(frozen=True)
class LMSizes:
    """The default decoder and its training (``quick``: a tiny one for tests)."""

    model: Any
    train: Any


def default_sizes(quick: bool = False) -> LMSizes:
    from .models import DecoderConfig, TrainConfig

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
    return common.cache_dir().parent / "lm" / model_key(sizes)


def train_or_load(sizes: LMSizes, *, force: bool = False, progress: bool = True,
                  say: Callable[[str], None] = print):
    """The cached model for ``sizes``, trained (about 30 minutes on 2 CPU cores for the
    default sizes) and cached first if there is none; ``(model, info, folder)``."""
    from .models import load_decoder, save_decoder, stdlib_source, train_decoder

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
    common.write_text(tmp / "train.json", json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)  # a complete folder, or none
    return model, info, folder


def _scores(model, sizes: LMSizes) -> dict:
    from .models import bits_per_byte, evaluate, sequential_windows, stdlib_source

    t = sizes.model.max_seq_len
    out = {}
    for split in ("validation", "test"):
        nll = evaluate(model, sequential_windows(stdlib_source(split), t, limit=256))
        out[f"{split}_bits_per_byte"] = bits_per_byte(nll)
        out[f"{split}_perplexity"] = math.exp(nll)
    return out


# ------------------------------------------------------------------ command line


def register(sub) -> None:
    p = sub.add_parser(
        "train-lm", parents=[common.common_parser()],
        help="train the byte-level decoder on the standard library's source (cached)",
        description=(
            "Train the Llama-style byte-level decoder (iobs_jax.models) on the Python "
            "standard library's source files with AdamW, warm-up and cosine decay; cache it "
            "under the user cache folder (later commands reuse it) and copy it to --out "
            "(config.json, model.safetensors, train.json with the test bits per byte). "
            "The default size trains in about 30 minutes on 2 CPU cores."),
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--quick", action="store_true", help="a tiny model (a minute): for trying")
    p.add_argument("--force", action="store_true", help="train even if a cached model exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train_lm_command)
    p = sub.add_parser(
        "prune-lm", parents=[common.common_parser()],
        help="prune the byte-level decoder and report test perplexity per method",
        description=(
            "Prune every linear map of the trained decoder (trained first if it is not "
            "cached) with calibration windows of the training split, sequentially, once per "
            "method and pattern, and report perplexity on non-overlapping test windows. I-OBS "
            "runs 1..--max-iterations iterations; the best count on validation windows is "
            "reported as iobs-best. Writes report.json, a table and two figures to --out."),
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--model", default=None,
                   help="a saved decoder folder (default: the cached default model)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny model and small data (a few minutes): for trying")
    p.add_argument("--methods", default=",".join(LM_METHODS),
                   help=f"comma-separated, from {', '.join(LM_METHODS)} (default: all)")
    p.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                   help="comma-separated sparsities in (0, 1) and/or N:M patterns "
                        "(default 0.5,0.6,0.7,2:4)")
    p.add_argument("--max-iterations", type=int, default=5,
                   help="I-OBS iteration counts 1..N are run (default 5)")
    p.add_argument("--step-size", type=float, default=0.5,
                   help="I-OBS step size for iterations > 1 (default 0.5)")
    p.add_argument("--calib", type=int, default=128,
                   help="random training windows for calibration (default 128)")
    p.add_argument("--val", type=int, default=64,
                   help="random validation windows that pick the best iterate (default 64)")
    p.add_argument("--test", type=int, default=256,
                   help="non-overlapping test windows for perplexity (default 256)")
    p.add_argument("--batch", type=int, default=16, help="windows per batch (default 16)")
    p.add_argument("--damping", type=float, default=0.01,
                   help="relative Hessian damping (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="which random windows (default 0)")
    p.add_argument("--no-plot", action="store_true", help="do not write the figures")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=prune_lm_command)


def train_lm_command(args: argparse.Namespace) -> dict:
    out = common.out_dir(args.out)
    say = (lambda *a: None) if args.quiet else print
    sizes = default_sizes(args.quick)
    _, info, folder = train_or_load(sizes, force=args.force, progress=not args.quiet,
                                    say=say)
    for name in ("config.json", "model.safetensors", "train.json"):
        shutil.copyfile(folder / name, out / name)
    print(f"test: {info['test_bits_per_byte']:.4f} bits per byte (perplexity "
          f"{info['test_perplexity']:.4f}); trained in {info['seconds']:.0f} s; wrote {out}")
    return info


def _check_lm_options(args) -> list[LMConfig]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in LM_METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; choose from "
                             f"{', '.join(LM_METHODS)}.")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in patterns:
        if ":" in p:
            common.nm_pattern(p, "--patterns")
        else:
            try:
                common.finite("patterns", float(p), 0.0, 1.0)
            except ValueError:
                raise ValueError(f"--patterns: {p!r} is neither a sparsity in [0, 1) nor "
                                 f"an N:M pattern like 2:4.") from None
    if not methods or not patterns:
        raise ValueError("--methods and --patterns need at least one value.")
    for name in ("calib", "val", "test", "batch", "max_iterations"):
        common.positive(name.replace("_", "-"), getattr(args, name))
    common.finite("damping", args.damping, 0.0)
    common.finite("step-size", args.step_size, 0.0)
    if args.step_size <= 0:
        raise ValueError(f"--step-size must be > 0; got {args.step_size}.")
    if args.model is not None and not (Path(args.model).expanduser() / "config.json").is_file():
        raise ValueError(f"--model: {args.model!r} is not a saved decoder folder.")
    if not args.no_plot:
        common.require_matplotlib("--no-plot")
    return lm_configs(methods, patterns, args.max_iterations)


def prune_lm_command(args: argparse.Namespace) -> list[dict]:
    from .models import load_decoder

    configs = _check_lm_options(args)
    out = common.out_dir(args.out)
    say = (lambda *a: None) if args.quiet else print
    if args.quick:
        args.calib, args.val, args.test = min(args.calib, 32), min(args.val, 16), min(
            args.test, 32)
    if args.model is not None:
        model = load_decoder(Path(args.model).expanduser())
    else:
        model = train_or_load(default_sizes(args.quick), progress=not args.quiet, say=say)[0]
    data = lm_data(model.config.max_seq_len, calib=args.calib, batch=args.batch, val=args.val,
                   test=args.test, seed=args.seed)
    say(f"{args.calib} calibration, {args.val} validation and {len(data.test_windows)} test "
        f"windows of {model.config.max_seq_len} bytes; {len(configs)} configurations")
    report = out / "report.json"
    records = run_lm_experiment(
        model, data, configs, damping=args.damping, step_size=args.step_size, say=say,
        on_record=lambda recs: common.write_text(report, json.dumps(recs, indent=2)))
    records += best_iterates(records)
    common.write_text(report, json.dumps(records, indent=2))
    text = table(records)
    common.write_text(out / "table.txt", text + "\n")
    print(text)
    if not args.no_plot:
        for path in plot(records, out / "prune_lm.png"):
            say(f"figure: {path}")
    print(f"wrote {report}")
    return records
