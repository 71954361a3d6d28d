"""Layer-wise pruning on white inputs: how close any mask can get to SparseGPT's loss.

With inputs ``X`` (``n`` samples of ``d`` independent standard normal features) the
layer Hessian ``H = X^T X / n`` tends to the identity as ``n / d`` grows. For ``H = I``
the loss of a mask is the sum of the removed ``w^2``, whatever the refit: magnitude is
optimal and every method's loss tends to the same number, so no method can stay a fixed
factor below SparseGPT's loss on such layers. This measures the ratio to our
``sparsegpt`` (equal to the reference up to round-off, tested) of our default ``iobs``,
of exact greedy OBS per row (``obc``, ``O(rows d^3)``) and of per-row magnitude, for
``n / d`` in ``--ratios``, at 50%, 70% and 2:4 (float64, ``H + 1% mean(diag H) I`` for
every method; losses with the undamped ``H``).

    python benchmarks/white_inputs.py [--rows 64] [--cols 256] [--ratios 1,4,16,64]
        [--docs docs/white_inputs.md]

Takes about a minute on 2 CPU cores. Writes ``docs/white_inputs.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from iobs_jax.pruning import layerwise  # noqa: E402

PATTERNS = (("50%", 0.5, None), ("70%", 0.7, None), ("2:4", 0.5, (2, 4)))


def layer_loss(w0: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    """``tr((W - W0) H (W - W0)^T)``: the layer's output error on its inputs."""
    e = np.asarray(w) - w0
    return float(np.einsum("ij,jk,ik->", e, h, e))


def ratios_for(w0: np.ndarray, h: np.ndarray) -> dict[str, dict[str, float]]:
    """``{pattern: {method: loss / sparsegpt's loss}}`` for one layer."""
    damped = np.asarray(layerwise.damp_hessian(h, 0.01))
    out = {}
    for name, sparsity, nm in PATTERNS:
        kw = {} if nm is None else {"nm": nm}
        base = layer_loss(w0, layerwise.sparsegpt(w0, damped, sparsity, **kw)[0], h)
        row = {"iobs": layer_loss(w0, layerwise.iobs(w0, damped, sparsity, **kw)[0], h)}
        if nm is None:  # OBC and per-row magnitude have no N:M form here
            row["obc"] = layer_loss(w0, layerwise.obc(w0, damped, sparsity)[0], h)
            row["magnitude (row)"] = layer_loss(
                w0, layerwise.magnitude(w0, damped, sparsity, scope="row")[0], h)
        out[name] = {m: v / base for m, v in row.items()}
    return out


def markdown(table: dict[int, dict], args) -> str:
    lines = [
        "# Layer-wise pruning on white inputs",
        "",
        "Written by `benchmarks/white_inputs.py` (do not edit by hand). A "
        f"{args.rows} x {args.cols} Gaussian layer, inputs of {args.cols} independent "
        "standard normal features, `n` samples; each cell is a method's layer loss over "
        "our SparseGPT's (same damping, float64). As `n / d` grows, `H` tends to the "
        "identity and every ratio tends to 1: on such layers no method, exact greedy OBS "
        "(OBC) included, stays a fixed factor below SparseGPT.",
        "",
        "| n / d | pattern | iobs | obc | magnitude (row) |",
        "|---|---|---|---|---|",
    ]
    for ratio, by_pattern in table.items():
        for name, row in by_pattern.items():
            cells = [f"{row[m]:.3f}" if m in row else "-"
                     for m in ("iobs", "obc", "magnitude (row)")]
            lines.append(f"| {ratio} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--ratios", default="1,4,16,64", help="sample counts n as n / d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", default=str(Path(__file__).parents[1] / "docs" /
                                               "white_inputs.md"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    w0 = rng.standard_normal((args.rows, args.cols))
    table = {}
    for ratio in (int(r) for r in args.ratios.split(",")):
        x = rng.standard_normal((ratio * args.cols, args.cols))
        table[ratio] = ratios_for(w0, x.T @ x / len(x))
        print(ratio, {p: {m: round(v, 3) for m, v in r.items()}
                      for p, r in table[ratio].items()}, flush=True)
    text = markdown(table, args)
    Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
    Path(args.docs).write_text(text)
    print(text + f"wrote {args.docs}")
    return table


if __name__ == "__main__":
    main()
