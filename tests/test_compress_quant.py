"""Quantisation from scratch (Chapter 11): the round-trip error is at most half a step,
the integer range is used end to end, per-channel scales beat per-tensor ones on data with
an outlier, int8 x int8 products are exact and their dequantised error stays within the
derived bound, the int8 linear layer matches the float one, sizes are honest, and
quantisation-aware training passes straight-through gradients and still learns."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aimodels.compress.quant import (
    MAX_INT8_MATMUL_K,
    FakeQuantSTE,
    QATLinear,
    QuantizedLinear,
    convert_qat,
    dequantize,
    dequantize_groupwise,
    fake_quantize,
    fake_quantize_groupwise,
    int8_matmul,
    matmul_error_bound,
    quant_range,
    quantize,
    quantize_gpt_weights_,
    quantize_groupwise,
    quantize_linears,
    saved_size_bytes,
    state_dict_bytes,
)
from aimodels.gpt import GPT, GPTConfig

SHAPES = [(7,), (4, 9), (3, 5, 6)]
BITS = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.float64]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def axes(ndim: int) -> list[int | None]:
    return [None, *range(ndim), -1]


def reduce_dims(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(range(ndim)) if axis is None else tuple(d for d in range(ndim)
                                                         if d != axis % ndim)


def tiny_gpt(seed: int = 0, d_model: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, context_length=16, d_model=d_model, n_heads=2,
                         n_layers=2))


# --------------------------------------------------------------------------- ranges
def test_quant_range_is_restricted_symmetric_and_full_unsigned():
    assert quant_range(8) == (-127, 127)
    assert quant_range(4) == (-7, 7)
    assert quant_range(2) == (-1, 1)
    assert quant_range(8, symmetric=False) == (0, 255)
    assert quant_range(4, symmetric=False) == (0, 15)


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(dtype, symmetric):
    eps = torch.finfo(dtype).eps
    for (seed, shape), bits in itertools.product(enumerate(SHAPES), BITS):
        x = randn(*shape, seed=seed, dtype=dtype) * 3 + 0.5
        for axis in axes(len(shape)):
            q, scale, zero = quantize(x, bits, symmetric, axis)
            assert q.shape == x.shape and scale.dtype == dtype and zero.dtype == torch.int32
            expected = [1] * x.ndim
            if axis is not None:
                expected[axis] = x.shape[axis]
            assert list(scale.shape) == (expected if axis is not None else [])
            assert scale.shape == zero.shape
            assert bool((scale > 0).all())
            x_hat = dequantize(q, scale, zero, axis)
            assert x_hat.dtype == dtype
            # half a step, plus the float rounding of x / s and of (q - z) s
            slack = 8 * eps * (x.abs() + scale * 2**bits)
            assert bool(((x - x_hat).abs() <= scale / 2 + slack).all()), (shape, bits, axis)


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_use_the_whole_integer_range(dtype):
    for (seed, shape), bits in itertools.product(enumerate(SHAPES), BITS):
        x = randn(*shape, seed=10 + seed, dtype=dtype)
        for axis in axes(len(shape)):
            dims = reduce_dims(x.ndim, axis)
            # symmetric: codes in [-Q, Q], int8, and the largest |x| of each channel -> +-Q
            qmin, qmax = quant_range(bits)
            q, scale, zero = quantize(x, bits, True, axis)
            assert q.dtype == torch.int8 and bool((zero == 0).all())
            assert int(q.min()) >= qmin and int(q.max()) <= qmax
            at_max = x.abs() == x.abs().amax(dim=dims, keepdim=True)
            assert bool((q[at_max].abs() == qmax).all())
            assert bool((torch.sign(q[at_max]) == torch.sign(x[at_max])).all())
            # asymmetric: uint8 codes in [0, 2^b - 1]; the min -> 0 and the max -> 2^b - 1
            qmin, qmax = quant_range(bits, symmetric=False)
            q, scale, zero = quantize(x, bits, False, axis)
            assert q.dtype == torch.uint8 and qmin == 0
            assert int(q.max()) <= qmax
            lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
            straddles = ((lo < 0) & (hi > 0)).expand_as(x)
            assert bool(straddles.any())
            assert bool((q[(x == lo) & straddles] == 0).all())
            assert bool((q[(x == hi) & straddles] == qmax).all())
            assert bool(((zero >= 0) & (zero <= qmax)).all())


def test_asymmetric_range_always_includes_zero_so_zero_is_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.5], [-4.0, -1.0, -0.5, 0.0]])
    for axis in (None, 0):
        q, scale, zero = quantize(x, 8, symmetric=False, axis=axis)
        x_hat = dequantize(q, scale, zero)
        assert bool((x_hat[x == 0] == 0).all())
    q, scale, zero = quantize(x[0], 8, symmetric=False)  # all >= 0: zero point 0
    assert int(zero) == 0 and int(q[-1]) == 255


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_beats_per_tensor_when_one_channel_has_an_outlier(dtype):
    for seed, bits in itertools.product(range(3), (4, 8)):
        w = randn(16, 64, seed=seed, dtype=dtype)
        w[3, 5] = 100.0  # one large weight in output channel 3
        errors = {}
        for axis in (None, 0):
            q, scale, zero = quantize(w, bits, True, axis)
            errors[axis] = (dequantize(q, scale, zero) - w).pow(2).mean().item()
        assert errors[0] <= errors[None]
        assert errors[0] < 0.1 * errors[None]
        # per tensor, the outlier's step is so large that most other weights round to 0
        q, _, _ = quantize(w, bits, True)
        if bits == 4:
            assert (q == 0).float().mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantising_a_dequantised_tensor_again_gives_the_same_codes(dtype, symmetric):
    for (seed, shape), bits in itertools.product(enumerate(SHAPES), BITS):
        x = randn(*shape, seed=20 + seed, dtype=dtype) * 2 - 0.3
        for axis in axes(len(shape)):
            q, scale, zero = quantize(x, bits, symmetric, axis)
            q2, scale2, zero2 = quantize(dequantize(q, scale, zero), bits, symmetric, axis)
            assert torch.equal(q2, q), (shape, bits, axis)
            assert torch.equal(zero2, zero)
            torch.testing.assert_close(scale2, scale)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_tensors_and_channels_get_scale_one_and_dequantise_to_zero(symmetric):
    q, scale, zero = quantize(torch.zeros(3, 4), 8, symmetric)
    assert float(scale) == 1.0 and bool((q.to(torch.int32) == zero).all())
    assert bool((dequantize(q, scale, zero) == 0).all())
    x = randn(3, 4)
    x[1] = 0.0
    q, scale, zero = quantize(x, 4, symmetric, axis=0)
    assert float(scale[1, 0]) == 1.0
    x_hat = dequantize(q, scale, zero)
    assert bool((x_hat[1] == 0).all())
    assert bool(((x_hat - x).abs() <= scale / 2 + 1e-6).all())


def test_dequantize_accepts_one_dimensional_per_channel_scales_with_an_axis():
    x = randn(5, 6)
    for axis in (0, 1):
        q, scale, zero = quantize(x, 8, False, axis)
        torch.testing.assert_close(dequantize(q, scale.reshape(-1), zero.reshape(-1), axis),
                                   dequantize(q, scale, zero))


def test_half_precision_inputs_are_computed_in_float32():
    x = randn(4, 8).to(torch.bfloat16)
    q, scale, zero = quantize(x, 8, axis=0)
    assert scale.dtype == torch.float32
    assert bool(((dequantize(q, scale, zero) - x.float()).abs() <= scale / 2 + 1e-6).all())


# --------------------------------------------------------------------------- groups
@pytest.mark.parametrize("dtype", DTYPES)
def test_groupwise_quantisation_has_one_scale_per_group(dtype):
    for bits, group_size in ((4, 32), (3, 16), (8, 8)):
        w = randn(2, 6, 64, seed=bits, dtype=dtype)
        q, scale = quantize_groupwise(w, bits, group_size)
        assert q.dtype == torch.int8 and q.shape == w.shape
        assert scale.shape == (2, 6, 64 // group_size) and scale.dtype == dtype
        qmin, qmax = quant_range(bits)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
        groups = w.reshape(2, 6, -1, group_size)
        torch.testing.assert_close(scale, groups.abs().amax(-1) / qmax)
        w_hat = dequantize_groupwise(q, scale)
        assert w_hat.dtype == dtype
        step = scale.repeat_interleave(group_size, dim=-1)
        assert bool(((w_hat - w).abs() <= step / 2 * (1 + 1e-6)).all())
        torch.testing.assert_close(fake_quantize_groupwise(w, bits, group_size), w_hat)


def test_groups_confine_an_outlier_better_than_channels():
    w = randn(8, 128, seed=3)
    w[2, 7] = 50.0
    q, scale, zero = quantize(w, 4, True, axis=0)
    per_channel = (dequantize(q, scale, zero) - w).pow(2).mean()
    per_group = (fake_quantize_groupwise(w, 4, 32) - w).pow(2).mean()
    assert per_group < per_channel


def test_quantize_gpt_weights_changes_only_block_matrices_and_counts_bytes():
    model = tiny_gpt()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    logits_before = model(idx)
    info = quantize_gpt_weights_(model, bits=4, group_size=16)
    expected = [f"blocks.{i}.{n}" for i in range(2) for n in
                ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc.weight",
                 "mlp.proj.weight")]
    assert info["tensors"] == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), name
            # already on the 4-bit grid: quantising again changes nothing
            torch.testing.assert_close(fake_quantize_groupwise(p.detach(), 4, 16), p.detach())
            assert (p.detach() - before[name]).abs().max() < before[name].abs().max() / 7
        else:
            assert torch.equal(p, before[name]), name
    d, ff = 32, 128
    weights = 2 * (3 * d * d + d * d + ff * d + d * ff)
    assert info["weights"] == weights and info["fp32_bytes"] == 4 * weights
    assert info["quantized_bytes"] == weights // 2 + 2 * (weights // 16)
    assert info["compression"] == pytest.approx(32 / (4 + 16 / 16))
    others = sum(p.numel() for n, p in model.named_parameters() if n not in expected)
    assert info["other_fp32_bytes"] == 4 * others
    assert info["model_quantized_bytes"] == info["quantized_bytes"] + 4 * others
    logits_after = model(idx)
    assert torch.isfinite(logits_after).all()
    assert (logits_after - logits_before).abs().max() < 0.5 * logits_before.abs().max()


def test_quantize_gpt_weights_checks_everything_before_changing_anything():
    model = tiny_gpt(d_model=48)  # 48 is not a multiple of 32
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="must be a positive multiple of group_size=32"):
        quantize_gpt_weights_(model, 4, 32)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(TypeError, match="expected an aimodels.gpt.GPT"):
        quantize_gpt_weights_(nn.Linear(32, 32))


# --------------------------------------------------------------------------- integer products
@pytest.mark.parametrize("backend", ["auto", "int_mm", "emulate"])
def test_int8_matmul_is_the_exact_integer_product(backend):
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 1, 1), (1, 768, 64), (3, 7, 5), (16, 24, 8), (17, 33, 9), (64, 96, 40)]:
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        c = int8_matmul(a, b, backend)
        assert c.dtype == torch.int32 and c.shape == (m, n)
        assert torch.equal(c.long(), a.long() @ b.long())
    # the extremes: every term 128 * 128, the sum well beyond float32's exact integers
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8)
    c = int8_matmul(a, a.t(), backend)
    assert int(c[0, 0]) == 128 * 128 * k
    # an odd sum above 2**24, which float32 arithmetic could not hold exactly
    a = torch.full((1, k), 127, dtype=torch.int8)
    a[0, -1] = 1
    assert int(int8_matmul(a, a.t(), backend)) == (k - 1) * 127 * 127 + 1
    # a transposed view works, as QuantizedLinear uses it
    w = torch.randint(-127, 128, (12, 32), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (5, 32), generator=g, dtype=torch.int8)
    assert torch.equal(int8_matmul(x, w.t(), backend).long(), x.long() @ w.long().t())


def quantised_pair(m: int, k: int, n: int, seed: int, per_channel: bool):
    a = randn(m, k, seed=seed, dtype=torch.float64) * 2
    b = randn(k, n, seed=seed + 100, dtype=torch.float64) * 0.1
    a[0, 0] = 9.0  # an outlier, so the bound is tested with uneven scales
    q_a, s_a, _ = quantize(a, 8, True, 0 if per_channel else None)  # per row of a
    q_b, s_b, _ = quantize(b, 8, True, 1 if per_channel else None)  # per column of b
    return a, b, q_a, s_a, q_b, s_b


@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantised_int8_product_stays_within_the_error_bound(per_channel):
    for seed, (m, k, n) in enumerate([(1, 16, 3), (5, 64, 7), (17, 128, 33), (8, 768, 16)]):
        a, b, q_a, s_a, q_b, s_b = quantised_pair(m, k, n, seed, per_channel)
        s_row = s_a.reshape(-1, 1) if per_channel else s_a
        s_col = s_b.reshape(1, -1) if per_channel else s_b
        y_hat = int8_matmul(q_a, q_b).to(torch.float64) * s_row * s_col
        # the scales factor out of the sum: the same as multiplying the dequantised floats
        torch.testing.assert_close(y_hat, dequantize(q_a, s_a) @ dequantize(q_b, s_b))
        bound = matmul_error_bound(a, b, s_row, s_col)
        assert bound.shape == (m, n)
        error = (y_hat - a @ b).abs()
        assert bool((error <= bound + 1e-12).all()), (m, k, n)
        assert bool((error > 0).any())  # there is an error to bound


def test_error_bound_formula_on_a_hand_example():
    a = torch.tensor([[1.0, -2.0]])
    b = torch.tensor([[3.0], [0.5]])
    # sum_k |a| s_b / 2 + s_a |b| / 2 + s_a s_b / 4 with s_a = 0.1, s_b = 0.2
    expected = (1 + 2) * 0.1 + 0.05 * (3 + 0.5) + 2 * 0.1 * 0.2 / 4
    torch.testing.assert_close(matmul_error_bound(a, b, 0.1, 0.2), torch.tensor([[expected]]))


def test_error_bound_is_nearly_attained_when_all_rounding_errors_push_the_same_way():
    # 0.5 sits exactly half a step from the codes 0 and 1 (step 1) and rounds to 0
    a = torch.tensor([[127.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.5], [127.0]], dtype=torch.float64)
    q_a, s_a, _ = quantize(a)
    q_b, s_b, _ = quantize(b)
    assert float(s_a) == 1.0 and float(s_b) == 1.0
    error = (dequantize(q_a, s_a) @ dequantize(q_b, s_b) - a @ b).abs()
    bound = matmul_error_bound(a, b, s_a, s_b)
    assert float(error) == 127.0 and float(bound) == 128.0


def test_int8_matmul_and_error_bound_reject_bad_operands():
    a = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="expected a_q to be a torch.int8 tensor, got torch.float32"):
        int8_matmul(a.float(), a.t())
    with pytest.raises(TypeError, match="expected b_q to be a torch.int8 tensor, got list"):
        int8_matmul(a, [[1]])
    with pytest.raises(ValueError, match=r"expected a_q to be a 2-D matrix, got shape \[1, 2, 3\]"):
        int8_matmul(a[None], a.t())
    with pytest.raises(ValueError, match=r"inner dimensions differ: a_q is \[2, 3\] and b_q is \[2, 3\]"):
        int8_matmul(a, a)
    with pytest.raises(ValueError, match="backend must be"):
        int8_matmul(a, a.t(), backend="fast")
    long_k = MAX_INT8_MATMUL_K + 1
    with pytest.raises(ValueError, match=f"K={long_k} is too long"):
        int8_matmul(torch.zeros(1, long_k, dtype=torch.int8),
                    torch.zeros(long_k, 1, dtype=torch.int8))
    with pytest.raises(TypeError, match="expected a to be a floating-point tensor"):
        matmul_error_bound(a, a.t().float(), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"inner dimensions differ: a is \[2, 3\]"):
        matmul_error_bound(a.float(), a.float(), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"s_a of shape \[4\] does not broadcast to \[2, 3\]"):
        matmul_error_bound(a.float(), a.t().float(), torch.ones(4), 1.0)


# --------------------------------------------------------------------------- int8 linear
def reference_and_bound(layer: nn.Linear, x: torch.Tensor):
    """Float64 reference output and the error bound for QuantizedLinear's arithmetic."""
    rows = x.reshape(-1, layer.in_features)
    w = layer.weight.detach()
    _, s_x, _ = quantize(rows, 8, True, axis=0)  # [M, 1], per row
    _, s_w, _ = quantize(w, 8, True, axis=0)  # [out, 1], per output channel
    reference = rows.double() @ w.double().t() + layer.bias.detach().double()
    bound = matmul_error_bound(rows.double(), w.double().t(), s_x.double(), s_w.double().t())
    return reference, bound + 1e-5 * reference.abs() + 1e-6  # plus float32 rounding


