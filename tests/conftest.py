"""Test configuration: float64 everywhere (oracles compare to exact answers).

Tests that check dtype preservation create float32 inputs explicitly.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# The suite's time is XLA compiling thousands of small programs. Without most of XLA's
# optimization passes they compile about 30% faster (8.4 s -> 5.7 s for four solvers and
# two layer-wise methods, measured on 2 cores) and these small problems run as fast. The
# tests that start their own Python (sharding, examples, commands) compile as users do,
# fully optimized.
jax.config.update("jax_disable_most_optimizations", True)


# One persistent compilation cache for the whole test session, in a folder of its own
# (never the user's ``~/.cache/iobs_jax``: entries written by other runs, versions or
# flags are never read here). Tests build fresh ``jax.jit`` wrappers of the same
# programs again and again (every solver test, every CLI call); with the cache, the
# second build loads the executable instead of compiling it: test_solvers.py went from
# 238 s to 166 s on 2 cores. The CLI's own cache (``IOBS_JAX_CACHE_DIR``) is this folder.
# With pytest-xdist the workers share the folder of the process that started them (they
# inherit its environment), and only that process removes it.
_OWN_CACHE = "IOBS_JAX_TEST_CACHE" not in os.environ
_CACHE_DIR = os.environ.setdefault("IOBS_JAX_TEST_CACHE",
                                   tempfile.mkdtemp(prefix="iobs_jax_test_cache_"))
os.environ["IOBS_JAX_CACHE_DIR"] = _CACHE_DIR
_WORKER = "PYTEST_XDIST_WORKER" in os.environ


def _use_session_cache() -> None:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_use_session_cache()


def pytest_unconfigure(config):
    _stop_jobs()
    if _OWN_CACHE:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _session_cache_after_each_test():
    """A test may turn the cache off or point it elsewhere (the CLI's ``--no-cache``);
    the next test finds the session's cache again."""
    yield
    if jax.config.jax_compilation_cache_dir != _CACHE_DIR:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
        _use_session_cache()


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _free_compiled_programs():
    """Every compiled XLA:CPU program keeps its code in memory maps for as long as a jit
    cache holds it, and the suite compiles thousands: one process reached Linux's limit
    of 65,530 maps (vm.max_map_count) after ~350 tests and aborted inside XLA. Past
    30,000 maps JAX's caches are cleared (the next tests recompile what they use; clearing
    after every module instead cost 25% of the suite's time)."""
    yield
    if _memory_maps() > 30_000:
        jax.clear_caches()


# ------------------------------------------- long subprocess checks, run in the background

# In one process (``-n 0``) the suite keeps one core busy (compiling) and the second one
# mostly idle: measured 1.2 cores used on 2. There the few checks that start their own
# Python (4 forced devices, an example script) start as soon as the tests are collected
# and run beside the others; their tests then only wait for the result. Under xdist (the
# default: pyproject's addopts) they start when their test asks. A module opts in with a
# function ``background_jobs() -> {name: (argv, env)}``; only jobs of collected modules
# start.
_JOBS: dict = {}


class Job:
    def __init__(self, argv, env):
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.out.seek(0)
        self.err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read(), self.err.read())


def _module_jobs(module) -> dict:
    return getattr(module, "background_jobs", dict)()


def pytest_collection_modifyitems(session, config, items):
    if _WORKER:  # every xdist worker collects every test: the jobs start where they are used
        return
    for module in {item.module for item in items if hasattr(item, "module")}:
        for name, (argv, env) in _module_jobs(module).items():
            _JOBS.setdefault(name, Job(argv, env))


