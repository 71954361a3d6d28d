"""Models to prune and study. Models know nothing of pruning.

- :mod:`.mnist`: MNIST loading (the packaged test set, no downloads), the MLP and CNN,
  training and evaluation.
- :mod:`.bert`: a Flax BERT encoder that loads BERT-style safetensors checkpoints.
- :mod:`.corpus`: stdlib-docstring sentences with a fixed calibration/evaluation split.
- :mod:`.decoder`, :mod:`.text`, :mod:`.train`: a byte-level Llama-style decoder, its
  text and its training.

Names are imported on first use, so ``iobs_jax.models.corpus`` does not load Flax.
"""

import importlib
from typing import Any

_NAMES = {
    ".decoder": ("Decoder", "DecoderConfig", "load_decoder", "next_byte_loss", "save_decoder"),
    ".text": ("ByteTokenizer", "random_windows", "sequential_windows", "stdlib_source"),
    ".train": ("TrainConfig", "bits_per_byte", "evaluate", "train_decoder", "window_nll"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = ["Decoder", "DecoderConfig", "load_decoder", "save_decoder", "next_byte_loss",
           "ByteTokenizer", "stdlib_source", "random_windows", "sequential_windows",
           "TrainConfig", "train_decoder", "evaluate", "window_nll", "bits_per_byte"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'iobs_jax.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
