"""The paper's LLM experiment, small: prune the byte-level decoder, judge by perplexity.

Trains the default decoder on the standard library's source (or reuses the cached one:
``iobs-jax train-lm``), then prunes every linear map with magnitude, Wanda, SparseGPT and
I-OBS (iterations 1..5; the iterate kept is the fewest iterations within one standard
error of the best on 128 validation windows) at 50/60/70% and 2:4,
sequentially, on 128 random training windows, and reports test perplexity.

Bars (issue "Decoder language models judged by perplexity"):
- dense model: at most 2.0 bits per byte on the test split;
- at 50% and 2:4: the perplexity increase of I-OBS is at most 0.8x SparseGPT's, and
  SparseGPT beats Wanda beats magnitude (each baseline with the comparison group kept on
  validation windows; both groups are reported);
- the I-OBS iterate kept on held-out windows is never worse than one iteration;
- pruning the decoder with I-OBS takes at most 2x the time of SparseGPT.

Writes ``benchmarks/results/prune_lm.json``, the figures, and ``docs/prune_lm.md``.
Usage: ``python benchmarks/prune_lm.py [--quick]`` (the default model trains for about
30 minutes on 2 CPU cores the first time; pruning takes about as long again).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from iobs_jax.experiments import decoder_lm as lm

OUT = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs"


def bars(records: list[dict], train_info: dict) -> dict:
    def get(method, pattern, it=1):
        for r in records:
            if r["method"] == method and r["pattern"] == pattern and r["iterations"] == it \
                    and r.get("chosen", True):
                return r
        return None

    out = {"dense_bits_per_byte": train_info["test_bits_per_byte"] <= 2.0}
    for pattern in ("0.5", "2:4"):
        io, sg, wa, mag = (get(m, pattern) for m in ("iobs", "sparsegpt", "wanda",
                                                      "magnitude"))
        if not all((io, sg, wa, mag)):
            continue
        dense = io["dense_perplexity"]
        rise = (io["perplexity"] - dense) / max(sg["perplexity"] - dense, 1e-12)
        out[f"iobs_rise_vs_sparsegpt_{pattern}"] = rise
        out[f"bar_iobs_rise_{pattern}"] = rise <= 0.8
        out[f"bar_order_{pattern}"] = (sg["perplexity"] < wa["perplexity"]
                                       < mag["perplexity"])
    for best in [r for r in records if r["method"] == "iobs-best"]:
        one = get("iobs", best["pattern"])
        out[f"bar_best_iterate_{best['pattern']}"] = best["perplexity"] <= one["perplexity"]
    times = {m: sum(r["seconds"] for r in records if r["method"] == m and r["iterations"] == 1)
             for m in ("iobs", "sparsegpt")}
    if times["sparsegpt"]:
        out["iobs_time_vs_sparsegpt"] = times["iobs"] / times["sparsegpt"]
        out["bar_time"] = out["iobs_time_vs_sparsegpt"] <= 2.0
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model (minutes)")
    parser.add_argument("--max-iterations", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = lm.default_sizes(args.quick)
    model, info, _ = lm.train_or_load(sizes)
    print(f"dense: test {info['test_bits_per_byte']:.4f} bits per byte, trained in "
          f"{info['seconds']:.0f} s ({info['tokens_per_second']:.0f} tokens/s)")
    data = lm.lm_data(model.config.max_seq_len, test=64 if args.quick else 256,
                      calib=32 if args.quick else 128, val=16 if args.quick else 128)
    configs = lm.lm_configs(lm.LM_METHODS, lm.DEFAULT_PATTERNS, args.max_iterations)
    records = lm.run_lm_experiment(model, data, configs)
    records = lm.choose_scopes(records) + lm.best_iterates(records)
    result = {"train": {k: v for k, v in info.items() if k != "history"},
              "records": records, "bars": bars(records, info)}
    print(lm.table(records))
    for name, value in result["bars"].items():
        print(f"  {name}: {value}")
    OUT.mkdir(exist_ok=True)
    (OUT / "prune_lm.json").write_text(json.dumps(result, indent=2))
    DOCS.mkdir(exist_ok=True)
    figures = lm.plot(records, OUT / "prune_lm.png")
    for f in figures:
        shutil.copyfile(f, DOCS / f.name)
    (DOCS / "prune_lm.md").write_text(_markdown(result, [f.name for f in figures]))
    return result


def _markdown(result: dict, figures: list[str]) -> str:
    t = result["train"]
    lines = [
        "# Pruning a byte-level decoder, judged by perplexity",
        "",
        "Written by `benchmarks/prune_lm.py`. The decoder (Llama-style: RMSNorm, rotary, "
        "grouped-query attention, SwiGLU; "
        f"{t['model']['num_layers']} layers, width {t['model']['hidden_size']}, context "
        f"{t['model']['max_seq_len']} bytes) was trained on the Python standard library's "
        f"source ({t['train']['steps']} steps of {t['train']['batch_size']} windows, "
        f"{t['seconds']:.0f} s, {t['tokens_per_second']:.0f} tokens/s); test: "
        f"{t['test_bits_per_byte']:.3f} bits per byte. Every linear map is pruned "
        "sequentially from 128 random training windows; perplexity is over non-overlapping "
        "test windows; `iobs-best` is the I-OBS iterate kept by validation windows: the "
        "fewest iterations whose validation NLL is within one standard error (paired over "
        "windows) of the lowest (the one-standard-error rule). Magnitude and Wanda are "
        "run with both comparison groups (per layer and per output row; `scope` below) and "
        "the one marked `*` is kept: the "
        "method's usual group (magnitude: layer; Wanda: row, the Wanda paper's choice for "
        "LLMs) unless the other is better on validation by more than one standard error.",
        "",
        "```",
        lm.table(result["records"]),
        "```",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    lines += ["", "Bars:", ""]
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) and not isinstance(v, bool)
              else f"- {k}: {v}" for k, v in result["bars"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