def test_quantized_linear_matches_the_float_layer_within_the_bound():
    torch.manual_seed(0)
    layer = nn.Linear(256, 96)
    qlayer = QuantizedLinear.from_float(layer)
    for seed, shape in enumerate([(1, 256), (33, 256), (2, 5, 256)]):
        x = randn(*shape, seed=seed)
        y = qlayer(x)
        assert y.shape == (*shape[:-1], 96) and y.dtype == torch.float32
        reference, bound = reference_and_bound(layer, x)
        error = (y.reshape(-1, 96).double() - reference).abs()
        assert bool((error <= bound).all())
        assert error.max() < 0.02 * reference.abs().max()
        assert (y - layer(x)).pow(2).mean().sqrt() < 0.02 * layer(x).pow(2).mean().sqrt()


def test_quantized_linear_state_dict_holds_int8_weights_scales_and_bias():
    layer = nn.Linear(64, 32)
    qlayer = QuantizedLinear.from_float(layer)
    state = qlayer.state_dict()
    assert list(state) == ["weight", "weight_scale", "bias"]
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (32, 64)
    assert state["weight_scale"].dtype == torch.float32 and state["weight_scale"].shape == (32,)
    torch.testing.assert_close(state["bias"], layer.bias.detach())
    torch.testing.assert_close(qlayer.dequantized_weight(), layer.weight.detach(),
                               atol=float(state["weight_scale"].max()) / 2, rtol=0)
    fresh = QuantizedLinear(64, 32)
    fresh.load_state_dict(state)
    x = randn(3, 64)
    assert torch.equal(fresh(x), qlayer(x))
    no_bias = QuantizedLinear.from_float(nn.Linear(64, 8, bias=False))
    assert list(no_bias.state_dict()) == ["weight", "weight_scale"]
    assert no_bias(x).shape == (3, 8)


