r"""Quantisation from scratch (Chapter 11): int8 and int4, per tensor, channel or group.

**What quantisation is.** A float tensor :math:`x` is stored as small integers :math:`q`
and a few floats that say how to read them back. The *affine* (or *asymmetric*) scheme
uses a scale :math:`s > 0` and an integer zero point :math:`z`:

.. math::

    q = \operatorname{clamp}\bigl(\operatorname{round}(x / s) + z,\; q_{\min},\; q_{\max}\bigr),
    \qquad \hat x = (q - z)\, s .

:math:`\hat x` is the *dequantised* value. For an element that is not clipped,
:math:`|x - \hat x| \le s/2`: rounding moves it by at most half a step. A ``bits``-bit
code has :math:`2^b` levels, so the whole game is to choose :math:`s` (and :math:`z`) so
that the levels cover the values that occur, and no more.

*Symmetric* (:math:`z = 0`). With :math:`Q = 2^{b-1} - 1` and
:math:`s = \max|x| / Q`, the codes are :math:`q \in [-Q, Q]`, e.g. :math:`[-127, 127]`
for int8. This is the *restricted* range: the code :math:`-128` is never used, so that
:math:`+x` and :math:`-x` quantise to :math:`+q` and :math:`-q`. It is the scheme of
TensorRT and of NVIDIA's int8 recommendations (Wu et al., 2020, "Integer Quantization
for Deep Learning Inference"); PyTorch's symmetric observers give the same scale when
built with ``quant_min=-127, quant_max=127``. Zero is exactly representable, which
matters for padding and ReLU outputs, and the integer product needs no zero-point
corrections (below).

*Asymmetric*. The range :math:`[\min(x, 0), \max(x, 0)]` (it always includes 0, so that
0 stays exact) is spread over the unsigned codes :math:`[0, 2^b - 1]`:
:math:`s = (\max - \min) / (2^b - 1)` and :math:`z = \operatorname{round}(-\min / s)`.
Then the minimum maps to code 0 and the maximum to :math:`2^b - 1`, and no level is
wasted on values that never occur: better for one-sided data such as post-ReLU or
post-GELU activations. Codes are returned as ``torch.uint8``.

Codes of fewer than 8 bits are held one per byte (``int8``/``uint8``) here; a real
int4 format packs two codes per byte, and the size accounting below counts
``bits / 8`` bytes per weight. ``round`` is ``torch.round`` (halves go to the even
neighbour). A tensor or channel that is all zeros would give :math:`s = 0`; it gets
:math:`s = 1` instead (any positive scale works: every element has code :math:`z`
and dequantises to exactly 0).

**Granularity.** One scale for a whole tensor (*per tensor*, ``axis=None``) lets a
single outlier set the step for everything: if one weight is 100 times larger than the
rest, almost all of them round to 0. One scale per output channel (*per channel*,
``axis=0`` for a ``[out, in]`` weight) confines the damage to that channel's row, and
one scale per *group* of ``group_size`` consecutive weights (:func:`quantize_groupwise`,
as GPTQ and llama.cpp do for 4-bit weights) confines it to 32 or 128 weights, for the
price of one extra scale (16 bits) per group: :math:`b + 16/g` bits per weight.

**Integer matrix products.** For :math:`y = a b` with :math:`a` of shape
:math:`[M, K]` quantised with one scale per *row* :math:`s^a_i` and :math:`b` of shape
:math:`[K, N]` with one scale per *column* :math:`s^b_j`, the scales do not depend on
the summation index :math:`k` and come out of the sum:

.. math::

    \hat y_{ij} = \sum_k s^a_i q^a_{ik}\, s^b_j q^b_{kj}
               = s^a_i s^b_j \sum_k q^a_{ik} q^b_{kj} .

The sum is an exact int8 x int8 product accumulated in int32 (:func:`int8_matmul`),
after which one multiplication per output element restores the scale. This is why
activations get per-row (per-token) scales and weights per-output-channel scales, and
never scales that vary along :math:`k`. :class:`QuantizedLinear` does exactly this, with
the activation scales computed at run time from each input row (*dynamic*
quantisation). :func:`matmul_error_bound` bounds the error of :math:`\hat y`.

**Quantisation-aware training.** Rounding has zero gradient almost everywhere, so a
network cannot be trained through it directly. *Fake quantisation* computes
:math:`\hat x = \operatorname{dequantize}(\operatorname{quantize}(x))` in the forward
pass, so the loss sees the quantisation error, and the *straight-through estimator*
(Bengio et al., 2013) pretends in the backward pass that rounding was the identity:
:math:`\partial \hat x / \partial x = 1` where :math:`x` lies inside the representable
range and :math:`0` where it was clipped (:class:`FakeQuantSTE`, :class:`QATLinear`).

=============================== ===============================================================
name                            what it does
=============================== ===============================================================
:func:`quant_range`             the integer codes :math:`[q_{\min}, q_{\max}]` of a scheme
:func:`quantize`                float tensor to codes, scales and zero points (tensor/channel)
:func:`dequantize`              codes back to floats, :math:`(q - z)\,s`
:func:`quantize_groupwise`      symmetric codes with one scale per group of weights
:func:`dequantize_groupwise`    its inverse
:func:`fake_quantize_groupwise` dequantize(quantize(w)) per group
:func:`quantize_gpt_weights_`   fake-quantise a GPT's block weights in place; their size
:func:`int8_matmul`             exact int8 x int8 -> int32 matrix product
:func:`matmul_error_bound`      elementwise bound on the error of a quantised product
:class:`QuantizedLinear`        int8 weights, dynamic int8 activations, int32 accumulation
:func:`quantize_linears`        replace the ``nn.Linear`` layers of a model in place
:func:`state_dict_bytes`        bytes of the tensors of a model's state dict
:func:`saved_size_bytes`        size of the model saved as a safetensors file
:class:`FakeQuantSTE`           fake quantisation with the straight-through gradient
:func:`fake_quantize`           the same as a function
:class:`QATLinear`              ``nn.Linear`` that trains through fake-quantised weights
:func:`convert_qat`             replace the ``nn.Linear`` layers by :class:`QATLinear` in place
=============================== ===============================================================
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MAX_INT8_MATMUL_K",
    "FakeQuantSTE",
    "QATLinear",
    "QuantizedLinear",
    "convert_qat",
    "dequantize",
    "dequantize_groupwise",
    "fake_quantize",
    "fake_quantize_groupwise",
    "int8_matmul",
    "matmul_error_bound",
    "quant_range",
    "quantize",
    "quantize_gpt_weights_",
    "quantize_groupwise",
    "quantize_linears",
    "saved_size_bytes",
    "state_dict_bytes",
]

Tensor = torch.Tensor

#: The longest inner dimension for which an int8 x int8 product cannot overflow int32:
#: every term is at most 128 * 128 = 2**14 in magnitude.
MAX_INT8_MATMUL_K = (2**31 - 1) // 2**14


# --------------------------------------------------------------------------- checks
def _check_bits(bits: int, name: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"{name} must be an int in [2, 8], got {type(bits).__name__} {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name} must be in [2, 8], got {name}={bits}")


def _check_float(x: Any, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a floating-point torch.Tensor, "
                        f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, got dtype {x.dtype}")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_axis(axis: int | None, ndim: int) -> int | None:
    """Return ``axis`` as a non-negative dimension (or None), or raise."""
    if axis is None:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__} {axis!r}")
    if ndim == 0:
        raise ValueError(f"axis={axis} needs a tensor with at least 1 dimension, got a 0-d "
                         f"tensor; use axis=None")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimension(s); "
                         f"expected None or an int in [{-ndim}, {ndim - 1}]")
    return axis % ndim


def _check_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 and float64 are kept; half types are computed in float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------- per tensor / channel
def quant_range(bits: int = 8, symmetric: bool = True) -> tuple[int, int]:
    r"""The integer codes ``(q_min, q_max)`` of a ``bits``-bit scheme.

    Symmetric: :math:`(-(2^{b-1} - 1),\ 2^{b-1} - 1)`, the restricted range, e.g.
    ``(-127, 127)``. Asymmetric: :math:`(0,\ 2^b - 1)`, e.g. ``(0, 255)``.
    """
    _check_bits(bits)
    _check_bool(symmetric, "symmetric")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _amax(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    """Max over ``dims`` (all if None) keeping them; ``dims=()`` reduces nothing."""
    if dims is None:
        return x.amax()
    return x.amax(dim=dims, keepdim=True) if dims else x.clone()


def _amin(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    if dims is None:
        return x.amin()
    return x.amin(dim=dims, keepdim=True) if dims else x.clone()


def _scale_and_zero(x: Tensor, bits: int, symmetric: bool,
                    dims: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """Scales and zero points (int32) from the range of ``x`` over ``dims``; no checks."""
    if symmetric:
        scale = _amax(x.abs(), dims) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    qmax = 2**bits - 1
    low = _amin(x, dims).clamp(max=0)
    high = _amax(x, dims).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp_(0, qmax).to(torch.int32)
    return scale, zero


def _quantize_with(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                   symmetric: bool) -> Tensor:
    """Codes of ``x`` for given scales and zero points; no checks."""
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        return torch.round(x / scale).clamp_(qmin, qmax).to(torch.int8)
    return (torch.round(x / scale) + zero_point).clamp_(qmin, qmax).to(torch.uint8)


def quantize(x: Tensor, bits: int = 8, symmetric: bool = True,
             axis: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Quantise ``x`` to ``bits``-bit integer codes; return ``(q, scale, zero_point)``.

    * ``symmetric=True``: :math:`s = \max|x| / Q` with :math:`Q = 2^{b-1} - 1`,
      :math:`q = \operatorname{clamp}(\operatorname{round}(x/s), -Q, Q)` as
      ``torch.int8`` (restricted range, e.g. ``[-127, 127]``), zero point 0.
    * ``symmetric=False``: :math:`s = (\max - \min) / (2^b - 1)` over the range
      :math:`[\min(x, 0), \max(x, 0)]`, :math:`z = \operatorname{round}(-\min / s)`,
      :math:`q = \operatorname{clamp}(\operatorname{round}(x/s) + z, 0, 2^b - 1)` as
      ``torch.uint8``.

    ``axis=None`` uses one scale for the whole tensor (``scale`` and ``zero_point`` are
    0-d tensors). ``axis=k`` uses one per index along dimension ``k`` (per channel):
    ``scale`` and ``zero_point`` then have size ``x.shape[k]`` at dimension ``k`` and
    size 1 elsewhere, so they broadcast against ``x``. Scales are float32 (float64 for
    float64 input; half-precision input is computed in float32), zero points int32. An
    all-zero tensor or channel gets scale 1. Rounding moves an element by at most half a step
    (clipping changes a code only at an exact tie), so :math:`|x - \hat x| \le s/2`.
    """
    _check_float(x)
    _check_bits(bits)
    _check_bool(symmetric, "symmetric")
    axis = _check_axis(axis, x.ndim)
    if x.numel() == 0:
        raise ValueError(f"cannot quantise an empty tensor (shape {list(x.shape)}): "
                         f"it has no range to take a scale from")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds inf or nan values; a finite range is needed for the scale")
    x = x.to(_compute_dtype(x))
    dims = None if axis is None else tuple(d for d in range(x.ndim) if d != axis)
    scale, zero_point = _scale_and_zero(x, bits, symmetric, dims)
    return _quantize_with(x, scale, zero_point, bits, symmetric), scale, zero_point


