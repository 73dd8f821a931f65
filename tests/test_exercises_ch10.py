"""Chapter 10 graders: they accept right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels import exercises as ex


# --------------------------------------------------------------------------- answers
def ring_bytes(size, n):  # the notebook's solution
    return 2 * (n - 1) / n * size


def ring_bytes_by_steps(size, n):  # counted step by step, chunks of size / n
    sent = 0.0
    for _ in range(2 * (n - 1)):
        sent += size / n
    return sent


def ring_time(size, n, alpha, bandwidth):
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size / bandwidth


def zero_bytes(psi, n, stage, k=12):
    per_param = [2 + 2 + k, 2 + 2 + k / n, 2 + (2 + k) / n, (2 + 2 + k) / n][stage]
    return per_param * psi


def zero_bytes_if(psi, n, stage):  # written with ifs, as a learner might
    params, grads, opt = 2 * psi, 2 * psi, 12 * psi
    if stage >= 1:
        opt /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    return params + grads + opt


def bubble(p, m):
    return (p - 1) / (m + p - 1)


def bubble_by_slots(p, m):  # 1 - busy / total
    return 1 - m / (m + p - 1)


def column_shard(weight, rank, world):
    return weight.chunk(world, dim=0)[rank]


def column_shard_tensor_split(weight, rank, world):
    return torch.tensor_split(weight, world, dim=0)[rank].clone()


@pytest.mark.parametrize(("check", "answer"), [
    (ex.check_ring_bytes, ring_bytes),
    (ex.check_ring_bytes, ring_bytes_by_steps),
    (ex.check_ring_bytes, lambda s, n: torch.tensor(2 * (n - 1) / n * s, dtype=torch.float64)),
    (ex.check_ring_bytes, lambda s, n: np.array(2 * (n - 1) / n * s)),
    (ex.check_ring_bytes, lambda s, n: np.float64(2 * (n - 1)) / n * s),
    (ex.check_ring_time, ring_time),
    (ex.check_zero_memory, zero_bytes),
    (ex.check_zero_memory, zero_bytes_if),
    (ex.check_bubble_fraction, bubble),
    (ex.check_bubble_fraction, bubble_by_slots),
    (ex.check_column_shard, column_shard),
    (ex.check_column_shard, column_shard_tensor_split),
], ids=lambda v: getattr(v, "__name__", "answer"))
def test_right_answers_pass(capsys, check, answer):
    accepts(capsys, check, answer)


# --------------------------------------------------------------------------- slips
def zero_with(grads_from=2, params_from=3, k=12, unit=1.0, shard_opt=True):
    def answer(psi, n, stage):
        opt = k * psi / (n if stage >= 1 and shard_opt else 1)
        grads = 2 * psi / (n if stage >= grads_from else 1)
        params = 2 * psi / (n if stage >= params_from else 1)
        return (opt + grads + params) / unit
    return answer


WRONG = [
    wrong(ex.check_ring_bytes, lambda s, n: (n - 1) / n * s, expect=["reduce-scatter half"], id="ring-half"),
    wrong(ex.check_ring_bytes, lambda s, n: 2 * (n - 1) * s, expect=["chunk of size/N"], id="ring-whole-buffer"),
    wrong(ex.check_ring_bytes, lambda s, n: 2 * s, expect=["N - 1 steps"], id="ring-2-size"),
    wrong(ex.check_ring_bytes, lambda s, n: 2 * (n - 1) * s / n * n, expect=["asks per rank"], id="ring-all-ranks"),
    wrong(ex.check_ring_bytes, lambda s, n: 2 * s / n, expect=["2 (N - 1) / N"], id="ring-2-over-n"),
    wrong(ex.check_ring_bytes, lambda s, n: s, expect=["expected"], id="ring-size"),
    wrong(ex.check_ring_bytes, lambda s, n: str(ring_bytes(s, n)), expect=["expected a number"], id="ring-text"),
    wrong(ex.check_ring_time, lambda s, n, a, b: a + 2 * (n - 1) / n * s / b, expect=["2 (N - 1) steps"], id="time-alpha-once"),
    wrong(ex.check_ring_time, lambda s, n, a, b: 2 * (n - 1) * a + s / b, expect=["each rank sends that many"], id="time-size-over-b"),
    wrong(ex.check_ring_time, lambda s, n, a, b: 2 * (n - 1) * a + 2 * (n - 1) * s / b, expect=["chunk of size/N"], id="time-no-over-n"),
    wrong(ex.check_ring_time, lambda s, n, a, b: (n - 1) * a + (n - 1) / n * s / b, expect=["both phases"], id="time-one-phase"),
    wrong(ex.check_ring_time, lambda s, n, a, b: 2 * (n - 1) * a + 2 * (n - 1) / n * s * b, expect=["do not multiply"], id="time-times-bandwidth"),
    wrong(ex.check_ring_time, lambda s, n, a, b: 2 * (n - 1) / n * s / b, expect=["t = 2 (N - 1) alpha"], id="time-no-latency"),
    wrong(ex.check_zero_memory, zero_with(grads_from=1), expect=["stage 1 shards only the optimizer"], id="zero-grads-at-1"),
    wrong(ex.check_zero_memory, zero_with(grads_from=3), expect=["stage 2 shards the gradients"], id="zero-grads-at-3"),
    wrong(ex.check_zero_memory, zero_with(params_from=4), expect=["stage 3 shards the fp16 weights"], id="zero-params-never"),
    wrong(ex.check_zero_memory, zero_with(params_from=2), expect=["only stage 3 shards them"], id="zero-params-at-2"),
    wrong(ex.check_zero_memory, zero_with(k=16), expect=["K = 12"], id="zero-k-16"),
    wrong(ex.check_zero_memory, zero_with(shard_opt=False, grads_from=4, params_from=4), expect=["stage 1 already shards"], id="zero-never-shards"),
    wrong(ex.check_zero_memory, zero_with(unit=1e9), expect=["not GB"], id="zero-gb"),
    wrong(ex.check_zero_memory, zero_with(unit=2**30), expect=["not GiB"], id="zero-gib"),
    wrong(ex.check_zero_memory, lambda psi, n, stage: 16 * psi / n, expect=["stage 0 keeps"], id="zero-always-sharded"),
    wrong(ex.check_bubble_fraction, lambda p, m: (p - 1) / m, expect=["relative to the ideal time"], id="bubble-over-m"),
    wrong(ex.check_bubble_fraction, lambda p, m: (p - 1) / (m + p), expect=["m + p - 1 slots"], id="bubble-m-plus-p"),
    wrong(ex.check_bubble_fraction, lambda p, m: p / (m + p - 1), expect=["p - 1 slots, not p"], id="bubble-p"),
    wrong(ex.check_bubble_fraction, lambda p, m: m / (m + p - 1), expect=["busy fraction"], id="bubble-busy"),
    wrong(ex.check_bubble_fraction, lambda p, m: (p - 1) / (p * m), expect=["draw the schedule"], id="bubble-over-pm"),
    wrong(ex.check_column_shard, lambda w, r, n: w.chunk(n, dim=1)[r], expect=["row-parallel split"], id="shard-columns"),
    wrong(ex.check_column_shard, lambda w, r, n: w.chunk(n, dim=0)[r].T, expect=["layout [out, in]"], id="shard-transposed"),
    wrong(ex.check_column_shard, lambda w, r, n: w.chunk(n, dim=0)[min(r + 1, n - 1)], expect=["starts at row r"], id="shard-next-rank"),
    wrong(ex.check_column_shard, lambda w, r, n: w, expect=["not rows"], id="shard-whole"),
    wrong(ex.check_column_shard, lambda w, r, n: w.chunk(n, dim=0)[r].tolist(), expect=["expected a tensor"], id="shard-list"),
    wrong(ex.check_column_shard, lambda w, r, n: w.chunk(n, dim=0)[r].float(), expect=["keep the weight's dtype"], id="shard-float32"),
    wrong(ex.check_bubble_fraction, lambda p, m: 100 * (p - 1) / (m + p - 1), expect=["not a percentage"], id="bubble-percent"),
    wrong(ex.check_ring_time, lambda s, n, a, b: 2 * (n - 1) * a + 8 * 2 * (n - 1) / n * s / b, expect=["t = 2 (N - 1) alpha"], id="time-bits"),
]


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_get_a_hint(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", [getattr(ex, name) for name in ex.ch10.__all__],
                         ids=ex.ch10.__all__)
@pytest.mark.parametrize("answer", [stub, broken], ids=["stub", "broken"])
def test_stubs_and_crashes_are_not_yet(capsys, check, answer):
    rejects(capsys, check, answer)


def test_every_chapter_10_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch10.__all__) and min(counts.values()) >= 2


def test_the_paper_example_is_what_the_grader_expects():
    # ZeRO (Rajbhandari et al., 2020), Figure 1: 7.5B parameters on 64 devices, K = 12.
    expected_gb = [120, 31.4, 16.6, 1.88]
    for stage, gb in enumerate(expected_gb):
        assert math.isclose(zero_bytes(7.5e9, 64, stage) / 1e9, gb, rel_tol=0.01)