def test_quantized_linear_handles_other_dtypes_and_empty_batches_and_rejects_bad_input():
    qlayer = QuantizedLinear.from_float(nn.Linear(16, 4))
    x = randn(3, 16)
    assert qlayer(x.double()).dtype == torch.float64
    torch.testing.assert_close(qlayer(x.double()).float(), qlayer(x))
    assert qlayer(randn(16)).shape == (4,)
    assert qlayer(torch.zeros(0, 16)).shape == (0, 4)
    assert bool((qlayer(torch.zeros(2, 16)) == qlayer.bias).all())
    with pytest.raises(ValueError, match=r"expected an input of shape \[\.\.\., 16\], got \[3, 15\]"):
        qlayer(randn(3, 15))
    with pytest.raises(TypeError, match="expected the input to be a floating-point tensor"):
        qlayer(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        QuantizedLinear.from_float(nn.Conv1d(2, 2, 1))


def test_quantized_linear_quantises_each_input_row_as_quantize_does():
    from aimodels.compress.quant import _quantize_rows

    x = randn(9, 40, seed=4) * torch.linspace(0.01, 10, 9)[:, None]
    x[2] = 0.0
    q, scale = _quantize_rows(x)
    q_ref, scale_ref, _ = quantize(x, 8, True, axis=0)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 10))


