"""Bytes as tokens, and a text corpus every machine has: the Python standard library.

:class:`ByteTokenizer` maps text to its UTF-8 bytes (256 tokens, no vocabulary file).
:func:`stdlib_source` reads the standard library's ``.py`` files (found with
``sysconfig``, ``site-packages`` left out) as one byte string per split; each file
belongs to ``train`` (90%), ``validation`` (5%) or ``test`` (5%) by a SHA-1 hash of its
path relative to the library root, so the splits are disjoint and a file never changes
sides. :func:`random_windows` and :func:`sequential_windows` cut them into
``(N, length + 1)`` windows (inputs are ``w[:, :-1]``, next-byte targets ``w[:, 1:]``).

Example:
  >>> ByteTokenizer().encode("hé")
  array([104, 195, 169], dtype=int32)
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

__all__ = ["ByteTokenizer", "stdlib_source", "random_windows", "sequential_windows", "SPLITS"]

SPLITS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str; got {type(text).__name__}.")
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("byte ids must be in [0, 255].")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _bucket(relative: str) -> int:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 100


@functools.lru_cache(maxsize=4)
def stdlib_source(split: str = "train", root: str | None = None) -> np.ndarray:
    """The bytes of every standard-library ``.py`` file of ``split``, concatenated
    (files in sorted path order, each followed by a blank line), as a uint8 array."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {base}.")
    low, high = SPLITS[split]
    chunks = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if low <= _bucket(rel) < high:
            try:
                chunks.append(path.read_bytes() + b"\n\n")
            except OSError:
                continue  # unreadable files are skipped, the split stays deterministic
    if not chunks:
        raise FileNotFoundError(f"no .py files of split {split!r} under {base}.")
    return np.frombuffer(b"".join(chunks), np.uint8)


def random_windows(data: np.ndarray, count: int, length: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """``count`` windows of ``length + 1`` bytes at uniform random offsets (int32)."""
    if data.size <= length + 1:
        raise ValueError(f"the corpus has {data.size} bytes; windows need {length + 2}.")
    start = rng.integers(0, data.size - length - 1, size=count)
    return data[start[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)


def sequential_windows(data: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``length + 1`` bytes from the start (the first ``limit``);
    consecutive windows share their boundary byte, so every byte after the first is a
    target exactly once."""
    count = (data.size - 1) // length
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"the corpus has {data.size} bytes; one window needs {length + 1}.")
    start = np.arange(count) * length
    return data[start[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)
