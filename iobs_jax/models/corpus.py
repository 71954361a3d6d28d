"""An English text corpus that is on every machine: the Python standard library's docstrings.

For calibrating and evaluating pruned language models without downloads. The docstrings
of the stdlib's modules, classes and functions are read with :mod:`ast` (nothing is
imported), split into sentences, filtered to prose and deduplicated. Each sentence's
split is fixed by a hash of its text, so calibration and evaluation sets are disjoint and
a sentence never changes sides (different Python versions differ only in which sentences
exist). Within a split the order is the hash order: a fixed pseudo-random shuffle, so the
first ``n`` sentences sample the whole library.

Example::

    calib = stdlib_sentences("calibration", 512)
    held_out = stdlib_sentences("evaluation", 512)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from pathlib import Path

__all__ = ["stdlib_sentences", "split_sentences"]

SPLITS = ("calibration", "evaluation")
# Folders of the stdlib that hold tests, vendored code or non-prose docstrings.
_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
         "ensurepip", "__pycache__", "pydoc_data", "encodings"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z][a-z]+")


def split_sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of one docstring: paragraphs joined, split after ``.!?``, kept
    when they have ``min_words..max_words`` words, start with a capital letter, end with
    a full stop and are mostly words (no code, tables or doctests)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "$", "|", "+--", "--", "==")) for ln in
                            lines):
            continue
        for s in _SENTENCE_END.split(" ".join(lines)):
            s = s.strip()
            words = s.split()
            if not (min_words <= len(words) <= max_words):
                continue
            if not (s[0].isupper() and s.endswith(".")) or s.count("(") != s.count(")"):
                continue
            # Mostly plain words: no identifiers, markup or formulas.
            if sum(bool(_WORD.fullmatch(w.strip(",.;:()\"'"))) for w in words) < 0.8 * len(words):
                continue
            out.append(s)
    return out


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _hash(sentence: str) -> int:
    return int.from_bytes(hashlib.sha1(sentence.encode()).digest()[:8], "big")


@functools.lru_cache(maxsize=4)
def _all_sentences(root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    files = sorted(
        p for p in Path(root).rglob("*.py")
        if not _SKIP.intersection(p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
    )
    seen: set[str] = set()
    for path in files:
        for doc in _docstrings(path):
            seen.update(split_sentences(doc))
    ordered = sorted(seen, key=lambda s: (_hash(s), s))
    calib = tuple(s for s in ordered if _hash(s) % 2 == 0)
    evals = tuple(s for s in ordered if _hash(s) % 2 == 1)
    return calib, evals


def stdlib_sentences(split: str = "calibration", n: int | None = None, *,
                     root: str | Path | None = None) -> list[str]:
    """The first ``n`` sentences (all when None) of one split of the stdlib corpus.

    Args:
      split: ``"calibration"`` or ``"evaluation"`` (disjoint, fixed per sentence).
      n: how many; ValueError if the split has fewer.
      root: the standard library folder (default: this interpreter's, from
        :mod:`sysconfig`).

    Returns:
      A list of distinct English sentences (6 to 40 words each).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {str(root)!r} not found.")
    sentences = _all_sentences(str(root.resolve()))[SPLITS.index(split)]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}.")
        if n > len(sentences):
            raise ValueError(f"the {split} split has {len(sentences)} sentences; asked for {n}.")
        sentences = sentences[:n]
    return list(sentences)