def test_quantize_linears_replaces_layers_in_place_and_the_model_still_matches():
    model = mlp()
    x = randn(8, 32)
    expected = model(x).detach()
    float_bytes = state_dict_bytes(model)
    assert quantize_linears(model, skip=("4",)) is model
    assert [type(m).__name__ for m in model] == ["QuantizedLinear", "GELU", "QuantizedLinear",
                                                 "GELU", "Linear"]
    y = model(x)
    assert (y - expected).abs().max() < 0.03 * expected.abs().max()
    assert state_dict_bytes(model) < 0.5 * float_bytes
    with pytest.raises(ValueError, match=r"skip names \['head'\] are not modules of the model"):
        quantize_linears(mlp(), skip=("head",))
    with pytest.raises(TypeError, match="skip must be a collection of module names"):
        quantize_linears(mlp(), skip="4")
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        quantize_linears("model")
    assert isinstance(quantize_linears(nn.Linear(4, 4)), QuantizedLinear)


def test_quantize_linears_keeps_a_shared_layer_shared():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    quantize_linears(model)
    assert isinstance(model["a"], QuantizedLinear) and model["a"] is model["b"][0]


def test_linear_layers_that_pytorch_attention_reads_directly_are_left_alone():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True),
                           "ff": nn.Linear(8, 8)})
    quantize_linears(model)
    assert isinstance(model["ff"], QuantizedLinear)
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = randn(1, 3, 8)
    assert model["attn"](x, x, x)[0].shape == (1, 3, 8)
    model = convert_qat(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)}))
    assert not isinstance(model["attn"].out_proj, QATLinear)