def _check_broadcast(tensors: dict[str, Tensor], target: Tensor, target_name: str) -> None:
    """Raise ValueError unless every tensor broadcasts to ``target``'s shape unchanged."""
    for name, t in tensors.items():
        try:
            fits = torch.broadcast_shapes(t.shape, target.shape) == target.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{name} of shape {list(t.shape)} does not broadcast against "
                             f"{target_name} of shape {list(target.shape)}")


def _check_codes(q: Any) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"expected q to be an integer torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"expected q to be an integer tensor (int8 or uint8 codes), "
                        f"got dtype {q.dtype}")


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | int = 0,
               axis: int | None = None) -> Tensor:
    r"""Codes back to floats: :math:`\hat x = (q - z)\, s`, in the dtype of ``scale``.

    ``scale`` and ``zero_point`` must broadcast against ``q``, as :func:`quantize`
    returns them. With ``axis=k`` they may also be 1-D of length ``q.shape[k]`` (the
    layout PyTorch's per-channel tensors use); they are then reshaped to broadcast
    along dimension ``k``.
    """
    _check_codes(q)
    _check_float(scale, "scale")
    zero_point = torch.as_tensor(zero_point, device=q.device)
    if zero_point.is_floating_point() or zero_point.dtype == torch.bool:
        raise TypeError(f"expected an integer zero_point, got dtype {zero_point.dtype}")
    axis = _check_axis(axis, q.ndim)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = q.shape[axis]
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            if t.ndim == 1 and t.numel() not in (1, q.shape[axis]):
                raise ValueError(f"a 1-D {name} for axis={axis} must have {q.shape[axis]} "
                                 f"entries (q.shape[{axis}]), got {t.numel()}")
        if scale.ndim == 1:
            scale = scale.reshape(shape) if scale.numel() == q.shape[axis] else scale
        if zero_point.ndim == 1:
            zero_point = (zero_point.reshape(shape) if zero_point.numel() == q.shape[axis]
                          else zero_point)
    _check_broadcast({"scale": scale, "zero_point": zero_point}, q, "q")
    return (q.to(scale.dtype) - zero_point.to(scale.dtype)) * scale


