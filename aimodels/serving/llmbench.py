"""Measuring an LLM engine: workloads of mixed lengths, a closed loop, TTFT and TPOT.

Chapter 13 compares static with continuous batching, and this module is the measuring
tape both the chapter and ``benchmarks/bench_llm.py`` use.

**Workloads.** :func:`workload` draws requests (prompt token ids, reply length) once,
from a seed, so every mode serves exactly the same work. Two shapes of reply lengths:

* ``"uniform"``: 8 to 200 tokens, every length as likely;
* ``"long-tailed"``: exponential with mean 48, rounded and clipped to 4..200: most
  replies are short and a few are long. (Real requests differ widely in input and
  output length: Kwon et al., 2023, section 2.3, and the ShareGPT and Alpaca workloads
  of their section 6.1.)

Prompts are 4 to 64 random token ids. How much continuous batching gains depends on the
spread of the reply lengths: a static batch lasts as long as its *longest* reply.

**The loop.** ``concurrency`` clients share one :class:`~aimodels.serving.llm.LLMEngine`;
each sends its next request as soon as its previous reply has ended (a closed loop), all
greedy, so every mode must return the same tokens (:func:`compare_batching` checks it).

**What is reported per mode** (:func:`summarise`): generated tokens per second (all
replies, wall clock), time to first token (TTFT: from submitting to the first token,
queueing and prefill included) and time per output token (TPOT: the mean gap between a
reply's later tokens), p50 and p99 (nearest rank), the mean number of useful rows per
decoding step and the number of steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aimodels.serving.llm import LLMEngine
from aimodels.serving.loadtest import percentile

__all__ = ["SHAPES", "Reply", "compare_batching", "compare_prefix_caching", "run_closed_loop",
           "shared_prefix_workload", "summarise", "workload"]

SHAPES = ("uniform", "long-tailed")


def workload(n: int, vocab_size: int, shape: str = "long-tailed",
             seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` requests ``(prompt_ids, reply_length)`` drawn with ``seed`` (see the module)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, 65, n)
    if shape == "uniform":
        replies = rng.integers(8, 201, n)
    else:
        replies = np.clip(np.round(rng.exponential(48.0, n)), 4, 200).astype(int)
    return [(rng.integers(0, vocab_size, int(p)).tolist(), int(r))
            for p, r in zip(prompts, replies, strict=True)]


def shared_prefix_workload(n: int, vocab_size: int, prefix: int = 160, reply: int = 16,
                           seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` requests that share their first ``prefix`` tokens (a system prompt), each
    followed by a question of its own (8-32 tokens) and answered with ``reply`` tokens."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab_size, prefix).tolist()
    return [(system + rng.integers(0, vocab_size, int(q)).tolist(), reply)
            for q in rng.integers(8, 33, n)]


def _warmup(n: int, vocab_size: int) -> list[tuple[list[int], int]]:
    """Short requests that exercise every code path once before the clock starts."""
    return [(prompt, 4) for prompt, _ in workload(n, vocab_size, "uniform", seed=12345)]


@dataclass
class Reply:
    """One finished request: its index, its tokens, and when they arrived."""

    index: int
    tokens: list[int]
    ttft_s: float  # submit -> first token
    tpot_s: float  # mean gap between later tokens (0 for a one-token reply)


async def _client(engine: LLMEngine, queue: asyncio.Queue, replies: list[Reply]) -> None:
    while True:
        try:
            index, (prompt, n) = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        start = time.perf_counter()
        times, tokens = [], []
        async for token in engine.submit(prompt, n, temperature=0):
            times.append(time.perf_counter())
            tokens.append(token.id)
        gaps = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        replies.append(Reply(index, tokens, times[0] - start, gaps))


async def _closed_loop(engine: LLMEngine, requests, concurrency: int):
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    replies: list[Reply] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(engine, queue, replies) for _ in range(concurrency)))
    return sorted(replies, key=lambda r: r.index), time.perf_counter() - start


def run_closed_loop(engine: LLMEngine, requests: Sequence[tuple[list[int], int]],
                    concurrency: int = 16) -> tuple[list[Reply], float, int]:
    """Serve ``requests`` with ``concurrency`` clients; return (replies, seconds, steps)."""
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    steps = engine.steps
    replies, seconds = _run(_closed_loop(engine, list(requests), concurrency))
    return replies, seconds, engine.steps - steps


def _run(coroutine):
    """``asyncio.run``, also from code that already runs in an event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def summarise(replies: Sequence[Reply], seconds: float, steps: int) -> dict[str, float]:
    """Tokens per second, TTFT and TPOT p50/p99 (ms), useful rows per step, steps."""
    tokens = sum(len(r.tokens) for r in replies)
    ttft = [r.ttft_s * 1000 for r in replies]
    tpot = [r.tpot_s * 1000 for r in replies if len(r.tokens) > 1]
    # The first token of every reply comes from its prefill, the others from decode steps.
    decoded = tokens - len(replies)
    return {"generated_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(percentile(ttft, 50), 2),
            "ttft_p99_ms": round(percentile(ttft, 99), 2),
            "tpot_p50_ms": round(percentile(tpot, 50), 3),
            "tpot_p99_ms": round(percentile(tpot, 99), 3),
            "rows_per_step": round(decoded / max(steps, 1), 2), "steps": steps}


