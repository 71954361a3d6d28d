"""``iobs-jax train-lm`` and ``iobs-jax prune-lm``: the paper's LLM experiment, small.

``train-lm`` trains the byte-level decoder (:mod:`iobs_jax.models`) on the standard
library's source and caches it; ``prune-lm`` prunes every linear map of it with
:func:`iobs_jax.prune` (sequential, 128 random training windows of calibration) and
reports perplexity on non-overlapping test windows, as the LLM pruning papers do.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from iobs_jax.cli import common
from iobs_jax.experiments.decoder_lm import (  # noqa: F401 (also re-exported: their old home)
    DEFAULT_PATTERNS,
    LM_METHODS,
    LMConfig,
    LMData,
    LMSizes,
    _prune_kwargs,
    _scores,
    best_iterates,
    choose_scopes,
    default_sizes,
    lm_cache,
    lm_configs,
    lm_data,
    model_key,
    plot,
    run_lm_experiment,
    table,
    train_or_load,
)

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
            "runs 1..--max-iterations iterations; the count kept (iobs-best) is the fewest "
            "within one standard error of the best on validation windows; magnitude and "
            "Wanda run per layer and per row, the group kept chosen the same way. Writes "
            "report.json, a table and two figures to --out."),
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
    p.add_argument("--val", type=int, default=128,
                   help="random validation windows that pick the I-OBS iterate kept: the "
                        "fewest iterations within one standard error of the best "
                        "(default 128)")
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
    for name in ("calib", "test", "batch", "max_iterations"):
        common.positive(name.replace("_", "-"), getattr(args, name))
    common.positive("val", args.val, 2)  # a standard error needs two windows
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
    from iobs_jax.models import load_decoder

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
    records = choose_scopes(records) + best_iterates(records)
    common.write_text(report, json.dumps(records, indent=2))
    text = table(records)
    common.write_text(out / "table.txt", text + "\n")
    print(text)
    if not args.no_plot:
        for path in plot(records, out / "prune_lm.png"):
            say(f"figure: {path}")
    print(f"wrote {report}")
    return records
