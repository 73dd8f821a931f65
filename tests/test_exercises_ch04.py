"""Chapter 4 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
import sys
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn
from torch.nn import functional as F

from aimodels import cnn
from aimodels import exercises as ex


# --------------------------------------------------------------------------- answers
def out_size(n, k, s, p):  # the notebook's solution
    return (n + 2 * p - k) // s + 1


OUT_SIZE_TABLE = {(32, 5, 1, 0): 28, (28, 2, 2, 0): 14, (7, 3, 2, 1): 4, (224, 7, 2, 3): 112,
                  (10, 4, 3, 0): 3, (5, 5, 1, 2): 5}


def measures_with_a_layer(n, k, s, p):
    return nn.Conv2d(1, 1, k, s, p)(torch.zeros(1, 1, n, n)).shape[-1]


def conv2d(x, weight, bias, stride, padding):  # loops over output positions, any shape
    kh, kw = weight.shape[-2:]
    xp = F.pad(x, (padding,) * 4)
    oh, ow = (xp.shape[-2] - kh) // stride + 1, (xp.shape[-1] - kw) // stride + 1
    out = torch.empty(x.shape[0], weight.shape[0], oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = (patch.unsqueeze(1) * weight).sum(dim=(2, 3, 4)) + bias
    return out


def conv2d_im2col(x, weight, bias, stride, padding):  # im2col with Tensor.unfold
    kh, kw = weight.shape[-2:]
    patches = F.pad(x, (padding,) * 4).unfold(2, kh, stride).unfold(3, kw, stride)
    return torch.einsum("nchwij,ocij->nohw", patches, weight) + bias[:, None, None]


def notebook_square_only(x, weight, bias, stride, padding):  # 04_cnn.ipynb's folded solution
    k = weight.shape[-1]
    xp = F.pad(x, (padding,) * 4)
    size = (xp.shape[-1] - k) // stride + 1
    out = torch.empty(x.shape[0], weight.shape[0], size, size, dtype=x.dtype)
    for i in range(size):
        for j in range(size):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = (patch.unsqueeze(1) * weight).sum(dim=(2, 3, 4)) + bias
    return out


def conv2d_flipped(x, weight, bias, stride, padding):
    return conv2d(x, weight.flip(2, 3), bias, stride, padding)


def conv2d_no_bias(x, weight, bias, stride, padding):
    return conv2d(x, weight, torch.zeros_like(bias), stride, padding)


def conv2d_one_sided_padding(x, weight, bias, stride, padding):
    x = F.pad(x, (padding, 0, padding, 0))
    return conv2d(x, weight, bias, stride, 0)


def conv2d_float32_output(x, weight, bias, stride, padding):
    return conv2d(x, weight, bias, stride, padding).float()


def conv2d_library(x, weight, bias, stride, padding):
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)


def conv2d_torch_alias(x, weight, bias, stride, padding):
    return torch.conv2d(x, weight, bias, stride, padding)


def conv2d_layer(x, weight, bias, stride, padding):
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[-2:]), stride, padding)
    layer = layer.to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        return layer(x)


def conv2d_unfold(x, weight, bias, stride, padding):  # im2col with F.unfold: ruled out
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = weight.flatten(1) @ cols + bias[:, None]
    return out.view(n, -1, oh, ow)


def separable_parameters(c_in, c_out, k):  # the notebook's solution
    depthwise = c_in * k * k  # one k x k filter per input channel
    pointwise = c_in * c_out  # a 1 x 1 convolution mixes the channels
    return depthwise + pointwise


def separable_by_counting(c_in, c_out, k):  # builds the layers and counts: ruled out
    layers = [nn.Conv2d(c_in, c_in, k, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False)]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def bn_eval(x, running_mean, running_var, weight, bias, eps):  # the notebook's solution
    def per_channel(v):
        return v.view(1, -1, 1, 1)

    x_hat = (x - per_channel(running_mean)) / torch.sqrt(per_channel(running_var) + eps)
    return per_channel(weight) * x_hat + per_channel(bias)


def bn_eval_einsum_style(x, running_mean, running_var, weight, bias, eps):  # another layout
    scale = weight / torch.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    return x * scale[:, None, None] + shift[:, None, None]


def bn_batch_statistics(x, running_mean, running_var, weight, bias, eps):
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), correction=0)
    return bn_eval(x, mean, var, weight, bias, eps)


def bn_no_sqrt(x, running_mean, running_var, weight, bias, eps):
    m, v, w, b = (t.view(1, -1, 1, 1) for t in (running_mean, running_var, weight, bias))
    return (x - m) / (v + eps) * w + b


def bn_eps_outside(x, running_mean, running_var, weight, bias, eps):
    m, v, w, b = (t.view(1, -1, 1, 1) for t in (running_mean, running_var, weight, bias))
    return (x - m) / (v.sqrt() + eps) * w + b


def bn_no_affine(x, running_mean, running_var, weight, bias, eps):
    return bn_eval(x, running_mean, running_var, torch.ones_like(weight), torch.zeros_like(bias), eps)


def bn_swapped_affine(x, running_mean, running_var, weight, bias, eps):
    return bn_eval(x, running_mean, running_var, bias, weight, eps)


def bn_bias_before_scaling(x, running_mean, running_var, weight, bias, eps):
    m, v, w, b = (t.view(1, -1, 1, 1) for t in (running_mean, running_var, weight, bias))
    return ((x - m) / torch.sqrt(v + eps) + b) * w


def bn_wrong_axis(x, running_mean, running_var, weight, bias, eps):  # [C] lines up with W
    return (x - running_mean) / torch.sqrt(running_var + eps) * weight + bias


def bn_in_place(x, running_mean, running_var, weight, bias, eps):
    running_var += eps
    return bn_eval(x, running_mean, running_var, weight, bias, 0.0)


def bn_library(x, running_mean, running_var, weight, bias, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)


def bn_module(x, running_mean, running_var, weight, bias, eps):
    layer = nn.BatchNorm2d(x.shape[1], eps=eps).to(x.dtype).eval()
    layer.load_state_dict({"running_mean": running_mean, "running_var": running_var,
                           "weight": weight, "bias": bias, "num_batches_tracked": torch.tensor(1)})
    with torch.no_grad():
        return layer(x)


WRONG = [
    wrong(ex.check_conv_output_size, lambda n, k, s, p: (n + p - k) // s + 1, expect=["both sides"], id="size-one-sided-padding"),
    wrong(ex.check_conv_output_size, lambda n, k, s, p: (n - k) // s + 1, expect=["n + 2p - k"], id="size-ignores-padding"),
    wrong(ex.check_conv_output_size, lambda n, k, s, p: (n + 2 * p - k) // s, expect=["add 1"], id="size-missing-plus-one"),
    wrong(ex.check_conv_output_size, lambda n, k, s, p: math.ceil((n + 2 * p - k) / s) + 1, expect=["round down"], id="size-ceil"),
    wrong(ex.check_conv_output_size, lambda n, k, s, p: (n + 2 * p - k) / s + 1, expect=["not a whole number", "//"], id="size-true-division"),
    wrong(ex.check_conv_output_size, lambda n, k, s, p: OUT_SIZE_TABLE.get((n, k, s, p), 1), expect=["expected"], id="size-hard-coded-table"),
    wrong(ex.check_conv_output_size, cnn.output_size, expect=["calls aimodels.cnn.output_size"], id="size-book-function"),
    wrong(ex.check_conv_output_size, measures_with_a_layer, expect=["calls F.conv2d"], id="size-measures-nn-conv2d"),
    wrong(ex.check_receptive_field, 11, expect=["k - 1"], id="field-adds-k"),
    wrong(ex.check_receptive_field, 7, expect=["pooling"], id="field-forgets-pooling"),
    wrong(ex.check_receptive_field, 9, expect=["*above*"], id="field-own-stride"),
    wrong(ex.check_conv2d, notebook_square_only, expect=["square"], id="conv-square-only"),
    wrong(ex.check_conv2d, conv2d_flipped, expect=["flipped"], id="conv-flipped-kernel"),
    wrong(ex.check_conv2d, conv2d_no_bias, expect=["bias"], id="conv-no-bias"),
    wrong(ex.check_conv2d, conv2d_one_sided_padding, expect=["pad both sides"], id="conv-one-sided-padding"),
    wrong(ex.check_conv2d, conv2d_float32_output, expect=["dtype=x.dtype"], id="conv-float32-output"),
    wrong(ex.check_conv2d, conv2d_library, expect=["calls F.conv2d", "loops or im2col"], id="conv-F-conv2d"),
    wrong(ex.check_conv2d, conv2d_torch_alias, expect=["calls F.conv2d"], id="conv-torch-conv2d"),
    wrong(ex.check_conv2d, conv2d_layer, expect=["calls F.conv2d"], id="conv-nn-Conv2d"),
    wrong(ex.check_conv2d, conv2d_unfold, expect=["calls F.unfold"], id="conv-F-unfold"),
    wrong(ex.check_conv2d, lambda x, w, b, s, p: cnn.conv2d(x, w, b, s, p), expect=["calls aimodels.cnn.conv2d"], id="conv-book-function"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * o * k * k, expect=["standard convolution"], id="separable-standard-conv"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * c * k * k + c * o, expect=["one channel only"], id="separable-full-depthwise"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * o, expect=["add the depthwise step"], id="separable-no-depthwise"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * k * k, expect=["add the pointwise step"], id="separable-no-pointwise"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * k + c * o, expect=["k**2"], id="separable-k-not-squared"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * k * k + c + c * o + o, expect=["no biases"], id="separable-with-biases"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: o * k * k + c * o, expect=["number C_in, not C_out"], id="separable-depthwise-c-out"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: c * k * k + c * o + 1, expect=["expected"], id="separable-off"),
    wrong(ex.ch04.check_separable_parameters, separable_by_counting, expect=["calls nn.Conv2d", "derive the formula"], id="separable-counts-layers"),
    wrong(ex.ch04.check_separable_parameters, lambda c, o, k: cnn.conv_costs(c, o, k, 1, 1, True)["parameters"], expect=["calls aimodels.cnn.conv_costs"], id="separable-book-function"),
    wrong(ex.ch04.check_batchnorm_eval, bn_batch_statistics, expect=["running statistics"], id="bn-batch-statistics"),
    wrong(ex.ch04.check_batchnorm_eval, bn_no_sqrt, expect=["not by the variance"], id="bn-no-sqrt"),
    wrong(ex.ch04.check_batchnorm_eval, lambda x, m, v, w, b, eps: bn_eval(x, m, v, w, b, 0.0), expect=["add eps inside"], id="bn-no-eps"),
    wrong(ex.ch04.check_batchnorm_eval, bn_eps_outside, expect=["not sqrt(var) + eps"], id="bn-eps-outside"),
    wrong(ex.ch04.check_batchnorm_eval, bn_no_affine, expect=["affine step"], id="bn-no-affine"),
    wrong(ex.ch04.check_batchnorm_eval, bn_swapped_affine, expect=["swapped"], id="bn-swapped-affine"),
    wrong(ex.ch04.check_batchnorm_eval, bn_bias_before_scaling, expect=["add bias after scaling"], id="bn-bias-before-scaling"),
    wrong(ex.ch04.check_batchnorm_eval, bn_wrong_axis, expect=["[1, C, 1, 1]"], id="bn-wrong-axis"),
    wrong(ex.ch04.check_batchnorm_eval, bn_in_place, expect=["in place"], id="bn-in-place"),
    wrong(ex.ch04.check_batchnorm_eval, lambda x, m, v, w, b, eps: bn_eval(x, m, v, w, b, eps)[:, :1], expect=["same shape as x"], id="bn-wrong-shape"),
    wrong(ex.ch04.check_batchnorm_eval, bn_library, expect=["calls F.batch_norm"], id="bn-F-batch-norm"),
    wrong(ex.ch04.check_batchnorm_eval, bn_module, expect=["calls nn.BatchNorm2d"], id="bn-nn-module"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_receptive_field, cnn.receptive_field([(3, 1), (3, 1), (3, 1), (2, 2)]))
    accepts(capsys, ex.check_receptive_field, 8)
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_conv_output_size, out_size)
        accepts(capsys, ex.check_conv_output_size, lambda n, k, s, p: math.floor((n + 2 * p - k) / s) + 1)
        accepts(capsys, ex.check_conv2d, conv2d)
        accepts(capsys, ex.check_conv2d, conv2d_im2col)
        accepts(capsys, ex.ch04.check_separable_parameters, separable_parameters)
        accepts(capsys, ex.ch04.check_batchnorm_eval, bn_eval)
        accepts(capsys, ex.ch04.check_batchnorm_eval, bn_eval_einsum_style)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_receptive_field, answer, expect=["write your solution first"])


@pytest.mark.parametrize("check", [ex.check_conv_output_size, ex.check_conv2d,
                                   ex.ch04.check_separable_parameters, ex.ch04.check_batchnorm_eval])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])


def test_the_spy_is_gone_after_a_rejected_answer(capsys):
    rejects(capsys, ex.check_conv2d, conv2d_library)
    rejects(capsys, ex.check_conv2d, broken)
    assert sys.getprofile() is None and torch._C._len_torch_function_stack() == 0
    assert F.conv2d(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == 4


def test_every_chapter_4_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch04.__all__) and min(counts.values()) >= 2


def test_new_graders_turn_away_blanks_and_non_functions(capsys):
    for check in (ex.ch04.check_separable_parameters, ex.ch04.check_batchnorm_eval):
        rejects(capsys, check, ..., expect=["no answer yet"])
        rejects(capsys, check, 42, expect=["expected a function"])
    rejects(capsys, ex.ch04.check_separable_parameters, lambda c, o, k: "many", expect=["whole number"])
