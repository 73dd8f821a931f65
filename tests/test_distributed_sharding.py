"""Sharded data parallelism (Chapter 10): ZeRO's memory and traffic formulas reproduce the paper's
worked example, and FSDP2 on two gloo ranks trains exactly like DDP and like one process while
each rank holds half the model states, with the all-gather / reduce-scatter schedule of ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aimodels.distributed.common import make_optimizer, mlp
from aimodels.distributed.sharding import (
    ZERO_STAGES,
    CommEvent,
    model_state_bytes,
    run_fsdp_vs_ddp,
    train_fsdp,
    zero_communication_bytes,
    zero_memory_bytes,
)

GB = 1e9
PSI = 7.5e9  # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, N_d = 64, K = 12


# --- ZeRO memory: the paper's numbers ------------------------------------------------------------

@pytest.mark.parametrize("stage, paper_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_memory_matches_the_papers_worked_example(stage, paper_gb):
    got = zero_memory_bytes(PSI, 64, stage)
    assert round(got / GB, 1) == paper_gb


def test_zero_memory_exact_values_of_the_formulas():
    assert zero_memory_bytes(PSI, 64, 0) == 16 * PSI
    assert zero_memory_bytes(PSI, 64, 1) == 4 * PSI + 12 * PSI / 64  # 31.40625 GB
    assert zero_memory_bytes(PSI, 64, 2) == 2 * PSI + 14 * PSI / 64  # 16.640625 GB
    assert zero_memory_bytes(PSI, 64, 3) == 16 * PSI / 64  # 1.875 GB


def test_zero_memory_reductions_approach_4x_8x_and_n():
    """Section 5.4: up to 4x, 8x and N_d x less than plain DP."""
    n = 10**6
    base = zero_memory_bytes(PSI, n, 0)
    assert base / zero_memory_bytes(PSI, n, 1) == pytest.approx(4, rel=1e-4)
    assert base / zero_memory_bytes(PSI, n, 2) == pytest.approx(8, rel=1e-4)
    assert base / zero_memory_bytes(PSI, n, 3) == pytest.approx(n)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_device_means_nothing_to_partition(stage):
    assert zero_memory_bytes(1000, 1, stage) == zero_memory_bytes(1000, 1, 0) == 16 * 1000


def test_zero_memory_uses_the_given_byte_counts():
    # Pure float64 AdamW: 8-byte parameters and gradients, two 8-byte moments (K = 16).
    assert zero_memory_bytes(100, 4, 0, 16, 8, 8) == 3200
    assert zero_memory_bytes(100, 4, 1, 16, 8, 8) == 800 + 800 + 400
    assert zero_memory_bytes(100, 4, 2, 16, 8, 8) == 800 + 200 + 400
    assert zero_memory_bytes(100, 4, 3, 16, 8, 8) == 800


@pytest.mark.parametrize("stage", [-1, 4, 1.5, True, "1"])
def test_zero_memory_rejects_unknown_stages(stage):
    with pytest.raises(ValueError, match="stage must be one of 0, 1, 2, 3"):
        zero_memory_bytes(1000, 2, stage)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_params=0, n_devices=2), "n_params must be a positive number, got 0"),
    (dict(n_params=-5.0, n_devices=2), "n_params must be a positive number"),
    (dict(n_params=10, n_devices=0), r"n_devices must be an int >= 1, got 0"),
    (dict(n_params=10, n_devices=2.0), r"n_devices must be an int >= 1, got 2.0"),
    (dict(n_params=10, n_devices=2, optimizer_bytes_per_param=-1), "optimizer_bytes_per_param must be a number >= 0"),
    (dict(n_params=10, n_devices=2, param_bytes=-2), "param_bytes must be a number >= 0"),
])
def test_zero_memory_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zero_memory_bytes(stage=1, **kwargs)


def test_zero_communication_is_2psi_up_to_stage_2_and_3psi_at_stage_3():
    """Section 7: P_os and P_os+g cost what DP costs; P_os+g+p costs 1.5x."""
    dp = zero_communication_bytes(PSI, 0)
    assert dp == 2 * PSI * 2  # 2 Psi fp16 elements
    assert zero_communication_bytes(PSI, 1) == zero_communication_bytes(PSI, 2) == dp
    assert zero_communication_bytes(PSI, 3) == 1.5 * dp
    assert zero_communication_bytes(100, 3, bytes_per_element=4) == 1200


def test_zero_communication_ring_factor():
    assert zero_communication_bytes(100, 0, 2, n_devices=4) == 400 * 3 / 4
    assert zero_communication_bytes(100, 3, 2, n_devices=1) == 0
    with pytest.raises(ValueError, match="n_devices must be an int >= 1, got 0"):
        zero_communication_bytes(100, 3, n_devices=0)
    with pytest.raises(ValueError, match="stage must be one of"):
        zero_communication_bytes(100, 5)
    with pytest.raises(ValueError, match="bytes_per_element must be a positive number"):
        zero_communication_bytes(100, 1, 0)


def test_stage_names():
    assert set(ZERO_STAGES) == {0, 1, 2, 3}
    assert "P_os+g+p" in ZERO_STAGES[3]


# --- model_state_bytes and argument checks, single process --------------------------------------

def test_model_state_bytes_counts_params_grads_and_adam_moments():
    model = mlp((4, 6, 2))
    n = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model.parameters(), "adamw", 0.01)
    before = model_state_bytes(model, opt)
    assert before == {"params": 8 * n, "grads": 0, "optimizer": 0, "total": 8 * n}
    nn.functional.mse_loss(model(torch.ones(3, 4, dtype=torch.float64)),
                           torch.zeros(3, 2, dtype=torch.float64)).backward()
    opt.step()  # creates exp_avg and exp_avg_sq; the scalar "step" is not counted
    assert model_state_bytes(model, opt) == {"params": 8 * n, "grads": 8 * n, "optimizer": 16 * n,
                                             "total": 32 * n}


def test_train_fsdp_checks_its_arguments_before_touching_the_group():
    model = mlp((4, 6, 2))
    x, y = torch.zeros(3, 4, 4), torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match=r"must be \[steps, batch, features\]"):
        train_fsdp(model, x[0], y[0])
    with pytest.raises(ValueError, match="record_step must index one of the 3 steps, got 3"):
        train_fsdp(model, x, y, record_step=3)


# --- FSDP2 vs DDP vs one process, two gloo ranks (one launch for all checks) --------------------

@pytest.fixture(scope="module")
def two_ranks():
    return run_fsdp_vs_ddp(world_size=2, steps=4, batch_size=8, optimizer="adamw", lr=0.01,
                           timeout=60)


def test_fsdp_and_ddp_losses_equal_the_single_process_ones(two_ranks):
    single = torch.tensor(two_ranks["single"]["losses"], dtype=torch.float64)
    assert len(single) == 4
    for kind in ("ddp", "fsdp"):
        torch.testing.assert_close(torch.tensor(two_ranks[kind]["losses"], dtype=torch.float64),
                                   single, rtol=1e-12, atol=1e-12)
    assert single[-1] != single[0]  # the weights did change


def test_fsdp_and_ddp_final_weights_equal_the_single_process_ones(two_ranks):
    single = two_ranks["single"]["state"]
    assert set(single) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    for kind in ("ddp", "fsdp"):
        state = two_ranks[kind]["state"]
        assert set(state) == set(single)
        for name, value in single.items():
            assert state[name].shape == value.shape  # full tensors, not shards
            torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-12)
    initial = mlp()
    assert not torch.allclose(initial[0].weight, single["0.weight"])


def test_each_fsdp_rank_holds_half_of_what_a_ddp_rank_holds(two_ranks):
    n = two_ranks["n_params"]
    assert n == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 8 + 8
    for ddp, fsdp in zip(two_ranks["ddp"]["memory"], two_ranks["fsdp"]["memory"], strict=True):
        # float64 AdamW: 8-byte parameters and gradients, two 8-byte moments
        assert ddp == {"params": 8 * n, "grads": 8 * n, "optimizer": 16 * n, "total": 32 * n}
        assert 0.45 <= fsdp["total"] / ddp["total"] <= 0.55
        # every dimension 0 here is even, so the shards are exactly half
        assert all(2 * fsdp[k] == ddp[k] for k in ddp)
        assert ddp["total"] == zero_memory_bytes(n, 2, 0, 16, 8, 8)
        assert fsdp["total"] == zero_memory_bytes(n, 2, 3, 16, 8, 8)


def test_fsdp_schedule_gathers_forward_then_backward_and_reduce_scatters_each_layer(two_ranks):
    events = two_ranks["fsdp"]["events"]
    assert all(isinstance(e, CommEvent) for e in events)
    assert {e.phase for e in events} == {"forward", "backward"}  # the optimizer step is local
    forward = [e for e in events if e.phase == "forward"]
    backward = [e for e in events if e.phase == "backward"]
    assert events[:len(forward)] == forward  # all forward traffic comes first
    assert [(e.op, e.module) for e in forward] == [("all-gather", "0"), ("all-gather", "2"),
                                                   ("all-gather", "4")]
    gathers = [e.module for e in backward if e.op == "all-gather"]
    scatters = [e.module for e in backward if e.op == "reduce-scatter"]
    assert gathers == ["4", "2", "0"] and scatters == ["4", "2", "0"]  # reverse layer order
    for e in backward:  # a layer's gradient is reduce-scattered only after it was gathered
        if e.op == "reduce-scatter":
            assert backward.index(e) > [(b.op, b.module) for b in backward].index(
                ("all-gather", e.module))
    layer_bytes = {"0": 8 * (32 * 64 + 64), "2": 8 * (64 * 64 + 64), "4": 8 * (64 * 8 + 8)}
    for e in events:
        assert e.full_bytes == layer_bytes[e.module] and e.shard_bytes * 2 == e.full_bytes


def test_fsdp_traffic_is_zero_stage_3_traffic(two_ranks):
    """Two all-gathers and one reduce-scatter of all parameters: 3 Psi (ZeRO section 7.2.2)."""
    events, n = two_ranks["fsdp"]["events"], two_ranks["n_params"]
    gathered = sum(e.full_bytes for e in events if e.op == "all-gather")
    scattered = sum(e.full_bytes for e in events if e.op == "reduce-scatter")
    assert gathered == 2 * 8 * n and scattered == 8 * n
    assert gathered + scattered == zero_communication_bytes(n, 3, 8)
    # on a ring each rank sends (N - 1) of its N shards' worth per collective
    sent = sum(e.full_bytes - e.shard_bytes for e in events)
    assert sent == zero_communication_bytes(n, 3, 8, n_devices=2)