def _side_by_side(engines: dict[str, LLMEngine], requests, concurrency: int, rounds: int,
                  prefix: bool = False) -> dict[str, dict[str, float]]:
    """Serve ``requests`` on each engine in turn, for ``rounds`` rounds; keep each one's
    fastest summary; require the same tokens from all. ``prefix`` adds the prompt tokens
    sent and those found in the prefix cache. Stops the engines."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    best: dict[str, dict[str, float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    try:
        for engine in engines.values():
            engine.start()
            run_closed_loop(engine, _warmup(concurrency, engine.config.vocab_size), concurrency)
        for _ in range(rounds):
            for name, engine in engines.items():
                engine.cache.clear_prefixes()  # every round starts with an empty index
                hits = engine.cache.prefix_hits
                replies, seconds, steps = run_closed_loop(engine, requests, concurrency)
                summary = summarise(replies, seconds, steps)
                if prefix:
                    prompt = sum(len(p) for p, _ in requests)
                    cached = engine.cache.prefix_hits - hits
                    summary.update(prompt_tokens=prompt, cached_tokens=cached,
                                   hit_rate=round(cached / prompt, 3))
                if name not in best or summary["seconds"] < best[name]["seconds"]:
                    best[name] = summary
                tokens[name] = [r.tokens for r in replies]
    finally:
        for engine in engines.values():
            engine.stop()
    first, *others = engines
    for name in others:
        if tokens[name] != tokens[first]:
            raise AssertionError(f"{first!r} and {name!r} returned different tokens")
    return best


def _pool(model, concurrency: int, block_size: int) -> int:
    """Blocks for ``concurrency`` sequences of the full context."""
    return concurrency * -(-model.config.context_length // block_size)


def compare_batching(model, requests: Sequence[tuple[list[int], int]], concurrency: int = 16,
                     rounds: int = 1, block_size: int = 16) -> dict[str, dict[str, float]]:
    """Static and continuous batching of one model on the same requests, side by side.

    Each mode gets its own engine (a pool of ``concurrency`` full contexts, batches of at
    most ``concurrency``) and a warm-up; the modes alternate for ``rounds`` rounds and
    each keeps its fastest round, so a burst of noise on a shared machine does not decide
    the comparison. Raises AssertionError if the two modes return different tokens
    (greedy decoding must not depend on the batch a request lands in). Returns
    ``{"static": summary, "continuous": summary}`` (see :func:`summarise`).
    """
    blocks = _pool(model, concurrency, block_size)
    engines = {mode: LLMEngine(model, num_blocks=blocks, block_size=block_size,
                               max_batch=concurrency, mode=mode)
               for mode in ("static", "continuous")}
    return _side_by_side(engines, requests, concurrency, rounds)


def compare_prefix_caching(model, requests: Sequence[tuple[list[int], int]],
                           concurrency: int = 16, rounds: int = 1,
                           block_size: int = 16) -> dict[str, dict[str, float]]:
    """Continuous batching without and with prefix caching, on the same requests.

    As :func:`compare_batching` (alternating rounds, the fastest kept, the same tokens
    required), plus per mode the prompt tokens sent and those found in the cache:
    ``prompt_tokens``, ``cached_tokens`` and ``hit_rate``. Keys ``"off"``, ``"on"``.
    """
    blocks = _pool(model, concurrency, block_size)
    engines = {name: LLMEngine(model, num_blocks=blocks, block_size=block_size,
                               max_batch=concurrency, prefix_caching=on)
               for name, on in (("off", False), ("on", True))}
    return _side_by_side(engines, requests, concurrency, rounds, prefix=True)