def test_quantize_linears_on_a_gpt_keeps_its_logits_close():
    model = tiny_gpt()
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = model(idx).detach()
    quantize_linears(model)
    replaced = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert replaced == sorted(f"blocks.{i}.{n}" for i in range(2)
                              for n in ("attn.in_proj", "attn.out_proj", "mlp.fc", "mlp.proj"))
    logits = model(idx)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_state_dict_bytes_and_safetensors_file_size(tmp_path):
    layer = nn.Linear(256, 512)
    float_bytes = 4 * (256 * 512 + 512)
    assert state_dict_bytes(layer) == float_bytes
    qlayer = QuantizedLinear.from_float(layer)
    int8_bytes = 256 * 512 + 4 * 512 + 4 * 512
    assert state_dict_bytes(qlayer) == int8_bytes
    for module, tensor_bytes in ((layer, float_bytes), (qlayer, int8_bytes)):
        size = saved_size_bytes(module)
        assert tensor_bytes <= size < tensor_bytes + 1024  # plus a small JSON header
    path = tmp_path / "q.safetensors"
    assert saved_size_bytes(qlayer, path) == path.stat().st_size
    from safetensors.torch import load_file

    loaded = load_file(path)
    assert loaded["weight"].dtype == torch.int8
    # a tied weight is stored once
    tied = nn.ModuleDict({"emb": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
    tied["head"].weight = tied["emb"].weight
    assert state_dict_bytes(tied) == 100 * 16 * 4
    assert saved_size_bytes(tied) < 100 * 16 * 4 + 1024


# --------------------------------------------------------------------------- QAT
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_forward_is_dequantize_of_quantize_and_gradient_passes_straight(symmetric):
    for axis in (None, 0, 1):
        x = randn(6, 10, seed=5, dtype=torch.float64).requires_grad_()
        y = FakeQuantSTE.apply(x, 4, symmetric, axis)
        q, scale, zero = quantize(x.detach(), 4, symmetric, axis)
        torch.testing.assert_close(y.detach(), dequantize(q, scale, zero))
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))  # nothing is clipped
        upstream = randn(6, 10, seed=6, dtype=torch.float64)
        x.grad = None
        fake_quantize(x, 4, axis, symmetric).backward(upstream)
        assert torch.equal(x.grad, upstream)


