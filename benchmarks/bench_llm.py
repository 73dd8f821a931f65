"""Benchmark: continuous versus static batching of a GPT (Chapter 13).

Sixteen clients in a closed loop share one :class:`~aimodels.serving.llm.LLMEngine` and
send the same requests to each mode (:mod:`aimodels.serving.llmbench`): prompts of 4-64
tokens, greedy replies either *uniform* (8-200 tokens) or *long-tailed* (exponential, mean
48, clipped to 4-200). The model has chapter 9's shape with a longer context (random
weights: speed does not depend on training). The two modes alternate for three rounds and
each keeps its fastest; both must return the same tokens, which is checked.

Static batching here is request-level batching as a fixed-shape batch runs it: 16
requests go in together and every row is computed until the longest reply has ended (the
ended rows as padding). Continuous batching admits a waiting request into any free row
at the next step. What decides the gain is how long a static batch runs compared with
its average reply: the longer the tail of reply lengths, the emptier the static batch.

Reported per workload and mode: generated tokens per second, time to first token and
time per output token (p50, p99), useful rows per decoding step, and the ratios.
One thread for torch, the engine in its own thread as in the server. Writes
book/figures/llm_batching.csv. Run with ``python benchmarks/bench_llm.py``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from common import FIGURES, write_table

from aimodels.gpt import GPT, GPTConfig
from aimodels.serving.llmbench import (
    SHAPES,
    compare_batching,
    compare_prefix_caching,
    shared_prefix_workload,
    workload,
)

TABLE = "llm_batching.csv"
PREFIX_TABLE = "llm_prefix_caching.csv"
CONFIG = GPTConfig(vocab_size=512, context_length=264, d_model=256, n_heads=4, n_layers=4)
CONCURRENCY = 16
RATIOS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
          "rows_per_step", "steps")


def run(n_requests: int = 192, rounds: int = 3, folder: Path = FIGURES) -> list[dict]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    machine = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    rows = []
    for shape in SHAPES:
        requests = workload(n_requests, CONFIG.vocab_size, shape, seed=0)
        result = compare_batching(model, requests, CONCURRENCY, rounds=rounds)
        for mode in ("static", "continuous"):
            rows.append({"workload": shape, "mode": mode, "requests": n_requests,
                         "concurrency": CONCURRENCY, **result[mode], "machine": machine})
        ratio = {key: round(result["continuous"][key] / result["static"][key], 2)
                 for key in RATIOS}
        rows.append({**rows[-1], "mode": "continuous / static", **ratio,
                     "seconds": round(result["continuous"]["seconds"]
                                      / result["static"]["seconds"], 2)})
    write_table(rows, TABLE, folder)
    return rows


def run_prefix(n_requests: int = 96, rounds: int = 3, folder: Path = FIGURES) -> list[dict]:
    """Prefix caching off and on: a 160-token system prompt shared by every request."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    requests = shared_prefix_workload(n_requests, CONFIG.vocab_size, prefix=160, reply=16)
    result = compare_prefix_caching(model, requests, CONCURRENCY, rounds=rounds)
    machine = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    rows = [{"prefix_caching": name, "requests": n_requests, "concurrency": CONCURRENCY,
             **result[name], "machine": machine} for name in ("off", "on")]
    rows.append({**rows[-1], "prefix_caching": "on / off",
                 **{key: round(result["on"][key] / result["off"][key], 2)
                    for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "seconds")}})
    write_table(rows, PREFIX_TABLE, folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the CSV")
    args = parser.parse_args()
    rows = run(args.requests, args.rounds, args.out)
    keys = ["workload", "mode", "tokens_per_s", "rows_per_step", "steps", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
    print("  ".join(f"{k:>12}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]!s:>12}" for k in keys))
    keys = ["prefix_caching", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "prompt_tokens",
            "cached_tokens", "hit_rate"]
    print("  ".join(f"{k:>14}" for k in keys))
    for row in run_prefix(96, args.rounds, args.out):
        print("  ".join(f"{row[k]!s:>14}" for k in keys))


if __name__ == "__main__":
    main()
