"""Tensor parallelism (Chapter 10): the scratch Megatron MLP (column-parallel, activation,
row-parallel, with the f and g operators) gives the single-process output and gradients on 2 and 4
gloo ranks, its shards cover the full gradients, it runs exactly one all-reduce forward and one
backward of the predicted size, and parallelize_module with ColwiseParallel / RowwiseParallel
agrees as well."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aimodels.distributed.tensor_parallel import (
    ColumnParallelLinear,
    CopyToTensorParallel,
    MegatronMLP,
    ReduceFromTensorParallel,
    RowParallelLinear,
    megatron_mlp_from,
    reference_mlp_step,
    run_tensor_parallel_check,
    tensor_parallel_comm_bytes,
    transformer_mlp,
)

D_MODEL, D_FF, TOKENS = 16, 64, 6
KEYS = ["out", "x_grad", "w1_grad", "b1_grad", "w2_grad", "b2_grad"]


def expected_shard(reference: dict, rank: int, world: int) -> dict:
    """The part of the full gradients that rank `rank` of `world` should hold."""
    local = D_FF // world
    cols = slice(rank * local, (rank + 1) * local)
    return {"out": reference["out"], "x_grad": reference["x_grad"],
            "w1_grad": reference["w1_grad"][cols], "b1_grad": reference["b1_grad"][cols],
            "w2_grad": reference["w2_grad"][:, cols], "b2_grad": reference["b2_grad"]}


@pytest.fixture(scope="module")
def runs():
    """One launch per world size: 2 ranks with the DTensor run too, 4 ranks scratch only."""
    return {2: run_tensor_parallel_check(2, D_MODEL, D_FF, TOKENS, timeout=60),
            4: run_tensor_parallel_check(4, D_MODEL, D_FF, TOKENS, dtensor=False, timeout=60)}


@pytest.mark.parametrize("world", [2, 4])
def test_scratch_megatron_mlp_matches_one_process(runs, world):
    results = runs[world]
    assert [r["rank"] for r in results] == list(range(world))
    for r in results:
        assert r["world"] == world
        want = expected_shard(r["reference"], r["rank"], world)
        for key in KEYS:
            assert r["megatron"][key].shape == want[key].shape, key
            torch.testing.assert_close(r["megatron"][key], want[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("world", [2, 4])
def test_gradient_shards_cover_the_full_gradients(runs, world):
    results, reference = runs[world], runs[world][0]["reference"]
    torch.testing.assert_close(torch.cat([r["megatron"]["w1_grad"] for r in results], dim=0),
                               reference["w1_grad"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([r["megatron"]["b1_grad"] for r in results]),
                               reference["b1_grad"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([r["megatron"]["w2_grad"] for r in results], dim=1),
                               reference["w2_grad"], rtol=1e-12, atol=1e-14)
    assert reference["x_grad"].abs().sum() > 0 and reference["w1_grad"].abs().sum() > 0


@pytest.mark.parametrize("world", [2, 4])
def test_one_all_reduce_forward_and_one_backward_of_the_predicted_size(runs, world):
    predicted = tensor_parallel_comm_bytes(TOKENS, D_MODEL, 8, world)
    message = predicted["message_bytes"]
    assert message == TOKENS * D_MODEL * 8
    for r in runs[world]:
        assert r["megatron"]["comm"] == [("forward", "all-reduce", message),
                                         ("backward", "all-reduce", message)]
    assert predicted["allreduces_forward"] == predicted["allreduces_backward"] == 1


def test_parallelize_module_matches_one_process(runs):
    for r in runs[2]:
        for key in KEYS:  # weight gradients gathered from their DTensor shards
            assert r["dtensor"][key].shape == r["reference"][key].shape, key
            torch.testing.assert_close(r["dtensor"][key], r["reference"][key],
                                       rtol=1e-12, atol=1e-14)
    assert all(r["dtensor"] is None for r in runs[4])


# --- single process: the cut, the algebra and the formula ---------------------------------------

def test_megatron_mlp_from_cuts_the_right_slices():
    full = transformer_mlp(D_MODEL, D_FF)
    lin1, _, lin2 = full
    piece = megatron_mlp_from(full, rank=1, world=2)
    assert isinstance(piece, MegatronMLP) and isinstance(piece.act, nn.GELU)
    assert isinstance(piece.fc1, ColumnParallelLinear) and isinstance(piece.fc2, RowParallelLinear)
    torch.testing.assert_close(piece.fc1.weight, lin1.weight[32:], rtol=0, atol=0)
    torch.testing.assert_close(piece.fc1.bias, lin1.bias[32:], rtol=0, atol=0)
    torch.testing.assert_close(piece.fc2.weight, lin2.weight[:, 32:], rtol=0, atol=0)
    torch.testing.assert_close(piece.fc2.bias, lin2.bias, rtol=0, atol=0)
    assert piece.fc1.weight.data_ptr() != lin1.weight.data_ptr()  # a copy, not a view


def test_sum_of_row_parallel_partials_plus_one_bias_is_the_full_output():
    """The algebra behind g: Z = sum_i act(X A_i) B_i + b, done by hand on one process."""
    full = transformer_mlp(D_MODEL, D_FF, activation="relu")
    x = torch.randn(TOKENS, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    partials = []
    for rank in range(4):
        piece = megatron_mlp_from(full, rank, 4)
        partials.append(F.linear(piece.act(piece.fc1(x)), piece.fc2.weight))
    torch.testing.assert_close(sum(partials) + full[2].bias, full(x), rtol=1e-12, atol=1e-14)


def test_world_of_one_needs_no_group_and_equals_the_full_mlp():
    full = transformer_mlp(D_MODEL, D_FF)
    x = torch.randn(TOKENS, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.zeros(TOKENS, D_MODEL, dtype=torch.float64)
    ref = reference_mlp_step(full, x, target)
    piece = megatron_mlp_from(full, 0, 1)
    xg = x.clone().requires_grad_(True)
    out = piece(xg)
    F.mse_loss(out, target).backward()
    torch.testing.assert_close(out, ref["out"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xg.grad, ref["x_grad"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(piece.fc1.weight.grad, ref["w1_grad"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(piece.fc2.weight.grad, ref["w2_grad"], rtol=1e-12, atol=1e-14)


def test_f_and_g_are_identities_without_a_group():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = ReduceFromTensorParallel.apply(CopyToTensorParallel.apply(x))
    torch.testing.assert_close(y, x)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_megatron_mlp_from_rejects_what_it_cannot_cut():
    full = transformer_mlp(D_MODEL, D_FF)
    with pytest.raises(ValueError, match=r"hidden width .*\(64\) must be divisible by the tensor-parallel world size 3"):
        megatron_mlp_from(full, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        megatron_mlp_from(full, 2, 2)
    with pytest.raises(ValueError, match=r"Sequential\(Linear, activation, Linear\), got \['Linear', 'Linear'\]"):
        megatron_mlp_from(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), 0, 2)
    with pytest.raises(ValueError, match="activation must be 'gelu' or 'relu'"):
        transformer_mlp(activation="tanh")


def test_comm_bytes_formula():
    two = tensor_parallel_comm_bytes(batch_tokens=1024, hidden=4096, bytes_per_element=2, world=2)
    message = 1024 * 4096 * 2
    assert two["message_bytes"] == message
    assert two["ring_bytes_per_rank_per_allreduce"] == message  # 2 (N-1)/N = 1 for N = 2
    assert two["ring_bytes_per_rank_per_step"] == 2 * message
    eight = tensor_parallel_comm_bytes(1024, 4096, 2, 8)
    assert eight["ring_bytes_per_rank_per_allreduce"] == 2 * 7 / 8 * message
    one = tensor_parallel_comm_bytes(1024, 4096, 2, 1)
    assert one["allreduces_forward"] == 0 and one["ring_bytes_per_rank_per_step"] == 0
    with pytest.raises(ValueError, match="world must be an int >= 1, got 0"):
        tensor_parallel_comm_bytes(1024, 4096, 2, 0)
