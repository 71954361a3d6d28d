"""The ``iobs-jax`` command line tool.

``iobs-jax prune``: train (or load) an MNIST model, prune it with calibration data,
evaluate, save the pruned parameters with their masks, reload them and verify.
Every failure is one line on stderr (exit status 2), never a traceback; Ctrl-C stops
with one line and exit status 130, leaving only complete files behind. Every option is
checked before any work. JAX's persistent compilation cache is on (``--no-cache``: off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from iobs_jax.cli import common
from iobs_jax.cli import lm as _cli_lm
from iobs_jax.cli import sweep as _cli_sweep
from iobs_jax.cli import transformer as _cli_transformer

_METHODS = ("magnitude", "wanda", "sparsegpt", "obc", "iobs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iobs-jax",
        description="Sparse optimization with second-order information (I-OBS) in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "prune", parents=[common.common_parser()],
        help="train or load an MNIST model, prune it, evaluate, save and verify",
        description=(
            "Train (or load with --params) an MNIST classifier, prune its Dense/Conv layers "
            "with calibration images, report test accuracy and per-layer losses, and write "
            "pruned.npz (parameters + masks) and report.json into --out."
        ),
    )
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: 784-300-100-10; cnn: two 3x3 convs + two dense (default mlp)")
    p.add_argument("--data", default=None,
                   help="directory with the MNIST idx(.gz) files (default: $IOBS_JAX_DATA, "
                        "else a packaged subset)")
    p.add_argument("--params", default=None,
                   help="load trained parameters from this .npz (written by an earlier run "
                        "as dense.npz) instead of training")
    p.add_argument("--train", type=int, default=8000,
                   help="images used for training; the rest are the test set (default 8000)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for training (default 0)")
    p.add_argument("--method", choices=_METHODS, default="iobs", help="pruning method")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed per layer, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (instead of "
                   "--sparsity)")
    p.add_argument("--scope", choices=("layer", "row", "global"), default=None,
                   help="where the mask is chosen (default: the method's own)")
    p.add_argument("--rounds", type=int, default=1,
                   help="iobs: reach the support in this many rounds (default 1)")
    p.add_argument("--calib", type=int, default=None,
                   help="calibration images taken from the training set, at most --train "
                        "(default 1000, or --train if smaller)")
    p.add_argument("--calib-batch", type=int, default=250,
                   help="calibration batch size (default 250)")
    p.add_argument("--damping", type=float, default=0.01,
                   help="relative Hessian damping (default 0.01)")
    p.add_argument("--no-sequential", action="store_true",
                   help="use the dense model's activations for every layer (faster)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the final line (no progress bars)")
    p.set_defaults(func=prune_command)
    # Other subcommands live in their own modules: each has register(sub), which adds its
    # parser and sets func=... (one line per module here).
    _cli_sweep.register(sub)
    _cli_transformer.register(sub)
    _cli_lm.register(sub)
    return parser


def _positive(name: str, value: int, low: int = 1) -> None:
    common.positive(name, value, low)


def _out_dir(path: str) -> Path:
    return common.out_dir(path)


_LAYER_INPUTS = {"mlp": (784, 300, 100), "cnn": (9, 144, 1568, 128)}


def _check_prune_options(args: argparse.Namespace) -> None:
    """Everything ``prune`` would refuse, checked before the data is read or a model
    trained (the pruning engine checks the same again)."""
    for name in ("train", "calib", "calib_batch", "rounds"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("epochs", args.epochs, 0)
    if args.calib is None:
        args.calib = min(1000, args.train)
    elif args.calib > args.train:
        raise ValueError(f"--calib ({args.calib}) must be <= --train ({args.train}): the "
                         f"calibration images are taken from the training images.")
    common.finite("damping", args.damping, 0.0)
    if args.sparsity is not None:
        common.finite("sparsity", args.sparsity, 0.0, 1.0)
    if args.params and not Path(args.params).expanduser().is_file():
        raise ValueError(f"--params: no such file {args.params!r}.")
    if args.rounds > 1 and args.method != "iobs":
        raise ValueError(f"--rounds is for --method iobs; got --method {args.method}.")
    scope = args.scope or ("row" if args.method == "obc" else None)
    if args.method == "obc" and scope == "layer":
        raise ValueError("--method obc prunes each row to the same sparsity: use --scope row "
                         "or global.")
    if args.pattern is None:
        return
    n, m = common.nm_pattern(args.pattern)
    if args.sparsity is not None:
        raise ValueError(f"--sparsity and --pattern exclude each other ({n}:{m} removes "
                         f"{1 - n / m:g} of the weights); pass one.")
    if args.method == "obc":
        raise ValueError("--method obc prunes unstructured rows; use iobs or sparsegpt with "
                         "--pattern.")
    if scope == "global":
        raise ValueError("--scope global needs unstructured sparsity (--sparsity), not "
                         "--pattern.")
    bad = [c for c in _LAYER_INPUTS[args.model] if c % m]
    if bad:
        raise ValueError(f"--pattern {n}:{m}: the {args.model} has a layer with {bad[0]} "
                         f"inputs, not a multiple of {m}; use an M that divides "
                         f"{', '.join(map(str, _LAYER_INPUTS[args.model]))}.")


def _model_params(args, model, train, out: Path, say):
    """Trained (or loaded, ``--params``) parameters; training writes ``dense.npz``."""
    import jax

    from iobs_jax.models import mnist
    from iobs_jax.pruning import checkpoint as _checkpoint

    if args.params:
        try:
            params, _ = _checkpoint.load_params(Path(args.params).expanduser())
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--params: cannot read {args.params!r} as parameters saved by "
                             f"iobs-jax ({err}).") from None
        return jax.tree.map(jax.numpy.asarray, params)
    t0 = time.perf_counter()
    params = mnist.train_classifier(model, train.images, train.labels,
                                    key=jax.random.key(args.seed), epochs=args.epochs,
                                    progress=not args.quiet)
    _checkpoint.save_params(out / "dense.npz", params)
    say(f"trained {args.model} for {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")
    return params


def prune_command(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from iobs_jax.models import mnist
    from iobs_jax.pruning import checkpoint as _checkpoint
    from iobs_jax.pruning.driver import prune

    _check_prune_options(args)
    out = _out_dir(args.out)
    say = (lambda *a: None) if args.quiet else print
    data = common.load_mnist_data(args.data, args.quiet)
    if args.train >= len(data.labels):
        raise ValueError(f"--train must be < the {len(data.labels)} images available (the "
                         f"rest is the test set); got {args.train}.")
    train, test = mnist.split_train_test(data, args.train)
    model = mnist.MLP() if args.model == "mlp" else mnist.CNN()
    params = _model_params(args, model, train, out, say)
    dense_acc = mnist.accuracy(model, params, test.images, test.labels)
    calib = train.images[: args.calib]
    batches = [calib[i : i + args.calib_batch] for i in range(0, len(calib), args.calib_batch)]
    pruned, report = prune(
        model, params, batches, sparsity=args.sparsity, method=args.method,
        pattern=args.pattern, scope=args.scope, rounds=args.rounds, damping=args.damping,
        sequential=not args.no_sequential, verbose=not args.quiet,
    )
    acc = mnist.accuracy(model, pruned, test.images, test.labels)
    say(report.summary())
    path = out / "pruned.npz"
    _checkpoint.save_params(path, pruned, report.masks)
    # Reload and verify: same accuracy, zeros exactly off the masks.
    loaded, masks = _checkpoint.load_params(path)
    reloaded_acc = mnist.accuracy(model, loaded, test.images, test.labels)
    zeros_ok = all(
        bool(np.all(np.asarray(p)[~np.asarray(m)] == 0))
        for p, m in zip(jax.tree.leaves(loaded), jax.tree.leaves(masks), strict=True)
    )
    if reloaded_acc != acc or not zeros_ok:
        raise RuntimeError(f"verification of {path} failed (accuracy {reloaded_acc} vs {acc}).")
    result = {
        "model": args.model, "method": args.method, "sparsity": report.sparsity,
        "pattern": args.pattern, "dense_accuracy": dense_acc, "pruned_accuracy": acc,
        "total_layer_loss": report.total_loss, "prune_seconds": report.time_s,
        "data": data.source, "layers": [r._asdict() for r in report.layers],
        "saved": str(path), "verified": True,
    }
    common.write_text(out / "report.json", json.dumps(result, indent=2))
    print(f"{args.model} {args.method}: sparsity {report.sparsity:.3f}, test accuracy "
          f"{100 * acc:.2f}% (dense {100 * dense_acc:.2f}%), saved and verified {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.no_cache:
            common.enable_compilation_cache()
        args.func(args)
    except KeyboardInterrupt:
        # Finished outputs were written atomically as they completed; nothing is partial.
        print(f"iobs-jax {args.command}: interrupted (finished results are in --out)",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"iobs-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
