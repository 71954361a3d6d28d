"""Models to prune and study: a byte-level Llama-style decoder (:mod:`.decoder`), its
text (:mod:`.text`) and its training (:mod:`.train`). Models know nothing of pruning."""

from .decoder import Decoder, DecoderConfig, load_decoder, next_byte_loss, save_decoder
from .text import ByteTokenizer, random_windows, sequential_windows, stdlib_source
from .train import TrainConfig, bits_per_byte, evaluate, train_decoder

__all__ = ["Decoder", "DecoderConfig", "load_decoder", "save_decoder", "next_byte_loss",
           "ByteTokenizer", "stdlib_source", "random_windows", "sequential_windows",
           "TrainConfig", "train_decoder", "evaluate", "bits_per_byte"]