# --------------------------------------------------------------------------- per group
def _check_groups(w: Tensor, group_size: int, name: str = "w") -> None:
    _check_positive_int(group_size, "group_size")
    if w.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension to be cut into groups, "
                         f"got a 0-d tensor")
    if w.shape[-1] == 0 or w.shape[-1] % group_size:
        raise ValueError(f"the last dimension of {name} ({w.shape[-1]}) must be a positive "
                         f"multiple of group_size={group_size}; shape {list(w.shape)}")


def quantize_groupwise(w: Tensor, bits: int = 4, group_size: int = 32) -> tuple[Tensor, Tensor]:
    r"""Symmetric quantisation with one scale per group of ``group_size`` consecutive
    elements along the last dimension; return ``(q, scale)``.

    ``q`` (``torch.int8``, codes in :math:`[-Q, Q]`, :math:`Q = 2^{b-1} - 1`, so
    ``[-7, 7]`` for 4 bits) has the shape of ``w``; ``scale`` has shape
    ``[*w.shape[:-1], w.shape[-1] // group_size]``, with
    :math:`s_g = \max_{i \in g} |w_i| / Q`. ``w.shape[-1]`` must be divisible by
    ``group_size``. Scales are returned in float32; a real format stores them in
    float16, which changes each dequantised weight by a relative :math:`2^{-11}` at
    most (under 0.4% of a step at 4 bits), and :func:`quantize_gpt_weights_` counts 2
    bytes per scale.
    """
    _check_float(w, "w")
    _check_bits(bits)
    _check_groups(w, group_size)
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    q, scale, _ = _quantize_groups(groups, bits)
    return q.reshape(w.shape), scale


