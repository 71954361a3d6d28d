"""Prune a trained MNIST MLP with magnitude, SparseGPT and I-OBS; compare test accuracy.

    python examples/prune_mnist.py --data ../shared/data/mnist --sparsity 0.7

Without --data the loader uses $IOBS_JAX_DATA or a packaged MNIST subset (it says which).
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
    args = parser.parse_args()

    data = mnist.load_mnist(args.data)
    train, test = mnist.split_train_test(data, min(args.train, len(data.labels) - 500))
    model = mnist.MLP()
    params = mnist.train_classifier(model, train.images, train.labels,
                                    key=jax.random.key(0), epochs=args.epochs)
    dense = mnist.accuracy(model, params, test.images, test.labels)
    print(f"dense test accuracy {100 * dense:.2f}%")

    # Calibration: 1,000 training images in batches of 250 (each a model input).
    calib = [train.images[i : i + 250] for i in range(0, 1000, 250)]
    for method, extra in [("magnitude", {}), ("sparsegpt", {}), ("iobs", {}),
                          ("iobs", {"rounds": 4})]:
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
