"""What users copy must run: the README's quick start and the examples."""

import os
import re
import sys
from pathlib import Path

import jax.numpy as jnp
from conftest import background_result

ROOT = Path(__file__).resolve().parents[1]


def _blocks(page: str, heading: str | None = None) -> list[str]:
    """The python blocks of ``page`` (under ``heading`` only, if given)."""
    text = (ROOT / page).read_text()
    if heading is not None:
        text = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0].split("\n# ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(code: str, name: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_readme_examples_run_in_order():
    """Every python block of the README, one after the other in one namespace (each
    builds on the names of the ones before, as a reader running them would)."""
    blocks = _blocks("README.md")
    assert len(blocks) == 4
    ns: dict = {}
    for i, code in enumerate(blocks):
        _run(code, f"README block {i}", ns)
    assert int(ns["state"].status) == 0
    assert ns["xs"].shape == (100, 128)
    assert bool(jnp.all(ns["states"].status == 0))
    assert len(ns["res"].rows) == 4 * 2  # 2 x 2 cells, 2 solvers
    assert abs(ns["report"].sparsity - 0.7) < 0.01 and len(ns["report"].layers) == 2
    kernels = [p["kernel"] for p in ns["params"].values()]
    zeros = sum(int(jnp.sum(k == 0)) for k in kernels)
    assert abs(zeros / sum(k.size for k in kernels) - 0.9) < 0.01


def background_jobs():
    """Run beside the other tests from collection on (see conftest.background_result)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    argv = [sys.executable, str(ROOT / "examples" / "paper_synthetic.py"), "--trials", "1"]
    return {"paper-example": (argv, env)}


def test_paper_synthetic_example_prints_iteration_counts():
    done = background_result("paper-example", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[3:] if line}
    assert set(rows) == {"k-IHT (step 1/L)", "NIHT", "Topk-I-OBS (exact Hessian)"}
    iht_to_tol = float(rows["k-IHT (step 1/L)"][1])
    iobs_to_tol = float(rows["Topk-I-OBS (exact Hessian)"][1])
    assert 10 * iobs_to_tol <= iht_to_tol


def test_pruning_guide_snippets_run():
    report = _run(_blocks("docs/pruning.md", "# Pruning any JAX model")[1], "pruning 1")["report"]
    assert abs(report.sparsity - 0.7) < 0.01 and len(report.layers) == 3
    hf = _run(_blocks("docs/pruning.md", "# Pruning any JAX model")[0], "pruning 0")["report"]
    assert len(hf.layers) == 8 and abs(hf.sparsity - 0.5) < 1e-9  # 2 blocks x 4 maps
    assert [e.path for e in hf.skipped] == ["transformer/wpe/embedding",
                                            "transformer/wte/embedding"]


def test_optax_guide_snippet_runs():
    kernel = _run(_blocks("docs/optax.md")[0], "optax guide")["params"]["dense"]["kernel"]
    assert int(jnp.sum(kernel != 0)) == 3  # 10% of 32 kept


def test_every_relative_link_of_the_docs_points_to_a_file():
    """README and docs/ link each other and the benchmarks' pages and figures: a page that
    moves or a benchmark that stops writing its page breaks a link, caught here."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    written = ["convergence.md", "prune_mnist.md", "minilm_results.md", "prune_any.md",
               "prune_lm.md", "sparse_training.md", "layerwise.md"]
    for name in written:  # the pages the benchmarks write say which one wrote them
        text = (ROOT / "docs" / name).read_text()
        assert re.search(r"(Written|Generated) by `benchmarks/\w+\.py`", text), name
