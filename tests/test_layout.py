"""The layout shows the design: floors only point down, no import cycles, lazy heavy
imports. (Static: the import statements of every module, top-level and deferred.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "iobs_jax"
# Lower floors know nothing of higher ones; packages on one floor do not import each other.
FLOOR = {"core": 0, "solvers": 1, "models": 1, "recovery": 2, "optax": 2, "pruning": 2,
         "experiments": 3, "cli": 4}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PKG.rglob("*.py"):
        name, found = _module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("iobs_jax"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                pytest.fail(f"{name}: relative import; the package uses absolute imports")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("iobs_jax"))
        graph[name] = found
    return {k: {m for m in v if m in graph} for k, v in graph.items()}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOOR else None


def test_floors_point_down():
    wrong = []
    for src, targets in _imports().items():
        a = _package(src)
        for dst in targets:
            b = _package(dst)
            if a is None or b is None or a == b:
                continue
            if FLOOR[b] >= FLOOR[a]:
                wrong.append(f"{src} imports {dst}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_lives_in_a_floor():
    top = sorted(p.name for p in PKG.glob("*.py"))
    # The top floor: the lazy front door, and the old iobs_jax.bert name (model + pruning).
    assert top == ["__init__.py", "bert.py"]


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.rsplit(".", 1)[0] == node or nxt == "iobs_jax":
                continue  # a package's own submodule / the front door
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_import_leaves_heavy_modules_out_and_old_names_work():
    code = (
        "import sys, iobs_jax, iobs_jax.optax, iobs_jax.corpus\n"
        "heavy = [m for m in ('flax', 'matplotlib', 'tokenizers', 'transformers') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import iobs_jax.problems, iobs_jax.recovery.problems, iobs_jax._prune\n"
        "import iobs_jax.pruning.driver\n"
        "assert iobs_jax.problems is iobs_jax.recovery.problems\n"
        "assert iobs_jax._prune is iobs_jax.pruning.driver\n"
        "from iobs_jax import sweep as sw\n"
        "assert sw.sweep is iobs_jax.recovery.grid.sweep\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
