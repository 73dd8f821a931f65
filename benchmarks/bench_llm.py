"""Benchmark: continuous versus static batching of a GPT, and prefix caching (Chapter 13).

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

Two tables, in book/figures:

* ``llm_batching.csv``: per workload and mode, generated tokens per second, time to first
  token and time per output token (p50, p99), useful rows per decoding step and steps;
  then a row ``continuous / static`` holding the ratios of those columns (the columns
  that are not ratios are left empty in it);
* ``llm_prefix_caching.csv``: continuous batching with prefix caching off and on, 96
  requests sharing a 160-token system prompt, with the prompt tokens found in the cache;
  then a row ``on / off`` holding the ratios of the timing columns (the others empty).

The target of chapter 13 is continuous batching at >= 2x the static throughput on the
long-tailed workload at concurrency 16. The script prints PASS or FAIL for it and exits
with status 1 on FAIL (after writing both tables). One thread for torch, the engine in its
own thread as in the server. Run with ``python benchmarks/bench_llm.py``.
"""

from __future__ import annotations

import argparse
import platform
import sys
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
RATIOS = ("seconds", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
          "tpot_p99_ms", "rows_per_step", "steps")
PREFIX_RATIOS = ("seconds", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                 "tpot_p99_ms")
TARGET_WORKLOAD, TARGET = "long-tailed", 2.0  # continuous >= 2x static tokens/s


def ratio_row(row: dict, top: dict, bottom: dict, keys: tuple[str, ...], **labels) -> dict:
    """A row like ``row`` (same columns) holding ``top[key] / bottom[key]`` for ``keys``,
    ``labels`` in the columns they name, and nothing in the other columns."""
    ratios = {key: round(top[key] / bottom[key], 2) for key in keys}
    return {column: labels.get(column, ratios.get(column, "")) for column in row}


def verdict(rows: list[dict]) -> tuple[bool, str]:
    """Whether continuous batching reached TARGET times the static throughput on the
    TARGET_WORKLOAD, and a line that says so (with the other workloads' ratios)."""
    speed = {(r["workload"], r["mode"]): r["tokens_per_s"] for r in rows}
    ratios = {w: speed[w, "continuous"] / speed[w, "static"] for w, mode in speed
              if mode == "static"}  # not the rounded ratio rows: 1.996 is not 2
    ok = ratios[TARGET_WORKLOAD] >= TARGET
    others = ", ".join(f"{w} {x:.3f}x" for w, x in ratios.items() if w != TARGET_WORKLOAD)
    return ok, (f"{'PASS' if ok else 'FAIL'}: continuous / static throughput on the "
                f"{TARGET_WORKLOAD} workload is {ratios[TARGET_WORKLOAD]:.3f}x (target >= "
                f"{TARGET:g}x); {others} (no target)")


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
        rows.append(ratio_row(rows[-1], result["continuous"], result["static"], RATIOS,
                              workload=shape, mode="continuous / static",
                              requests=n_requests, concurrency=CONCURRENCY, machine=machine))
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
    rows.append(ratio_row(rows[-1], result["on"], result["off"], PREFIX_RATIOS,
                          prefix_caching="on / off", requests=n_requests,
                          concurrency=CONCURRENCY, machine=machine))
    write_table(rows, PREFIX_TABLE, folder)
    return rows


def main() -> int:
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
    ok, line = verdict(rows)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
