"""Every docstring example in the package runs, and prints what it says it prints.

Examples are written for a user's default JAX (float32), so they run with x64 off.
An example that needs a long run or files (a sweep of 100 trials, MiniLM) says so with
``# doctest: +SKIP`` on that line.
"""

import doctest
import importlib
import pkgutil

import jax
import pytest

import iobs_jax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(iobs_jax.__path__, "iobs_jax.")
    if ".cli" not in m.name and ".experiments" not in m.name
)


def _has_examples(name: str) -> bool:
    module = importlib.import_module(name)
    return any(t.examples for t in doctest.DocTestFinder().find(module))


@pytest.mark.parametrize("name", [m for m in MODULES if _has_examples(m)])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    with jax.enable_x64(False):
        result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
