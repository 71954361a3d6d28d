"""What every ``iobs-jax`` subcommand shares: option checks, output files, the cache.

Importing this module is cheap (no JAX): the parsers and ``--help`` use it. Errors are
``ValueError`` naming the option (``--sparsity``, ``--data``), which ``_cli.main`` prints as
one line with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

from iobs_jax.core.files import (  # noqa: F401 (used by the commands)
    CACHE_ENV,
    atomic_path,
    cache_dir,
    write_text,
)


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand takes (argparse ``parents=``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-cache", action="store_true",
                        help="do not use the persistent compilation cache (default: "
                             f"${CACHE_ENV}, else $XDG_CACHE_HOME/iobs_jax/jax or "
                             "~/.cache/iobs_jax/jax)")
    return common


def positive(name: str, value: int | None, low: int = 1) -> None:
    if value is not None and value < low:
        raise ValueError(f"--{name} must be >= {low}; got {value}.")


def finite(name: str, value: float, low: float | None = None,
           high: float | None = None) -> None:
    """``value`` finite and in ``[low, high)``, else a ValueError naming ``--name``."""
    ok = math.isfinite(value) and (low is None or value >= low) and (
        high is None or value < high)
    if ok:
        return
    if high is None:
        want = "a finite number" + (f" >= {low:g}" if low is not None else "")
    else:
        want = f"in [{low:g}, {high:g})"
    raise ValueError(f"--{name} must be {want}; got {value}.")


def nm_pattern(text: str, option: str = "--pattern") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)`` with ``0 < n < m``, or a ValueError naming ``option``."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"{option}: {text!r} is not an N:M pattern with 0 < N < M, like 2:4.")
    return int(match.group(1)), int(match.group(2))


def out_dir(path: str) -> Path:
    """Create ``--out`` and check that it is writable, before any work."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".iobs-jax-write-test").close()
    except OSError as err:
        raise ValueError(f"--out: cannot write to {str(out)!r} ({err.strerror}).") from None
    return out


def enable_compilation_cache(path: Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (the CLI does unless ``--no-cache``).

    Compiled programs are written to ``path`` (default :func:`cache_dir`) and reused by
    later runs. JAX writes only programs that took over a second to compile and skips
    small entries by default; on CPU most are faster and smaller, so both thresholds are
    lowered to cache everything. Returns the folder, or None if it cannot be created
    (then the run goes on without a cache). The same three settings enable it in user
    code: ``jax.config.update("jax_compilation_cache_dir", path)``,
    ``jax_persistent_cache_min_compile_time_secs`` 0 and
    ``jax_persistent_cache_min_entry_size_bytes`` -1.
    """
    import jax

    path = cache_dir() if path is None else Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def require_matplotlib(option: str = "--no-plots") -> None:
    """Check up front that figures can be drawn, not after minutes of computing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"figures need matplotlib, which is not installed: pip install "
                         f"matplotlib (a dependency of iobs_jax), or pass {option}.")


def load_mnist_data(path: str | None, quiet: bool):
    """MNIST from ``--data`` (default: the packaged test set); a bad path is a ValueError."""
    from iobs_jax.models import mnist

    try:
        return mnist.load_mnist(path, verbose=not quiet)
    except FileNotFoundError as err:
        raise ValueError(f"--data: {err}".replace("(path; --data on the command line)",
                                                  "(--data)")) from None