def test_straight_through_gradient_is_zero_where_a_fixed_range_clips():
    x = torch.tensor([-2.0, -0.9, -0.2, 0.0, 0.3, 0.95, 1.5], requires_grad=True)
    scale = torch.tensor(1 / 7)  # 4-bit symmetric codes -7..7 cover [-1, 1]
    y = fake_quantize(x, 4, scale=scale)
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, -6 / 7, -1 / 7, 0.0, 2 / 7,
                                                         1.0, 1.0]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # asymmetric with a zero point: codes 0..15 cover [-5 s, 10 s]
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.2], requires_grad=True)
    y = fake_quantize(x, 4, symmetric=False, scale=torch.tensor(0.1),
                      zero_point=torch.tensor(5))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(y.detach(), torch.tensor([-0.5, -0.5, 0.0, 1.0, 1.0]))


def test_qat_linear_uses_fake_quantised_weights_and_shares_parameters():
    linear = nn.Linear(12, 5)
    qat = QATLinear.from_linear(linear, bits=4)
    assert qat.weight is linear.weight and qat.bias is linear.bias
    x = randn(3, 12)
    q, scale, zero = quantize(linear.weight.detach(), 4, True, axis=0)
    torch.testing.assert_close(qat(x), F.linear(x, dequantize(q, scale, zero), linear.bias))
    assert (qat(x) - linear(x)).abs().max() > 0  # the weights really are on the 4-bit grid
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert convert_qat(model, bits=4, skip=("2",)) is model
    assert isinstance(model[0], QATLinear) and type(model[2]) is nn.Linear
    assert model[0].bits == 4