def _quantize_groups(groups: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric codes for ``[..., n_groups, group_size]``; the scale loses the last dim."""
    if not bool(torch.isfinite(groups).all()):
        raise ValueError("w holds inf or nan values; a finite range is needed for the scale")
    groups = groups.to(_compute_dtype(groups))
    scale, zero = _scale_and_zero(groups, bits, True, (groups.ndim - 1,))
    return _quantize_with(groups, scale, zero, bits, True), scale.squeeze(-1), zero


def dequantize_groupwise(q: Tensor, scale: Tensor) -> Tensor:
    r"""Inverse of :func:`quantize_groupwise`: :math:`\hat w_i = q_i\, s_{g(i)}`.

    The group size is ``q.shape[-1] // scale.shape[-1]``; the result has the dtype of
    ``scale``.
    """
    _check_codes(q)
    _check_float(scale, "scale")
    if q.ndim == 0 or scale.shape[:-1] != q.shape[:-1] or scale.shape[-1] == 0 \
            or q.shape[-1] % scale.shape[-1]:
        raise ValueError(f"expected scale of shape [*q.shape[:-1], n_groups] with n_groups "
                         f"dividing q.shape[-1]; got q {list(q.shape)} and scale "
                         f"{list(scale.shape)}")
    group_size = q.shape[-1] // scale.shape[-1]
    groups = q.reshape(*q.shape[:-1], scale.shape[-1], group_size)
    return (groups.to(scale.dtype) * scale[..., None]).reshape(q.shape)


def fake_quantize_groupwise(w: Tensor, bits: int = 4, group_size: int = 32) -> Tensor:
    """``dequantize_groupwise(*quantize_groupwise(w, bits, group_size))``, in ``w``'s dtype."""
    return dequantize_groupwise(*quantize_groupwise(w, bits, group_size)).to(w.dtype)


def quantize_gpt_weights_(model: nn.Module, bits: int = 4, group_size: int = 32) -> dict:
    r"""Replace, in place, every weight matrix in the blocks of a GPT by its groupwise
    fake-quantised version; return the sizes before and after.

    In :class:`aimodels.gpt.GPT` the matrices are those of each block's attention (the
    stacked query/key/value projection ``attn.in_proj_weight``, a linear layer's weight
    held as a bare parameter, and ``attn.out_proj.weight``) and of its feed-forward
    network (``mlp.fc.weight``, ``mlp.proj.weight``). Left alone, in float: the token
    and position embeddings, the output layer (tied to the token embedding), every
    LayerNorm and every bias. That is the usual choice of weight-only schemes (GPTQ,
    AWQ): the embeddings and biases are few or sensitive, and the matrices are the bulk.

    The model keeps float weights, so its perplexity can be measured unchanged; the
    returned dict says what storing the codes would take:

    * ``tensors``: names of the quantised parameters; ``weights``: how many weights;
    * ``fp32_bytes``: ``4 * weights``;
    * ``quantized_bytes``: ``bits / 8`` bytes per weight (packed, rounded up per tensor)
      plus one float16 scale (2 bytes) per group: :math:`b + 16/g` bits per weight;
    * ``compression``: ``fp32_bytes / quantized_bytes``;
    * ``other_fp32_bytes``: every other parameter at 4 bytes each (the embeddings count
      once even though the output layer reuses them);
    * ``model_fp32_bytes`` and ``model_quantized_bytes``: the whole model both ways.
    """
    from aimodels.gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"expected an aimodels.gpt.GPT, got {type(model).__name__}")
    _check_bits(bits)
    _check_positive_int(group_size, "group_size")
    targets = [(f"blocks.{i}.{name}", param) for i, block in enumerate(model.blocks)
               for name, param in block.named_parameters() if param.ndim == 2]
    for name, param in targets:  # check them all before changing any
        _check_groups(param, group_size, name)
    quantized = {id(param) for _, param in targets}
    with torch.no_grad():
        for _, param in targets:
            param.copy_(fake_quantize_groupwise(param, bits, group_size))
    weights = sum(param.numel() for _, param in targets)
    quantized_bytes = sum(math.ceil(param.numel() * bits / 8) + 2 * (param.numel() // group_size)
                          for _, param in targets)
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return {"tensors": [name for name, _ in targets], "weights": weights,
            "fp32_bytes": 4 * weights, "quantized_bytes": quantized_bytes,
            "compression": 4 * weights / quantized_bytes if quantized_bytes else 1.0,
            "other_fp32_bytes": 4 * other, "model_fp32_bytes": 4 * (weights + other),
            "model_quantized_bytes": quantized_bytes + 4 * other}


# --------------------------------------------------------------------------- integer products
def _int_mm_supported(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch._int_mm`` should take these operands.

    On CPU it takes any 2-D int8 shapes (checked with PyTorch 2.15, every combination of
    1 to 33 rows, inner and output sizes); the CUDA kernel (cuBLAS) asks for more than
    16 rows and inner and output sizes that are positive multiples of 8. Anything else
    is emulated.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        m, k = a.shape
        return m > 16 and k > 0 and k % 8 == 0 and b.shape[1] > 0 and b.shape[1] % 8 == 0
    return False


def int8_matmul(a_q: Tensor, b_q: Tensor,
                backend: Literal["auto", "int_mm", "emulate"] = "auto") -> Tensor:
    r"""The exact product of int8 matrices ``a_q [M, K]`` and ``b_q [K, N]``, in int32.

    ``backend="auto"`` uses PyTorch's integer kernel ``torch._int_mm`` (int8 inputs,
    int32 accumulation: the integer multiply-accumulate that CPU vector instructions
    and GPU tensor cores provide) when it takes these operands, and otherwise emulates it
    (``"emulate"``): the product in float64, which is exact because every term is an
    integer of magnitude at most :math:`2^{14}`, so every partial sum, in any order, is
    an integer below :math:`K \cdot 2^{14} < 2^{31}`, far below float64's :math:`2^{53}`.
    ``"int_mm"`` insists on the kernel. ``K`` may be at most :data:`MAX_INT8_MATMUL_K`
    (131071), the longest sum that cannot overflow int32.
    """
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"expected {name} to be a torch.int8 tensor, got {got}")
        if t.ndim != 2:
            raise ValueError(f"expected {name} to be a 2-D matrix, got shape {list(t.shape)}")
    if a_q.shape[1] != b_q.shape[0]:
        raise ValueError(f"inner dimensions differ: a_q is {list(a_q.shape)} and b_q is "
                         f"{list(b_q.shape)}")
    if a_q.device != b_q.device:
        raise ValueError(f"a_q is on {a_q.device} and b_q on {b_q.device}")
    if a_q.shape[1] > MAX_INT8_MATMUL_K:
        raise ValueError(f"K={a_q.shape[1]} is too long: an int32 sum of int8 products is "
                         f"exact only for K <= {MAX_INT8_MATMUL_K}")
    if backend not in ("auto", "int_mm", "emulate"):
        raise ValueError(f"backend must be 'auto', 'int_mm' or 'emulate', got {backend!r}")
    if backend == "int_mm" or (backend == "auto" and _int_mm_supported(a_q, b_q)):
        try:
            return torch._int_mm(a_q, b_q)
        except RuntimeError:
            if backend == "int_mm":
                raise
    return (a_q.to(torch.float64) @ b_q.to(torch.float64)).to(torch.int32)


def matmul_error_bound(a: Tensor, b: Tensor, s_a: Tensor | float,
                       s_b: Tensor | float) -> Tensor:
    r"""An elementwise bound on :math:`|\hat a \hat b - a b|` for quantised ``a``, ``b``.

    ``a`` is ``[M, K]``, ``b`` is ``[K, N]``; ``s_a`` and ``s_b`` are their quantisation
    steps, broadcastable to ``a`` and ``b`` (a number, per-row scales ``[M, 1]`` for
    ``a``, per-column scales ``[1, N]`` for ``b``, ...). Returns ``[M, N]``.

    **Derivation.** If nothing was clipped (true for the scales :func:`quantize`
    computes), rounding moves each element by at most half a step:
    :math:`\hat a = a - \delta^a` with :math:`|\delta^a_{ik}| \le s^a_{ik}/2`, and
    likewise :math:`\hat b = b - \delta^b`, :math:`|\delta^b_{kj}| \le s^b_{kj}/2`. Then

    .. math::

        \hat a_{ik} \hat b_{kj} = a_{ik} b_{kj} - a_{ik} \delta^b_{kj}
            - \delta^a_{ik} b_{kj} + \delta^a_{ik} \delta^b_{kj},

    and by the triangle inequality, summed over :math:`k`,

    .. math::

        \Bigl|(\hat a \hat b - a b)_{ij}\Bigr| \le \sum_k \Bigl(
            |a_{ik}|\,\frac{s^b_{kj}}{2} + \frac{s^a_{ik}}{2}\,|b_{kj}|
            + \frac{s^a_{ik}\, s^b_{kj}}{4} \Bigr)
        = \tfrac12 \bigl(|a|\, S^b\bigr)_{ij} + \tfrac12 \bigl(S^a |b|\bigr)_{ij}
          + \tfrac14 \bigl(S^a S^b\bigr)_{ij},

    three matrix products, with :math:`S^a, S^b` the scales broadcast to the shapes of
    :math:`a, b`. The bound is the worst case, every rounding error pushing the same
    way; independent errors of random sign mostly cancel, and the typical error is
    closer to :math:`\sqrt K` times one term than to :math:`K` times. It does not
    include the floating-point rounding of the products themselves.
    """
    for name, t in (("a", a), ("b", b)):
        _check_float(t, name)
        if t.ndim != 2:
            raise ValueError(f"expected {name} to be a 2-D matrix, got shape {list(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {list(a.shape)} and b is "
                         f"{list(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    scales = []
    for name, s, like in (("s_a", s_a, a), ("s_b", s_b, b)):
        s = torch.as_tensor(s, dtype=dtype, device=like.device)
        try:
            scales.append(s.expand(like.shape))
        except RuntimeError:
            raise ValueError(f"{name} of shape {list(s.shape)} does not broadcast to "
                             f"{list(like.shape)}") from None
        if bool((s < 0).any()):
            raise ValueError(f"{name} must be >= 0")
    big_a, big_b = scales
    a, b = a.to(dtype), b.to(dtype)
    return 0.5 * (a.abs() @ big_b) + 0.5 * (big_a @ b.abs()) + 0.25 * (big_a @ big_b)


# --------------------------------------------------------------------------- int8 linear layer
def _quantize_rows(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric codes of a 2-D ``x`` with one scale per row, ``[M, 1]``; no checks.

    The same numbers as ``quantize(x, bits, True, axis=0)`` without the validation, in
    a few vectorised passes over ``x``; rounding in place saves a fresh buffer per call.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    scale = scale.masked_fill_(scale == 0, 1.0)
    return (x / scale).round_().clamp_(-qmax, qmax).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    r"""A linear layer :math:`y = x W^\top + b` computed with int8 arithmetic.

    * Weights: symmetric codes, one scale per output channel (row of ``W``), computed
      once by :meth:`from_float`; ``bits`` may be below 8 (the codes still sit in int8).
    * Activations: quantised *dynamically*, at run time, to int8 with one symmetric
      scale per row (per token) of the input, :math:`s^x_i = \max_k |x_{ik}| / 127`.
    * The product :math:`q^x (q^W)^\top` is exact in int32 (:func:`int8_matmul`); then
      :math:`y_{ij} = s^x_i\, s^W_j\, \mathrm{acc}_{ij} + b_j` in float32.

    The state dict holds ``weight`` (int8, ``[out, in]``), ``weight_scale`` (float32,
    ``[out]``) and ``bias`` (float32, ``[out]``, if any), as buffers: about a quarter of
    the float layer's bytes. Inputs ``[..., in_features]`` of any float dtype; the
    output has the input's dtype. Inputs are assumed finite (no check, for speed).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bits: int = 8) -> None:
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(out_features, "out_features")
        _check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int | None = None) -> QuantizedLinear:
        """Quantise a float ``nn.Linear`` (per output channel, symmetric, ``bits`` bits).

        ``bits=None`` means 8, or the layer's own ``bits`` for a :class:`QATLinear`, so
        that the int8 layer reproduces the weights the network was trained with.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        if bits is None:
            bits = linear.bits if isinstance(linear, QATLinear) else 8
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits)
        with torch.no_grad():
            q, scale, _ = quantize(linear.weight.detach(), bits, True, axis=0)
            device = linear.weight.device
            layer.weight = q.to(device)
            layer.weight_scale = scale.reshape(-1).to(device, torch.float32)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().to(torch.float32).clone()
        return layer

    def dequantized_weight(self) -> Tensor:
        """The float weight ``[out, in]`` this layer effectively multiplies by."""
        return self.weight.to(torch.float32) * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        _check_float(x, "the input")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected an input of shape [..., {self.in_features}], "
                             f"got {list(x.shape)}")
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        lead = x.shape[:-1]
        if rows.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        x_q, x_scale = _quantize_rows(rows)
        acc = int8_matmul(x_q, self.weight.t())  # [M, out] int32, exact
        y = acc.to(torch.float32).mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}")


