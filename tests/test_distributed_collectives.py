"""Ring all-reduce from point-to-point messages (chapter 10): it matches ``dist.all_reduce`` for
1 to 4 ranks, every length (divisible by the world size or not), float and integer dtypes, 2-D and
non-contiguous tensors and a sub-group with non-consecutive ranks; each rank sends the bytes the
2(N-1)/N formula says; the alpha-beta fit recovers known parameters; the timing helper returns
consistent positive numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from aimodels.distributed import launch
from aimodels.distributed.collectives import (
    INFINIBAND_NDR_BYTES_PER_S,
    NVLINK4_H100_BYTES_PER_S,
    all_reduce_bytes_per_rank,
    fit_alpha_beta,
    predict_all_reduce_time,
    ring_all_reduce,
    ring_all_reduce_bytes,
    ring_all_reduce_time,
    time_all_reduce,
)

# (shape, dtype, make the tensor non-contiguous). 12 elements divide by 1, 2, 3 and 4 ranks;
# 1 and 7 leave empty or uneven chunks; 1000 is uneven for 3 ranks only.
CASES = [
    *[((n,), dtype, False) for n in (1, 7, 12, 1000) for dtype in ("float32", "float64")],
    ((6, 5), "float64", False),
    ((6, 5), "float32", True),
    ((1000,), "float16", False),
    ((1000,), "bfloat16", False),
    ((7, 3), "int64", False),
]
WORLDS = (1, 2, 3, 4)
# A sub-group whose ranks are not 0..k-1, so group and global ranks differ.
SUBGROUPS = {1: [0], 2: [1], 3: [0, 2], 4: [0, 2, 3]}


def make(shape: tuple[int, ...], dtype: torch.dtype, rank: int, case: int) -> torch.Tensor:
    """Rank-dependent data. Half-precision and integer tensors hold small integers, whose sums
    are exact in any order, so they can be compared exactly."""
    generator = torch.Generator().manual_seed(1000 * case + rank)
    if dtype.is_floating_point and torch.finfo(dtype).bits > 16:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(-8, 9, shape, generator=generator).to(dtype)


def check_worker(cases: list, subgroup: list[int], time_it: bool) -> dict:
    """Runs on every rank: each case through the ring and through dist.all_reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"cases": []}
    for i, (shape, dtype_name, transposed) in enumerate(cases):
        t = make(shape, getattr(torch, dtype_name), rank, i)
        if transposed:
            t = t.t()
        expected = t.clone()
        dist.all_reduce(expected)
        stats: dict[str, int] = {}
        returned = ring_all_reduce(t, stats=stats)
        out["cases"].append({"ring": t, "expected": expected, "stats": stats,
                             "same_object": returned is t, "contiguous": t.is_contiguous()})
    group = dist.new_group(subgroup)  # every rank must take part in creating it
    singles = [dist.new_group([r]) for r in range(world)]
    if rank in subgroup:
        t = make((13,), torch.float64, rank, 99)
        expected = t.clone()
        dist.all_reduce(expected, group=group)
        stats = {}
        ring_all_reduce(t, group=group, stats=stats)
        out["group"] = {"ring": t, "expected": expected, "stats": stats,
                        "group_rank": dist.get_rank(group)}
    t = make((9,), torch.float32, rank, 7)
    before = t.clone()
    stats = {}
    ring_all_reduce(t, group=singles[rank], stats=stats)
    out["single"] = {"after": t, "before": before, "stats": stats}
    if time_it:
        out["timings"] = time_all_reduce([4096, 65536], repeats=3)
        out["ring_timings"] = time_all_reduce([4096, 65536], repeats=3, all_reduce=ring_all_reduce)
    return out


_RESULTS: dict[int, list[dict]] = {}


def results_for(world: int) -> list[dict]:
    """One launch per world size, shared by the tests below (each launch costs seconds)."""
    if world not in _RESULTS:
        _RESULTS[world] = launch(check_worker, world, CASES, SUBGROUPS[world], world == 2,
                                 timeout=60)
    return _RESULTS[world]