def test_qat_at_four_bits_trains_a_small_regression():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(4, 8, generator=g)
    x = torch.randn(256, 8, generator=g)
    y = x @ true_w.t()
    model = convert_qat(nn.Sequential(nn.Linear(8, 4)), bits=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_qat_layer_converts_to_an_int8_layer_with_the_same_outputs():
    torch.manual_seed(1)
    model = convert_qat(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)),
                        bits=4, input_bits=8)
    x = randn(5, 32)
    expected = model(x).detach()
    quantize_linears(model)
    assert isinstance(model[0], QuantizedLinear) and model[0].bits == 4
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    x = randn(3, 4)
    with pytest.raises(TypeError, match="expected x to be a floating-point tensor, got dtype torch.int64"):
        quantize(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="expected x to be a floating-point torch.Tensor, got list"):
        quantize([1.0, 2.0])
    for bits in (1, 9, 0, 16):
        with pytest.raises(ValueError, match=f"bits must be in \\[2, 8\\], got bits={bits}"):
            quantize(x, bits)
    for bits in (4.0, True, "8"):
        with pytest.raises(TypeError, match="bits must be an int in \\[2, 8\\]"):
            quantize(x, bits)
    with pytest.raises(ValueError, match=r"axis 2 is out of range for a tensor with 2 dimension\(s\)"):
        quantize(x, axis=2)
    with pytest.raises(ValueError, match="axis -3 is out of range"):
        quantize(x, axis=-3)
    with pytest.raises(TypeError, match="axis must be an int or None, got float"):
        quantize(x, axis=1.0)
    with pytest.raises(ValueError, match="axis=0 needs a tensor with at least 1 dimension"):
        quantize(torch.tensor(1.0), axis=0)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        quantize(x, symmetric="yes")
    with pytest.raises(ValueError, match="cannot quantise an empty tensor"):
        quantize(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="x holds inf or nan values"):
        quantize(torch.tensor([1.0, float("nan")]))
    q, scale, zero = quantize(x, axis=0)
    with pytest.raises(TypeError, match="expected q to be an integer tensor"):
        dequantize(q.float(), scale, zero)
    with pytest.raises(TypeError, match="expected scale to be a floating-point tensor"):
        dequantize(q, scale.long(), zero)
    with pytest.raises(ValueError, match=r"scale of shape \[2, 4\] does not broadcast against q of shape \[3, 4\]"):
        dequantize(q, torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="a 1-D scale for axis=0 must have 3 entries"):
        dequantize(q, torch.ones(2), 0, axis=0)
    with pytest.raises(ValueError, match=r"the last dimension of w \(4\) must be a positive multiple of group_size=3"):
        quantize_groupwise(x, 4, 3)
    with pytest.raises(ValueError, match="group_size must be a positive int, got group_size=0"):
        quantize_groupwise(x, 4, 0)
    with pytest.raises(TypeError, match="group_size must be a positive int, got float"):
        quantize_groupwise(x, 4, 2.0)
    with pytest.raises(ValueError, match="bits must be in"):
        quantize_groupwise(x, 1, 2)
    with pytest.raises(ValueError, match="expected scale of shape"):
        dequantize_groupwise(torch.zeros(3, 4, dtype=torch.int8), torch.ones(3, 3))
    with pytest.raises(ValueError, match="a zero_point was given without a scale"):
        fake_quantize(x, 8, zero_point=torch.tensor(0))
    with pytest.raises(ValueError, match="scale must be > 0 everywhere"):
        fake_quantize(x, 8, scale=torch.tensor(0.0))
    with pytest.raises(ValueError, match="input_bits must be in"):
        QATLinear(4, 4, input_bits=12)
    with pytest.raises(TypeError, match="expected an nn.Linear, got ReLU"):
        QATLinear.from_linear(nn.ReLU())
    with pytest.raises(ValueError, match="bits must be in"):
        convert_qat(mlp(), bits=1)


def test_quantize_linears_covers_the_stacked_attention_projection_of_a_gpt():
    from aimodels.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=32, d_model=64, n_heads=4,
                          n_layers=2)).eval()
    q = quantize_linears(copy.deepcopy(model))
    assert all(isinstance(b.attn.in_proj, QuantizedLinear) for b in q.blocks)
    assert not any("in_proj_weight" in k for k in q.state_dict())
    x = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        want, got = model(x), q(x)
    assert float((got - want).norm() / want.norm()) < 0.05
    # Generation with the KV cache goes through the same projection.
    out = q.generate(x[:1, :5], 8, temperature=0)
    assert out.shape == (1, 13)
    # attention=False keeps the float projection.
    kept = quantize_linears(copy.deepcopy(model), attention=False)
    assert all("in_proj" not in b.attn._modules for b in kept.blocks)
    assert state_dict_bytes(q) < state_dict_bytes(kept) < state_dict_bytes(model)