def _swappable(module: nn.Module) -> bool:
    """An ``nn.Linear`` that is called as a module. ``nn.MultiheadAttention`` marks its
    ``out_proj`` as ``NonDynamicallyQuantizableLinear`` because it reads the weight
    directly instead of calling the layer; replacing it would break or be bypassed."""
    return isinstance(module, nn.Linear) and not isinstance(
        module, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)


def _replace_linears(model: nn.Module, skip: Iterable[str],
                     make: Callable[[nn.Linear], nn.Module],
                     wanted: Callable[[nn.Module], bool]) -> nn.Module:
    """Swap every module for which ``wanted`` holds (outside ``skip``) by ``make(module)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        raise TypeError(f"skip must be a collection of module names, got the string "
                        f"{skip!r}; write skip=({skip!r},)")
    skip = tuple(skip)
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = sorted(set(skip) - names)
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of the model; module names "
                         f"look like {sorted(n for n in names if n)[:5]}")

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skip)

    if wanted(model) and not skipped(""):
        return make(model)  # the model is itself one layer: nothing to replace it in
    done: dict[int, nn.Module] = {}  # a module used twice is replaced by one new module
    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if name and wanted(module) and not skipped(name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(module) not in done:
            done[id(module)] = make(module)
        setattr(parent, child, done[id(module)])
    return model


def quantize_linears(model: nn.Module, skip: Iterable[str] = (),
                     bits: int | None = None, attention: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by a :class:`QuantizedLinear`.

    ``skip`` holds module names (as in ``model.named_modules()``) to leave in float,
    with everything inside them; e.g. a language-model head whose weight is tied to the
    embedding (quantising it would untie the two). Unknown names raise ``ValueError``.
    :class:`QATLinear` layers are converted too, at their own ``bits`` unless ``bits``
    is given (see :meth:`QuantizedLinear.from_float`). Returns ``model``, except when
    ``model`` is itself an ``nn.Linear``: then the new layer is returned.

    In :class:`aimodels.gpt.GPT` that is each block's ``attn.out_proj``, ``mlp.fc`` and
    ``mlp.proj``, and, with ``attention=True``, the stacked query/key/value projection
    of every :class:`aimodels.attention.MultiHeadAttention` (a bare ``[3E, E]``
    parameter): it becomes a :class:`QuantizedLinear` registered as ``in_proj``, which
    :func:`aimodels.attention.stacked_projection` calls, and the float weight is dropped.
    That serves self-attention only; skip modules that do cross-attention. The tied
    output layer and the embeddings stay in float. The ``out_proj`` of PyTorch's own
    ``nn.MultiheadAttention`` is left alone: that module reads the weight directly
    instead of calling the layer.
    """
    if bits is not None:
        _check_bits(bits)
    model = _replace_linears(model, skip, lambda m: QuantizedLinear.from_float(m, bits),
                             _swappable)
    if attention:
        _quantize_stacked_projections(model, skip, bits)
    return model