@pytest.fixture(params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def world_results(request) -> tuple[int, list[dict]]:
    return request.param, results_for(request.param)


def test_ring_matches_dist_all_reduce(world_results):
    world, results = world_results
    for rank, result in enumerate(results):
        for (shape, dtype_name, transposed), case in zip(CASES, result["cases"], strict=True):
            ring, expected = case["ring"], case["expected"]
            assert ring.shape == torch.Size(shape[::-1] if transposed else shape)
            assert ring.dtype == getattr(torch, dtype_name)
            assert case["same_object"]
            assert case["contiguous"] == (not transposed or 1 in shape)
            if dtype_name in ("float32", "float64"):
                torch.testing.assert_close(ring, expected, msg=f"world {world} rank {rank} {shape}")
            else:  # exact small-integer sums
                assert torch.equal(ring, expected), (world, rank, shape, dtype_name)
    # every rank ends with the same tensor, and it is the sum of the inputs
    for i, (shape, dtype_name, transposed) in enumerate(CASES):
        inputs = [make(shape, getattr(torch, dtype_name), r, i) for r in range(world)]
        total = torch.stack([x.t() if transposed else x for x in inputs]).sum(0)
        for result in results:
            torch.testing.assert_close(result["cases"][i]["ring"], total)


def test_bytes_sent_match_the_formula(world_results):
    world, results = world_results
    for i, (shape, dtype_name, _) in enumerate(CASES):
        numel = math.prod(shape)
        size = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
        sent = [r["cases"][i]["stats"]["bytes_sent"] for r in results]
        received = [r["cases"][i]["stats"]["bytes_received"] for r in results]
        formula = all_reduce_bytes_per_rank(numel * size, world)
        for rank, s in enumerate(sent):
            assert s == ring_all_reduce_bytes(numel, size, world, rank)
            # tensor_split chunks are within one element of numel/N, so a rank's count is
            # within two elements of 2(N-1)/N * size, and equal to it when N divides numel
            assert abs(s - formula) < 2 * size
            if numel % world == 0:
                assert s == formula
        assert sum(sent) == sum(received) == 2 * (world - 1) * numel * size
        messages = [r["cases"][i]["stats"]["messages_sent"] for r in results]
        if numel >= world:
            assert messages == [2 * (world - 1)] * world


def test_sub_group_uses_group_ranks(world_results):
    world, results = world_results
    members = SUBGROUPS[world]
    for rank, result in enumerate(results):
        if rank not in members:
            assert "group" not in result
            continue
        group = result["group"]
        assert group["group_rank"] == members.index(rank)
        torch.testing.assert_close(group["ring"], group["expected"])
        total = sum(make((13,), torch.float64, r, 99) for r in members)
        torch.testing.assert_close(group["ring"], total)
        assert group["stats"]["bytes_sent"] == ring_all_reduce_bytes(13, 8, len(members),
                                                                     members.index(rank))


def test_one_rank_is_a_no_op(world_results):
    _, results = world_results
    for result in results:
        single = result["single"]
        assert torch.equal(single["after"], single["before"])
        assert single["stats"] == {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0}


def test_time_all_reduce_returns_consistent_positive_times():
    results = results_for(2)
    for key in ("timings", "ring_timings"):
        timings = results[0][key]
        assert [b for b, _ in timings] == [4096, 65536]
        assert all(0 < t < 10 and math.isfinite(t) for _, t in timings)
        assert results[1][key] == timings  # the slowest rank's time, the same everywhere


def test_ring_rejects_bool_complex_and_non_tensors():
    with pytest.raises(TypeError, match="floating-point or integer tensors, got dtype torch.bool"):
        ring_all_reduce(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="complex64"):
        ring_all_reduce(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="needs a torch.Tensor, got list"):
        ring_all_reduce([1.0, 2.0])


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs no process group")
def test_ring_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs a process group"):
        ring_all_reduce(torch.zeros(3))


def test_byte_formulas():
    assert all_reduce_bytes_per_rank(1000, 1) == 0
    assert all_reduce_bytes_per_rank(1200, 4) == 1800  # 2 * 3/4 * 1200
    assert all_reduce_bytes_per_rank(1000, 2) == 1000
    for world in range(1, 7):
        for numel in (0, 1, 5, 7, 12, 1000, 1001):
            per_rank = [ring_all_reduce_bytes(numel, 4, world, r) for r in range(world)]
            assert sum(per_rank) == 2 * (world - 1) * numel * 4
            for count in per_rank:
                assert abs(count - all_reduce_bytes_per_rank(numel * 4, world)) < 2 * 4
    assert ring_all_reduce_bytes(7, 4, 3, 0) == (14 - 2 - 2) * 4  # chunks of 3, 2, 2 elements
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        ring_all_reduce_bytes(7, 4, 3, 3)
    with pytest.raises(ValueError, match="world size must be an int >= 1, got 0"):
        all_reduce_bytes_per_rank(100, 0)


def test_fit_alpha_beta_recovers_known_parameters():
    alpha, beta = 5e-5, 1e-9  # 50 us and 1 GB/s
    sizes = [2**k for k in range(10, 25, 2)]
    times = [alpha + beta * n for n in sizes]
    fit = fit_alpha_beta(sizes, times)
    torch.testing.assert_close(fit, (alpha, beta), rtol=1e-9, atol=1e-15)
    # with 2% multiplicative noise the fit is still close
    generator = torch.Generator().manual_seed(0)
    noise = 1 + 0.02 * torch.randn(len(sizes), generator=generator, dtype=torch.float64)
    noisy = fit_alpha_beta(sizes, [t * float(e) for t, e in zip(times, noise, strict=True)])
    assert abs(noisy[1] - beta) < 0.05 * beta
    assert abs(noisy[0] - alpha) < 2e-4  # alpha is the hard part: large sizes dominate
    with pytest.raises(ValueError, match="at least two different sizes"):
        fit_alpha_beta([100, 100], [1.0, 2.0])
    with pytest.raises(ValueError, match="one time per size, got 3 sizes and 2 times"):
        fit_alpha_beta([1, 2, 3], [1.0, 2.0])


def test_predictions():
    assert predict_all_reduce_time(1e6, 1e-4, 1e-9) == pytest.approx(1e-4 + 1e-3)
    assert predict_all_reduce_time(1e6, 1e-4, 1e-9, calls=3) == pytest.approx(3e-4 + 1e-3)
    assert ring_all_reduce_time(1e9, 1, 1e-5, 1e9) == 0
    # two ranks: each sends n/2 twice -> n / B, plus 2 link latencies
    assert ring_all_reduce_time(1e9, 2, 1e-5, 1e9) == pytest.approx(2e-5 + 1.0)
    # fp32 gradients of a 7B-parameter model on 8 GPUs
    assert ring_all_reduce_time(28e9, 8, 0, NVLINK4_H100_BYTES_PER_S) == pytest.approx(
        2 * 7 / 8 * 28e9 / 450e9)
    assert INFINIBAND_NDR_BYTES_PER_S == 50e9
    # the fitted line of a ring is the ring model with alpha = 2(N-1) alpha_link and
    # beta = 2(N-1) / (N B)
    world, link, bandwidth = 4, 3e-6, 2e9
    sizes = [1e4, 1e6, 1e8]
    fit = fit_alpha_beta(sizes, [ring_all_reduce_time(n, world, link, bandwidth) for n in sizes])
    torch.testing.assert_close(fit, (6 * link, 6 / (4 * bandwidth)), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        ring_all_reduce_time(1e6, 2, 0, 0)
