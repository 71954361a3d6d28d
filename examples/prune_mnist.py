"""Prune a trained MNIST MLP with magnitude, SparseGPT and I-OBS; compare test accuracy.

    python examples/prune_mnist.py [--quick] [--sparsity 0.7] [--data DIR]

Without --data the loader uses $IOBS_JAX_DATA, else the 10,000 MNIST test images shipped
with the package (8,000 train, the rest test). Takes about 2 minutes on 2 CPU cores
(10 epochs and four pruning runs); ``--quick`` (2 epochs, magnitude and I-OBS) about 40 s.
"""

import argparse
import time

import jax

import iobs_jax
from iobs_jax import mnist


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="directory with the MNIST idx files")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--quick", action="store_true", help="2 epochs, two methods")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2

    data = mnist.load_mnist(args.data)
    train, test = mnist.split_train_test(data, min(args.train, len(data.labels) - 500))
    model = mnist.MLP()
    params = mnist.train_classifier(model, train.images, train.labels,
                                    key=jax.random.key(0), epochs=args.epochs,
                                    progress=True)
    dense = mnist.accuracy(model, params, test.images, test.labels)
    print(f"dense test accuracy {100 * dense:.2f}%")

    # Calibration: 1,000 training images in batches of 250 (each a model input).
    calib = [train.images[i : i + 250] for i in range(0, 1000, 250)]
    runs = [("magnitude", {}), ("sparsegpt", {}), ("iobs", {}), ("iobs", {"rounds": 4})]
    for method, extra in runs[::2] if args.quick else runs:
        start = time.perf_counter()
        pruned, report = iobs_jax.prune(model, params, calib, sparsity=args.sparsity,
                                        method=method, **extra)
        acc = mnist.accuracy(model, pruned, test.images, test.labels)
        name = method + (f" (rounds={extra['rounds']})" if extra else "")
        print(f"{name:<20} sparsity {report.sparsity:.2f}  accuracy {100 * acc:6.2f}%  "
              f"layer loss {report.total_loss:.3e}  {time.perf_counter() - start:5.1f} s")
    print(report.summary())


if __name__ == "__main__":
    main()
