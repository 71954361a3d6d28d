"""What users copy must run: the README's quick start and the examples."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]


def _run_readme_snippet(heading: str, index: int = 0) -> dict:
    """Execute the ``index``-th python block under ``heading`` in the README; its namespace."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[index]
    namespace: dict = {}
    exec(compile(code, f"README {heading}", "exec"), namespace)
    return namespace


def test_readme_quick_start_runs_and_converges():
    namespace = _run_readme_snippet("## Quick start")
    assert int(namespace["state"].status) == 0
    assert namespace["xs"].shape == (100, 128)
    assert bool(jnp.all(namespace["states"].status == 0))


def test_paper_synthetic_example_prints_iteration_counts():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "paper_synthetic.py"), "--trials", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[3:] if line}
    assert set(rows) == {"k-IHT (step 1/L)", "NIHT", "Topk-I-OBS (exact Hessian)"}
    iht_to_tol = float(rows["k-IHT (step 1/L)"][1])
    iobs_to_tol = float(rows["Topk-I-OBS (exact Hessian)"][1])
    assert 10 * iobs_to_tol <= iht_to_tol


def test_readme_pruning_snippets_run():
    report = _run_readme_snippet("## Pruning any JAX model", 1)["report"]
    assert abs(report.sparsity - 0.7) < 0.01 and len(report.layers) == 3
    hf = _run_readme_snippet("## Pruning any JAX model", 0)["report"]
    assert len(hf.layers) == 8 and abs(hf.sparsity - 0.5) < 1e-9  # 2 blocks x 4 maps
    assert [e.path for e in hf.skipped] == ["transformer/wpe/embedding",
                                            "transformer/wte/embedding"]


def test_readme_optax_snippet_runs():
    kernel = _run_readme_snippet("## Sparse training with Optax")["params"]["dense"]["kernel"]
    assert int(jnp.sum(kernel != 0)) == 3  # 10% of 32 kept