def background_result(name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The finished job ``name`` of the calling test module's ``background_jobs()``
    (started now if it was not started at collection)."""
    if name not in _JOBS:
        module = sys.modules[sys._getframe(1).f_globals["__name__"]]
        _JOBS[name] = Job(*_module_jobs(module)[name])
    return _JOBS[name].result(timeout)


def _stop_jobs() -> None:
    for job in _JOBS.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_spd(rng, d, n=None, ridge=0.0):
    """A random symmetric positive definite matrix X^T X / n (+ ridge I), float64."""
    n = 2 * d if n is None else n
    x = rng.normal(size=(n, d))
    return x.T @ x / n + ridge * np.eye(d)


def idx_bytes(arr, magic):
    dims = np.asarray(arr.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + arr.astype(np.uint8).tobytes()


def write_idx_split(directory, split, n=7, seed=0, gz=True):
    """Write a tiny idx image/label pair; returns (images uint8 (n, 28, 28), labels (n,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "t10k" if split == "test" else "train"
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        name = directory / f"{prefix}-{kind}-ubyte"
        data = idx_bytes(arr, magic)
        if gz:
            with gzip.open(str(name) + ".gz", "wb") as f:
                f.write(data)
        else:
            name.write_bytes(data)
    return images, labels


# ------------------------------------------------------------------ a tiny BERT checkpoint

WORDS = ("the a cat dog sat on mat warm quiet man is playing guitar street return value "
         "of function list file read write data and or not if this that with from by "
         "to for each new old open close").split()
TINY_BERT = dict(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert")


def write_tiny_checkpoint(path: Path, seed: int = 0) -> dict:
    """A random BERT in Hugging Face layout; returns its tensors."""
    rng = np.random.default_rng(seed)
    c = TINY_BERT
    d, inner = c["hidden_size"], c["intermediate_size"]
    t = {}

    def lin(name, n_out, n_in):
        t[name + ".weight"] = rng.normal(0, 0.2, (n_out, n_in)).astype(np.float32)
        t[name + ".bias"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)

    def norm(name):
        t[name + ".weight"] = (1 + 0.1 * rng.normal(size=d)).astype(np.float32)
        t[name + ".bias"] = (0.1 * rng.normal(size=d)).astype(np.float32)

    t["embeddings.word_embeddings.weight"] = rng.normal(size=(c["vocab_size"], d)).astype(
        np.float32)
    t["embeddings.position_embeddings.weight"] = rng.normal(
        size=(c["max_position_embeddings"], d)).astype(np.float32)
    t["embeddings.token_type_embeddings.weight"] = rng.normal(size=(2, d)).astype(np.float32)
    norm("embeddings.LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            lin(p + "attention.self." + name, d, d)
        lin(p + "attention.output.dense", d, d)
        norm(p + "attention.output.LayerNorm")
        lin(p + "intermediate.dense", inner, d)
        lin(p + "output.dense", d, inner)
        norm(p + "output.LayerNorm")
    t["pooler.dense.weight"] = np.zeros((d, d), np.float32)  # ignored by the encoder
    path.mkdir(parents=True, exist_ok=True)
    import tokenizers
    from safetensors.numpy import save_file

    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    return t



@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """(folder, tensors) of a random 2-layer BERT checkpoint in Hugging Face layout."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    path = tmp_path_factory.mktemp("tiny_bert")
    return path, write_tiny_checkpoint(path)


def assert_states_match(state0, state1):
    """The solver contract: ``init_state`` and ``update`` return the same structure, with
    every leaf of the same shape and dtype (a while_loop carry must not change type)."""
    assert jax.tree.structure(state0) == jax.tree.structure(state1)
    for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state1), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


# ------------------------------------------------------ CI: no skips for missing modules


_MISSING = ("could not import", "No module named", "not installed", "not available")


def _fail_missing_in_ci(report):
    """With ``CI`` set, a skip for a missing module or data becomes a failure: the README's
    install command brings everything, so such a skip means the install is broken."""
    if os.environ.get("CI") and report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
                     else report.longrepr)
        if any(s in reason for s in _MISSING):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI for a missing module or data: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # module-level importorskip skips the whole file at collection
    _fail_missing_in_ci(outcome.get_result())