def _quantize_stacked_projections(model: nn.Module, skip: Iterable[str],
                                  bits: int | None) -> None:
    from aimodels.attention import MultiHeadAttention

    skip = tuple(skip)
    for name, module in model.named_modules():
        if not isinstance(module, MultiHeadAttention) or "in_proj" in module._modules \
                or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = module.in_proj_weight.detach()
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(module.in_proj_bias.detach())
        del module.in_proj_weight, module.in_proj_bias
        module.in_proj = QuantizedLinear.from_float(linear, bits)


def _unique_state_tensors(model: nn.Module) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    seen: set[tuple[int, int, int]] = set()
    unique = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.nbytes, hash(t.dtype))
        if t.nbytes and key in seen:
            continue  # a tied weight appears under two names but is stored once
        seen.add(key)
        unique[name] = t
    return unique


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors in ``model.state_dict()``: ``numel * element_size`` each, so an
    int8 weight counts 1 byte per element; a tensor shared under two names counts once."""
    return sum(t.nbytes for t in _unique_state_tensors(model).values())


def saved_size_bytes(model: nn.Module, path: str | os.PathLike | None = None) -> int:
    """Size in bytes of ``model``'s state dict written as a safetensors file.

    Written with ``safetensors.torch.save_model`` (which stores a tied tensor once) to
    ``path``, or to a temporary file that is deleted afterwards. The file is the tensor
    bytes of :func:`state_dict_bytes` plus a small JSON header (names, dtypes, shapes).
    """
    from safetensors.torch import save_model

    _unique_state_tensors(model)  # type check
    if path is not None:
        save_model(model, os.fspath(path))
        return os.path.getsize(path)
    with tempfile.TemporaryDirectory() as folder:
        file = os.path.join(folder, "model.safetensors")
        save_model(model, file)
        return os.path.getsize(file)


# --------------------------------------------------------------------------- QAT
class FakeQuantSTE(torch.autograd.Function):
    r"""Fake quantisation with the straight-through estimator.

    ``FakeQuantSTE.apply(x, bits, symmetric, axis, scale, zero_point)`` (positional;
    only ``x`` is required) returns :math:`\hat x = \operatorname{dequantize}(
    \operatorname{quantize}(x))` in ``x``'s dtype. Without ``scale`` the range is taken
    from ``x`` itself (:func:`quantize`); with a given ``scale`` (and ``zero_point``,
    default 0), for instance one fixed by calibration, elements outside the range are
    clipped.

    Backward: the gradient passes unchanged where ``x`` was inside the representable
    range (its rounded code did not need clamping) and is zero where it was clipped, as
    in PyTorch's ``FakeQuantize``: a clipped output does not move when ``x`` moves a
    little, so its true gradient is 0, while inside the range rounding is treated as the
    identity. With scales taken from ``x`` nothing is clipped and the gradient is the
    identity. Scales and zero points get no gradient (they are not learned, unlike
    LSQ's, Esser et al., 2020), and the dependence of a data-derived scale on
    ``max|x|`` is ignored.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int = 8, symmetric: bool = True,  # type: ignore[override]
                axis: int | None = None, scale: Tensor | None = None,
                zero_point: Tensor | None = None) -> Tensor:
        _check_float(x)
        _check_bits(bits)
        _check_bool(symmetric, "symmetric")
        if scale is None:
            if zero_point is not None:
                raise ValueError("a zero_point was given without a scale")
            _, scale, zero_point = quantize(x.detach(), bits, symmetric, axis)
        else:
            _check_float(scale, "scale")
            if bool((scale <= 0).any()):
                raise ValueError("scale must be > 0 everywhere")
            zero_point = torch.zeros((), dtype=torch.int32, device=x.device) \
                if zero_point is None else torch.as_tensor(zero_point, device=x.device)
            if zero_point.is_floating_point():
                raise TypeError(f"expected an integer zero_point, got dtype {zero_point.dtype}")
            _check_broadcast({"scale": scale, "zero_point": zero_point}, x, "x")
        qmin, qmax = quant_range(bits, symmetric)
        xc = x.detach().to(_compute_dtype(x))
        unclamped = torch.round(xc / scale) + zero_point
        ctx.save_for_backward((unclamped >= qmin) & (unclamped <= qmax))
        x_hat = (unclamped.clamp(qmin, qmax) - zero_point) * scale
        return x_hat.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def fake_quantize(x: Tensor, bits: int = 8, axis: int | None = None, symmetric: bool = True,
                  scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
    """``dequantize(quantize(x))`` with the straight-through gradient (:class:`FakeQuantSTE`)."""
    return FakeQuantSTE.apply(x, bits, symmetric, axis, scale, zero_point)


class QATLinear(nn.Linear):
    r"""An ``nn.Linear`` that trains through fake quantisation (quantisation-aware training).

    The forward pass uses :math:`\hat W`, the weight fake-quantised with ``bits`` bits,
    symmetric, one scale per output channel, exactly as
    :meth:`QuantizedLinear.from_float` will quantise it; with ``input_bits`` set the
    input is also fake-quantised, symmetric with one scale per row (token), as
    :class:`QuantizedLinear` does at run time. The float weight is kept and updated by
    the optimiser; the straight-through gradient reaches it through the rounding.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 input_bits: int | None = None, device: Any = None, dtype: Any = None) -> None:
        _check_bits(bits)
        if input_bits is not None:
            _check_bits(input_bits, "input_bits")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits, self.input_bits = bits, input_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8,
                    input_bits: int | None = None) -> QATLinear:
        """A :class:`QATLinear` with ``linear``'s parameters: the same ``Parameter``
        objects, so an optimiser built before the conversion keeps training them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                    input_bits, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        weight = fake_quantize(self.weight, self.bits, axis=0)
        if self.input_bits is not None and x.numel():
            rows = x.reshape(-1, x.shape[-1])
            x = fake_quantize(rows, self.input_bits, axis=0).reshape(x.shape)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, input_bits={self.input_bits}"


def convert_qat(model: nn.Module, bits: int = 8, input_bits: int | None = None,
                skip: Iterable[str] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except those named in ``skip``, those
    already :class:`QATLinear` and the ``out_proj`` of ``nn.MultiheadAttention``) in place
    by a :class:`QATLinear` sharing its parameters.

    Returns ``model`` (or the new layer if ``model`` is itself an ``nn.Linear``). After
    training, :func:`quantize_linears` turns the QAT layers into :class:`QuantizedLinear`.
    """
    _check_bits(bits)
    if input_bits is not None:
        _check_bits(input_bits, "input_bits")
    return _replace_linears(model, skip, lambda m: QATLinear.from_linear(m, bits, input_bits),
                            lambda m: _swappable(m) and not isinstance(m, QATLinear))
