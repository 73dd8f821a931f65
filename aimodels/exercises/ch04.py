"""Chapter 4 graders: convolution arithmetic, a convolution from scratch, batch norm in
evaluation mode and the parameters of a depthwise-separable layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from aimodels import cnn

from ._common import (
    Library,
    NotYet,
    _close,
    _expect_tensor,
    _grade_number,
    _report,
    _whole_number,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

__all__ = [
    "check_batchnorm_eval",
    "check_conv2d",
    "check_conv_output_size",
    "check_receptive_field",
    "check_separable_parameters",
]

_CONVOLUTIONS = {name: f"F.{name}" for name in (
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_tbc")} | {"convolution": "torch.convolution", "_convolution": "torch._convolution"}

_OUTPUT_SIZE_LIBRARY = Library(
    task="the exercise asks you to derive the formula",
    hint="count how many kernel positions fit: floor((n + 2p - k) / s) + 1.",
    torch=_CONVOLUTIONS,
    python=((cnn.output_size, "aimodels.cnn.output_size"),),
)


_SIZE_SLIPS: dict[str, Callable[[int, int, int, int], int]] = {
    "padding is added on both sides: 2p, not p.": lambda n, k, s, p: (n + p - k) // s + 1,
    "the padding adds 2p positions to the input: n + 2p - k.": lambda n, k, s, p: (n - k) // s + 1,
    "the first position counts too: add 1 after dividing.": lambda n, k, s, p: (n + 2 * p - k) // s,
    "round down, not up: a kernel that does not fit gives no output.":
        lambda n, k, s, p: -(-(n + 2 * p - k) // s) + 1,
}


@grader
def check_conv_output_size(fn: Callable[[int, int, int, int], int]) -> bool:
    """Ch. 4, exercise 1: ``fn(size, kernel, stride, padding)`` gives the output length.

    Checked on fixed cases and on random ones that change at every call.
    """
    rng = fresh_rng()
    cases = [(32, 5, 1, 0), (28, 2, 2, 0), (7, 3, 2, 1), (224, 7, 2, 3), (10, 4, 3, 0),
             (5, 5, 1, 2), (1, 1, 1, 0), (6, 3, 3, 1)]
    for _ in range(6):
        padding, size, stride = rng.randint(0, 3), rng.randint(1, 300), rng.randint(1, 4)
        cases.append((size, rng.randint(1, min(11, size + 2 * padding)), stride, padding))
    for size, kernel, stride, padding in cases:
        expected = cnn.output_size(size, kernel, stride, padding)
        where = f"size={size}, kernel={kernel}, stride={stride}, padding={padding}"
        got = _whole_number(where, call(fn, size, kernel, stride, padding,
                                        library=_OUTPUT_SIZE_LIBRARY))
        if got == expected:
            continue
        # Each slip must explain this case and a probe where padding matters: 10, 3, 1, 2.
        probe = _whole_number("size=10, kernel=3, stride=1, padding=2",
                              call(fn, 10, 3, 1, 2, library=_OUTPUT_SIZE_LIBRARY))
        hint = next((h for h, slip in _SIZE_SLIPS.items()
                     if slip(size, kernel, stride, padding) == got and slip(10, 3, 1, 2) == probe),
                    "count how many kernel positions fit: floor((n + 2p - k) / s) + 1.")
        raise NotYet(f"{where}: got {got}, expected {expected}.", hint)
    return _report(True, f"all {len(cases)} cases right.")


@grader
def check_receptive_field(answer: object) -> bool:
    """Ch. 4, exercise 2: receptive field of three 3×3 convolutions, stride 1, then 2×2 pooling."""
    expected = cnn.receptive_field([(3, 1), (3, 1), (3, 1), (2, 2)])
    return _grade_number(
        "receptive field", answer, expected,
        {11.0: "stacked kernels widen the field by k - 1 each, not by k.",
         7.0: "the pooling layer widens it too: by (2 - 1) times the strides below it.",
         9.0: "a layer's own stride only multiplies the layers *above* it.",
         4.0: "the field is measured in input pixels: each layer adds k - 1 of them."},
        rel=1e-9,
    )


_CONV_LIBRARY = Library(
    task="the exercise asks you to write it from loops or im2col",
    hint="pad with F.pad, then take one patch per output position and sum patch * weight "
         "over channels and kernel positions.",
    torch=_CONVOLUTIONS | {"unfold": "F.unfold", "im2col": "F.unfold"},
    python=((cnn.conv2d, "aimodels.cnn.conv2d"), (cnn.conv2d_loops, "aimodels.cnn.conv2d_loops"),
            (cnn.im2col, "aimodels.cnn.im2col")),
)


def _conv_cases(rng) -> list[tuple]:  # noqa: ANN001
    """(batch, in, out, height, width, kernel_h, kernel_w, stride, padding, dtype).

    Square images and kernels first, so that code written for squares only gets a hint
    that says so; then non-square ones, fixed and random.
    """
    f64, f32 = torch.float64, torch.float32
    cases = [(1, 1, 1, 6, 6, 3, 3, 1, 0, f64), (2, 3, 4, 9, 9, 3, 3, 2, 1, f64),
             (2, 2, 3, 8, 8, 2, 2, 1, 2, f64), (1, 2, 2, 7, 7, 3, 3, 2, 1, f32),
             (1, 2, 3, 5, 8, 3, 3, 1, 1, f64), (2, 1, 2, 7, 7, 2, 3, 1, 0, f64),
             (1, 3, 2, 6, 9, 3, 2, 2, 1, f64)]
    for dtype in (f64, f32):
        padding, stride = rng.randint(0, 2), rng.randint(1, 3)
        height, width = rng.randint(3, 10), rng.randint(3, 10)
        cases.append((rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 4), height, width,
                      rng.randint(1, min(4, height + 2 * padding)),
                      rng.randint(1, min(4, width + 2 * padding)), stride, padding, dtype))
    return cases


@grader
def check_conv2d(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 4, exercise 3: ``fn(x, weight, bias, stride, padding)`` matches ``F.conv2d``.

    ``stride`` and ``padding`` are ints. Checked on square and non-square images and
    kernels, float32 and float64, fixed and random; ``F.conv2d``, ``nn.Conv2d`` and
    ``F.unfold`` are not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    for n, c, o, height, width, kh, kw, stride, padding, dtype in _conv_cases(rng):
        x = torch.randn(n, c, height, width, generator=g, dtype=dtype)
        weight = torch.randn(o, c, kh, kw, generator=g, dtype=dtype)
        bias = torch.randn(o, generator=g, dtype=dtype)
        expected = F.conv2d(x, weight, bias, stride=stride, padding=padding)
        square = height == width and kh == kw
        where = (f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, stride={stride}, "
                 f"padding={padding}, {dtype}")
        square_hint = ("your code works for square images and kernels, not for this one: take "
                       "the height and width from x.shape[-2:] and weight.shape[-2:] separately.")
        try:
            got = call(fn, x.clone(), weight.clone(), bias.clone(), stride, padding,
                       library=_CONV_LIBRARY,
                       hint="check the shapes: x [N, C, H, W], weight [O, C, kH, kW], bias [O], "
                            "and the output dtype x.dtype.")
            got = _expect_tensor(got, tuple(expected.shape), where,
                                 "the output is [N, O, (H + 2p - kH) // s + 1, "
                                 "(W + 2p - kW) // s + 1]: pad both sides, step by the stride.")
        except NotYet as wrong:
            if not square:  # every square case before this one passed
                raise NotYet(wrong.message, square_hint) from None
            raise
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        if _close(got, expected, tol, tol):
            continue
        if _close(got, F.conv2d(x, weight.flip(2, 3), bias, stride=stride, padding=padding),
                  tol, tol):
            hint = ("you flipped the kernel (true convolution); deep-learning 'convolution' is "
                    "cross-correlation, with no flip.")
        elif _close(got, expected - bias[:, None, None], tol, tol):
            hint = "add the bias of each output channel."
        elif got.dtype != x.dtype and _close(got, expected, 1e-4, 1e-4):
            hint = f"create the output with x's dtype ({x.dtype}): dtype=x.dtype."
        elif not square:
            hint = square_hint
        else:
            hint = "slide each filter over every channel and sum, then add the bias."
        raise NotYet(f"values differ for {where}.", hint)
    return _report(True, "your convolution matches F.conv2d for square and non-square "
                         "shapes, stride and padding included.")


# --------------------------------------------------------------------------- depthwise separable
_SEPARABLE_LIBRARY = Library(
    task="the exercise asks you to derive the formula",
    hint="count the weights of the two steps: one k x k filter per input channel, then a "
         "1 x 1 convolution from C_in to C_out channels.",
    python=((cnn.conv_costs, "aimodels.cnn.conv_costs"),
            (cnn.DepthwiseSeparableConv2d, "aimodels.cnn.DepthwiseSeparableConv2d"),
            (nn.Conv2d, "nn.Conv2d")),
)

_SEPARABLE_SLIPS: dict[str, Callable[[int, int, int], int]] = {
    "that is a standard convolution, C_in * C_out * k * k: the separable layer splits it "
    "into a depthwise and a pointwise step.": lambda c, o, k: c * o * k * k,
    "each depthwise filter sees one channel only, so it has k * k weights, not C_in * k * k.":
        lambda c, o, k: c * c * k * k + c * o,
    "add the depthwise step: one k x k filter per input channel, C_in * k * k.":
        lambda c, o, k: c * o,
    "add the pointwise step: a 1 x 1 convolution from C_in to C_out channels, C_in * C_out.":
        lambda c, o, k: c * k * k,
    "a k x k filter has k * k = k**2 weights, not k.": lambda c, o, k: c * k + c * o,
    "the pointwise convolution is 1 x 1: C_in * C_out weights, without k * k.":
        lambda c, o, k: c * k * k + c * o * k * k,
    "the layer has no biases in this exercise: count the weights only.":
        lambda c, o, k: c * k * k + c + c * o + o,
    "the depthwise step keeps C_in channels: its k x k filters number C_in, not C_out.":
        lambda c, o, k: o * k * k + c * o,
}


@grader
def check_separable_parameters(fn: Callable[[int, int, int], int]) -> bool:
    """Ch. 4, exercise 5: ``fn(c_in, c_out, k)`` counts a depthwise-separable layer's weights.

    A k×k depthwise convolution then a 1×1 pointwise one, no biases. Checked on fixed
    cases and on random ones that change at every call.
    """
    rng = fresh_rng()
    cases = [(32, 64, 3), (3, 16, 5), (128, 128, 3), (1, 1, 1), (16, 8, 7)]
    cases += [(rng.randint(2, 300), rng.randint(2, 300), rng.choice((3, 5, 7))) for _ in range(5)]
    for c_in, c_out, k in cases:
        where = f"c_in={c_in}, c_out={c_out}, k={k}"
        got = _whole_number(where, call(fn, c_in, c_out, k, library=_SEPARABLE_LIBRARY))
        expected = c_in * k * k + c_in * c_out
        if got == expected:
            continue
        # a slip must explain this case and a probe where every term differs: 6, 10, 3
        probe = _whole_number("c_in=6, c_out=10, k=3",
                              call(fn, 6, 10, 3, library=_SEPARABLE_LIBRARY))
        hint = next((h for h, slip in _SEPARABLE_SLIPS.items()
                     if slip(c_in, c_out, k) == got and slip(6, 10, 3) == probe),
                    "add the depthwise weights (C_in * k * k) and the pointwise ones "
                    "(C_in * C_out).")
        raise NotYet(f"{where}: got {got}, expected {expected}.", hint)
    return _report(True, f"all {len(cases)} cases right: C_in * k**2 + C_in * C_out, "
                         "against C_in * C_out * k**2 for a standard convolution.")


# --------------------------------------------------------------------------- batch norm
_BATCHNORM_LIBRARY = Library(
    task="the exercise asks you to write the formula",
    hint="subtract running_mean, divide by sqrt(running_var + eps), then scale by weight and "
         "add bias, each vector reshaped to [1, C, 1, 1].",
    torch={"batch_norm": "F.batch_norm", "native_batch_norm": "torch.native_batch_norm",
           "_native_batch_norm_legit_no_training": "F.batch_norm",
           "instance_norm": "F.instance_norm", "group_norm": "F.group_norm",
           "layer_norm": "F.layer_norm"},
    python=((cnn.BatchNorm2d, "aimodels.cnn.BatchNorm2d"), (nn.BatchNorm2d, "nn.BatchNorm2d")),
)


def _bn_eval_cases(rng) -> list[tuple]:  # noqa: ANN001
    """(shape, eps, smallest running variance, dtype): W differs from C in the first case,
    so vectors broadcast along the wrong axis fail loudly; small variances make eps count."""
    f64, f32 = torch.float64, torch.float32
    cases = [((2, 3, 4, 5), 1e-5, 1e-4, f64), ((4, 2, 3, 3), 1e-3, 1e-3, f64),
             ((1, 4, 2, 3), 1e-5, 0.5, f32), ((3, 5, 5, 5), 1e-5, 1e-4, f64)]
    for dtype in (f64, f32):
        cases.append(((rng.randint(1, 4), rng.randint(2, 6), rng.randint(1, 6),
                       rng.randint(1, 6)), rng.choice((1e-5, 1e-3)), 1e-3, dtype))
    return cases


def _bn_reference(x, mean, var, weight, bias, eps):  # noqa: ANN001, ANN202
    mean, var, weight, bias = (t.view(1, -1, 1, 1) for t in (mean, var, weight, bias))
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@grader
def check_batchnorm_eval(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 4, exercise 6: ``fn(x, running_mean, running_var, weight, bias, eps)`` is batch
    norm in evaluation mode for ``x`` of shape ``[N, C, H, W]``.

    Checked against ``F.batch_norm(..., training=False)`` with random statistics, some
    variances small enough that ``eps`` matters; ``F.batch_norm`` and the batch-norm
    modules are not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    for shape, eps, smallest, dtype in _bn_eval_cases(rng):
        c = shape[1]
        x = 3.0 + 2.0 * torch.randn(shape, generator=g, dtype=dtype)
        mean = torch.randn(c, generator=g, dtype=dtype)
        var = smallest + torch.rand(c, generator=g, dtype=dtype) * 4.0
        var[0] = smallest
        weight = 0.5 + torch.rand(c, generator=g, dtype=dtype)
        bias = torch.randn(c, generator=g, dtype=dtype)
        expected = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        where = f"x {tuple(shape)}, eps={eps}, {dtype}"
        inputs = [t.clone() for t in (x, mean, var, weight, bias)]
        got = call(fn, *inputs, eps, library=_BATCHNORM_LIBRARY,
                   hint="reshape each per-channel vector to [1, C, 1, 1] (.view(1, -1, 1, 1)) "
                        "so that it lines up with the channel axis of x.")
        got = _expect_tensor(got, shape, where, "return a tensor of the same shape as x.")
        for before, after in zip((x, mean, var, weight, bias), inputs, strict=True):
            if not torch.equal(before, after):
                raise NotYet(f"{where}: your function changed one of its inputs in place.",
                             "compute a new tensor; in evaluation mode nothing is updated.")
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        if _close(got, expected, tol, tol):
            continue
        x_mean = x.mean(dim=(0, 2, 3))
        x_var = x.var(dim=(0, 2, 3), correction=0)
        slips = [
            (_bn_reference(x, x_mean, x_var, weight, bias, eps),
             "in evaluation mode, use the running statistics, not the batch's own mean and "
             "variance: each image's output must not depend on the rest of the batch."),
            ((x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + eps)
             * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1),
             "divide by the standard deviation sqrt(running_var + eps), not by the variance."),
            (_bn_reference(x, mean, var, weight, bias, 0.0),
             "add eps inside the square root: sqrt(running_var + eps)."),
            ((x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1).sqrt() + eps)
             * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1),
             "eps goes inside the square root: sqrt(running_var + eps), not sqrt(var) + eps."),
            (_bn_reference(x, mean, var, torch.ones_like(weight), torch.zeros_like(bias), eps),
             "finish with the affine step: multiply by weight (gamma), then add bias (beta)."),
            (_bn_reference(x, mean, var, bias, weight, eps),
             "weight (gamma) scales and bias (beta) shifts: you swapped them."),
            ((x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)
             * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1) * weight.view(1, -1, 1, 1),
             "add bias after scaling: gamma * x_hat + beta, not gamma * (x_hat + beta)."),
        ]
        hint = next((h for slip, h in slips if _close(got, slip, tol, tol)),
                    "y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per "
                    "channel.")
        raise NotYet(f"values differ for {where}.", hint)
    return _report(True, "your batch norm matches F.batch_norm in evaluation mode, eps and "
                         "the affine step included.")
