"""Chapter 13's measuring tape: workloads, the closed loop and the side-by-side comparisons."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from aimodels.gpt import GPT, GPTConfig
from aimodels.serving.llm import LLMEngine
from aimodels.serving.llmbench import (
    compare_batching,
    compare_prefix_caching,
    run_closed_loop,
    shared_prefix_workload,
    summarise,
    workload,
)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context_length=264, d_model=32, n_heads=2,
                         n_layers=1)).eval()


def test_workloads_are_repeatable_and_within_their_ranges():
    for shape in ("uniform", "long-tailed"):
        a, b = workload(300, 64, shape, seed=5), workload(300, 64, shape, seed=5)
        assert a == b and a != workload(300, 64, shape, seed=6)
        prompts = [len(p) for p, _ in a]
        replies = np.array([n for _, n in a])
        assert min(prompts) >= 4 and max(prompts) <= 64
        assert all(0 <= t < 64 for p, _ in a for t in p)
        low = 8 if shape == "uniform" else 4
        assert replies.min() >= low and replies.max() <= 200
    tailed = np.array([n for _, n in workload(2000, 64, "long-tailed")])
    assert np.median(tailed) < tailed.mean() < 60  # most replies short, a few long
    with pytest.raises(ValueError, match="shape must be one of"):
        workload(3, 64, "normal")
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        workload(0, 64)
    shared = shared_prefix_workload(5, 64, prefix=20, reply=3)
    assert all(p[:20] == shared[0][0][:20] and 28 <= len(p) <= 52 and n == 3
               for p, n in shared)


def test_summarise_counts_tokens_and_steps():
    from aimodels.serving.llmbench import Reply

    replies = [Reply(0, [1, 2, 3], 0.010, 0.002), Reply(1, [4], 0.030, 0.0)]
    summary = summarise(replies, seconds=0.5, steps=2)
    assert summary["generated_tokens"] == 4 and summary["tokens_per_s"] == 8.0
    assert summary["rows_per_step"] == 1.0  # 4 tokens - 2 first tokens over 2 steps
    assert summary["ttft_p50_ms"] == 10.0 and summary["ttft_p99_ms"] == 30.0
    assert summary["tpot_p50_ms"] == 2.0  # the one-token reply has no gaps


def test_closed_loop_works_inside_a_running_event_loop(model):
    """Jupyter runs cells in an event loop; the closed loop must still work there."""
    requests = workload(6, 64, seed=1)

    async def inside():
        with LLMEngine(model, num_blocks=64, block_size=16) as engine:
            return run_closed_loop(engine, requests, concurrency=3)

    replies, seconds, steps = asyncio.run(inside())
    assert [len(r.tokens) for r in replies] == [n for _, n in requests]
    assert seconds > 0 and steps >= max(n for _, n in requests) - 1


def test_closed_loop_counts_the_step_of_every_last_token(model):
    """One client: every reply of n tokens takes exactly n - 1 decoding steps (its first
    token comes from the prefill), the last step included, however fast the client is."""
    requests = [([1, 2, 3], n) for n in (5, 2, 9, 1, 7)] * 4
    with LLMEngine(model, num_blocks=16, block_size=16) as engine:
        _, _, steps = run_closed_loop(engine, requests, concurrency=1)
    assert steps == sum(n - 1 for _, n in requests)


def test_compare_batching_and_prefix_caching(model):
    requests = workload(12, 64, "long-tailed", seed=2)
    result = compare_batching(model, requests, concurrency=4)
    tokens = sum(n for _, n in requests)
    for mode in ("static", "continuous"):
        assert result[mode]["generated_tokens"] == tokens
    # Continuous batching never needs more decoding steps than static batching.
    assert result["continuous"]["steps"] <= result["static"]["steps"]
    shared = shared_prefix_workload(8, 64, prefix=48, reply=4)
    prefix = compare_prefix_caching(model, shared, concurrency=4)
    assert prefix["off"]["cached_tokens"] == 0
    # All but the first request find the 3 whole blocks of the 48-token prefix.
    assert prefix["on"]["cached_tokens"] == 7 * 48
    assert prefix["on"]["prompt_tokens"] == sum(len(p) for p, _ in shared)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        compare_batching(model, requests, concurrency=4, rounds=0)
