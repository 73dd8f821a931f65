"""Data parallelism (chapter 10): after 20 steps the from-scratch version and
DistributedDataParallel both equal one process training on whole batches (float64, SGD with
momentum and AdamW, replicas started from different seeds), also through the ring all-reduce and
in buckets; the scratch bucket packing reproduces DDP's buckets as seen by a comm hook; the
step-time measurement returns consistent positive numbers (never a speed assertion)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from aimodels.distributed import launch
from aimodels.distributed.common import mlp
from aimodels.distributed.data_parallel import (
    bucket_assignment,
    demo_worker,
    equivalence_worker,
    predict_ddp_step_time,
    run_data_parallel_equivalence,
)

SIZES = (32, 64, 64, 8)
BUCKET_SIZES = (64, 256, 256, 32)  # float32 parameters of 64 KiB, 1 KiB, 256 KiB, ...
CAPS_MB = (100.0, 1e-6, 0.1, None)
STEP_TIME = dict(sizes=(64, 256, 256, 32), batch_size=16, steps=3, warmup=1,
                 comm_sizes_bytes=(4096, 65536, 262144))


def check_worker() -> dict:
    """Everything that needs a group, in one launch: equivalence through the ring in buckets
    (the default path is run_data_parallel_equivalence's test), DDP's buckets, step times."""
    out = demo_worker(
        equivalence=dict(steps=20, optimizers=("sgd", "adamw"), all_reduce="ring",
                         bucket_cap_bytes=[2048, 8192], bucket_cap_mb=0.01),
        buckets=dict(caps_mb=CAPS_MB, sizes=BUCKET_SIZES),
        step_time=STEP_TIME,
    )
    out["equivalence_per_parameter"] = equivalence_worker(steps=5, all_reduce="torch")
    out["rank"] = dist.get_rank()
    return out


_CACHE: dict[str, object] = {}


def results() -> list[dict]:
    if "check" not in _CACHE:
        _CACHE["check"] = launch(check_worker, 2, timeout=60)
    return _CACHE["check"]


def assert_same_run(run: tuple, reference: tuple) -> None:
    losses, state = run
    ref_losses, ref_state = reference
    assert len(losses) == len(ref_losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        assert state[name].dtype == torch.float64
        torch.testing.assert_close(state[name], ref_state[name], msg=name)


def test_scratch_and_ddp_equal_single_process_sgd():
    res = run_data_parallel_equivalence(world_size=2, steps=20, optimizer="sgd", timeout=60)
    assert len(res["single"][0]) == 20
    assert res["single"][0][-1] < res["single"][0][0]  # it trained
    assert_same_run(res["scratch"], res["single"])
    assert_same_run(res["ddp"], res["single"])
    for by_rank in (res["scratch_by_rank"], res["ddp_by_rank"]):
        assert len(by_rank) == 2
        for name, tensor in by_rank[0].items():  # replicas agree bit for bit
            assert torch.equal(tensor, by_rank[1][name]), name
    # the replicas did not start equal: rank 1 was built from another seed
    assert not torch.equal(mlp(SIZES, seed=1)[0].weight, mlp(SIZES, seed=0)[0].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ring_bucketed_scratch_and_small_bucket_ddp_equal_single_process(optimizer):
    for rank, result in enumerate(results()):
        runs = result["equivalence"][optimizer]
        if rank == 0:
            reference = runs["single"]
        else:
            assert runs["single"] is None
        assert_same_run(runs["scratch"], reference)
        assert_same_run(runs["ddp"], reference)


def test_per_parameter_all_reduce_equals_single_process():
    runs = results()[0]["equivalence_per_parameter"]["sgd"]
    assert_same_run(runs["scratch"], runs["single"])
    assert_same_run(runs["ddp"], runs["single"])


def test_ddp_buckets_follow_the_packing_rule():
    buckets = results()[0]["buckets"]
    parameter_bytes = buckets["parameter_bytes"]
    assert parameter_bytes == [p.numel() * 4 for p in mlp(BUCKET_SIZES).parameters()]
    total = sum(parameter_bytes)
    for cap in CAPS_MB:
        seen = buckets["buckets"][cap]
        assert sum(seen) == total, cap  # every gradient byte in exactly one bucket
        caps = [2**20, 25 * 2**20] if cap is None else [int(cap * 2**20)]
        predicted = [sum(parameter_bytes[i] for i in b) for b in bucket_assignment(parameter_bytes, caps)]
        assert seen == predicted, cap
    assert len(buckets["buckets"][100.0]) == 1  # everything fits in one bucket
    assert len(buckets["buckets"][1e-6]) == len(parameter_bytes)  # one bucket per tensor
    assert len(buckets["buckets"][0.1]) > 1
    assert results()[1]["buckets"] == buckets


def test_bucket_assignment():
    sizes = [100, 4, 100, 4, 50, 2]
    assert bucket_assignment(sizes, 1) == [[5], [4], [3], [2], [1], [0]]
    assert bucket_assignment(sizes, 10**6) == [[5, 4, 3, 2, 1, 0]]
    assert bucket_assignment(sizes, 52) == [[5, 4], [3, 2], [1, 0]]  # closed at >= 52 bytes
    assert bucket_assignment(sizes, [10, 1000]) == [[5, 4], [3, 2, 1, 0]]
    assert bucket_assignment([], 10) == []
    with pytest.raises(ValueError, match="positive int or a list of them, got 0"):
        bucket_assignment(sizes, 0)


def test_step_times_are_consistent():
    r = results()[0]
    assert results()[1]["step_time"] == r["step_time"]  # slowest-rank medians, the same on all
    st = r["step_time"]
    params = sum(p.numel() for p in mlp(STEP_TIME["sizes"]).parameters())
    assert st["parameters"] == params and st["gradient_bytes"] == 4 * params
    assert sum(st["bucket_bytes"]) == st["gradient_bytes"] and st["buckets"] == len(st["bucket_bytes"])
    for key in ("forward_backward_s", "compute_s", "ddp_step_s", "ddp_no_comm_step_s",
                "scratch_step_s", "allreduce_flat_s", "allreduce_buckets_s"):
        assert 0 < st[key] < 10 and math.isfinite(st[key]), key
        assert len(st["per_step_s"][key[:-2]]) == STEP_TIME["steps"]
    assert st["compute_s"] >= st["forward_backward_s"]
    assert [b for b, _ in st["comm_timings"]] == list(STEP_TIME["comm_sizes_bytes"])
    assert st["predicted_buckets_s"] == pytest.approx(
        st["compute_s"] + st["buckets"] * st["alpha"] + st["beta"] * st["gradient_bytes"])
    assert st["predicted_flat_s"] == pytest.approx(
        predict_ddp_step_time(st["compute_s"], st["gradient_bytes"], st["alpha"], st["beta"]))
    assert st["predicted_measured_s"] == pytest.approx(st["compute_s"] + st["allreduce_buckets_s"])
    assert st["ddp_overhead_s"] == pytest.approx(st["ddp_no_comm_step_s"] - st["compute_s"])
    assert st["predicted_overhead_s"] == pytest.approx(
        st["predicted_buckets_s"] + max(st["ddp_overhead_s"], 0.0))
    assert st["ratio_overhead"] == pytest.approx(st["predicted_overhead_s"] / st["ddp_step_s"])
    assert st["ratio_buckets"] == pytest.approx(st["predicted_buckets_s"] / st["ddp_step_s"])
    assert st["ratio_scratch"] == pytest.approx(st["predicted_buckets_s"] / st["scratch_step_s"])


def test_predict_ddp_step_time():
    assert predict_ddp_step_time(0.01, 1e6, 1e-4, 1e-9, buckets=3) == pytest.approx(0.01 + 3e-4 + 1e-3)
    assert predict_ddp_step_time(0.01, 1e6, 1e-4, 1e-9, overhead_s=0.002) == pytest.approx(
        0.01 + 0.002 + 1e-4 + 1e-3)
    with pytest.raises(ValueError, match="compute_s and overhead_s must be >= 0, got -1 and 0.0"):
        predict_ddp_step_time(-1, 1e6, 1e-4, 1e-9)
