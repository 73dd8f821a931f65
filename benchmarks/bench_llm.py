"""Benchmark: continuous versus static batching of a GPT (Chapter 13).

Sixteen clients, each sending its next request as soon as the previous reply has ended
(a closed loop, concurrency 16), share one :class:`~aimodels.serving.llm.LLMEngine`. The
requests mix short and long prompts (4-64 tokens) and short and long replies (8-200 new
tokens), drawn once with a fixed seed, so both modes serve exactly the same work; greedy
decoding, so both must return the same tokens, which is checked. The model has chapter 9's
shape with a longer context (random weights: speed does not depend on training).

Reported per mode: generated tokens per second (all requests, wall clock), time to first
token (TTFT: submit to first token, queueing and prefill included) and time per output
token (TPOT: the mean gap between a reply's later tokens), p50 and p99.

What to expect, and what this machine shows. On a GPU a decoding step of 16 sequences
costs little more than one of 1, so throughput follows the mean batch size, and static
batching, which holds each batch until its longest reply ends (replies of 8-200 tokens
leave the batch mostly empty towards the end), loses up to half of it. On this 2-core CPU
with a tiny model the step is *not* flat in the batch: gathering each sequence's blocks,
per-sequence prefills and handing every token to the event loop grow with the batch, so
continuous batching's larger batches (about 14 against 9 sequences per step) come with
slower steps and the tokens per second end up about equal. What continuous batching
wins here, clearly, is latency: a newcomer is admitted at the next step instead of after
the whole batch, so TTFT falls by more than an order of magnitude. The CSV records the
measured numbers, whatever they are.

One thread for torch, the engine in its own thread as in the server. Writes
book/figures/llm_batching.csv. Run with ``python benchmarks/bench_llm.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import FIGURES, write_table

from aimodels.gpt import GPT, GPTConfig
from aimodels.serving.llm import LLMEngine

TABLE = "llm_batching.csv"
CONFIG = GPTConfig(vocab_size=512, context_length=256, d_model=96, n_heads=4, n_layers=2)
CONCURRENCY = 16


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, 65, n)
    replies = rng.integers(8, 201, n)
    return [(rng.integers(0, CONFIG.vocab_size, int(p)).tolist(), int(r))
            for p, r in zip(prompts, replies, strict=True)]


async def _client(engine: LLMEngine, queue: asyncio.Queue, records: list) -> None:
    while True:
        try:
            index, (prompt, n) = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        start = time.perf_counter()
        times, ids = [], []
        async for token in engine.submit(prompt, n, temperature=0):
            times.append(time.perf_counter())
            ids.append(token.id)
        records.append((index, ids, times[0] - start,
                        (times[-1] - times[0]) / max(len(times) - 1, 1)))


async def _run(engine: LLMEngine, requests) -> tuple[list, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    records: list = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(engine, queue, records) for _ in range(CONCURRENCY)))
    return sorted(records), time.perf_counter() - start


def run(n_requests: int = 96, folder: Path = FIGURES) -> list[dict]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    requests = workload(n_requests)
    blocks = CONCURRENCY * CONFIG.context_length // 16
    rows, outputs = [], {}
    for mode in ("static", "continuous"):
        with LLMEngine(model, num_blocks=blocks, block_size=16, max_batch=CONCURRENCY,
                       mode=mode) as engine:
            asyncio.run(_run(engine, workload(CONCURRENCY, seed=1)))  # warm-up
            steps0 = engine.steps
            records, seconds = asyncio.run(_run(engine, requests))
            steps = engine.steps - steps0
        outputs[mode] = [ids for _, ids, _, _ in records]
        tokens = sum(len(ids) for ids in outputs[mode])
        ttft = np.array([r[2] for r in records]) * 1000
        tpot = np.array([r[3] for r in records]) * 1000
        rows.append({
            "mode": mode, "requests": n_requests, "concurrency": CONCURRENCY,
            "generated_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "mean_batch": round((tokens - n_requests) / max(steps, 1), 2),
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
            "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1),
            "tpot_p50_ms": round(float(np.percentile(tpot, 50)), 2),
            "tpot_p99_ms": round(float(np.percentile(tpot, 99)), 2),
            "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        })
    if outputs["static"] != outputs["continuous"]:
        raise AssertionError("static and continuous batching returned different tokens")
    rows.append({**rows[1], "mode": "continuous / static",
                 **{key: round(rows[1][key] / rows[0][key], 2) for key in
                    ("tokens_per_s", "mean_batch", "ttft_p50_ms", "ttft_p99_ms",
                     "tpot_p50_ms", "tpot_p99_ms")},
                 "generated_tokens": rows[1]["generated_tokens"],
                 "seconds": round(rows[1]["seconds"] / rows[0]["seconds"], 2)})
    write_table(rows, TABLE, folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the CSV")
    args = parser.parse_args()
    rows = run(args.requests, args.out)
    keys = ["mode", "tokens_per_s", "mean_batch", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "seconds"]
    print("  ".join(f"{k:>13}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]!s:>13}" for k in keys))


if __name__ == "__main__":
    main()
