"""Chapter 5 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn

from aimodels import exercises as ex
from aimodels import rnn


# --------------------------------------------------------------------------- answers
def rnn_parameters(input_size, hidden_size, num_layers):  # the notebook's solution
    first = hidden_size * input_size + hidden_size * hidden_size + 2 * hidden_size
    higher = 2 * hidden_size * hidden_size + 2 * hidden_size
    return first + (num_layers - 1) * higher


RNN_TABLE = {(1, 1, 1): 4, (3, 5, 1): 50, (10, 32, 2): 3520, (7, 4, 3): 124}


def builds_an_rnn(i, h, layers):
    return sum(p.numel() for p in nn.RNN(i, h, num_layers=layers).parameters())


def run_rnn(x, w_ih, w_hh, b_ih, b_hh, h0=None):  # the notebook's solution
    h = x.new_zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
    states = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        states.append(h)
    return torch.stack(states, dim=1), h.unsqueeze(0)


def no_hidden_bias(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    return run_rnn(x, w_ih, w_hh, b_ih, torch.zeros_like(b_hh), h0)


def ignores_h0(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    return run_rnn(x, w_ih, w_hh, b_ih, b_hh)


def time_major(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    h = x.new_zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
    states = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)  # x[t] is sample t
        states.append(h)
    return torch.stack(states, dim=1), h.unsqueeze(0)


def relu_rnn(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    h = x.new_zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
    states = []
    for t in range(x.shape[1]):
        h = torch.relu(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        states.append(h)
    return torch.stack(states, dim=1), h.unsqueeze(0)


def no_layer_axis(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    out, h = run_rnn(x, w_ih, w_hh, b_ih, b_hh, h0)
    return out, h[0]


def float32_state(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    h = torch.zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
    states = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        states.append(h)
    return torch.stack(states, dim=1), h.unsqueeze(0)


def always_indexes_h0(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    h = h0[0]
    states = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        states.append(h)
    return torch.stack(states, dim=1), h.unsqueeze(0)


def uses_nn_rnn(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    layer = nn.RNN(w_ih.shape[1], w_ih.shape[0], batch_first=True).to(x.dtype)
    with torch.no_grad():
        for p, w in zip(layer.parameters(), (w_ih, w_hh, b_ih, b_hh), strict=False):
            p.copy_(w)
        return layer(x, h0)


def uses_nn_rnn_cell(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    cell = nn.RNNCell(w_ih.shape[1], w_ih.shape[0]).to(x.dtype)
    with torch.no_grad():
        for p, w in zip(cell.parameters(), (w_ih, w_hh, b_ih, b_hh), strict=False):
            p.copy_(w)
        h = None if h0 is None else h0[0]
        states = []
        for t in range(x.shape[1]):
            h = cell(x[:, t], h)
            states.append(h)
    return torch.stack(states, 1), h.unsqueeze(0)


def uses_book_cell(x, w_ih, w_hh, b_ih, b_hh, h0=None):
    h = x.new_zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
    states = []
    for t in range(x.shape[1]):
        h = rnn.rnn_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
        states.append(h)
    return torch.stack(states, 1), h.unsqueeze(0)


def copy_batch(delay, n, generator):  # the notebook's solution
    x = torch.randn(n, delay, 1, generator=generator)
    return x, x[:, 0]


def copy_last_value(delay, n, generator):
    x = torch.randn(n, delay, 1, generator=generator)
    return x, x[:, -1]


def copy_second_value(delay, n, generator):
    x = torch.randn(n, delay, 1, generator=generator)
    return x, x[:, 1]


def copy_periodic(delay, n, generator):  # the chapter's old exercise: a noisy sine wave
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    t = torch.arange(delay).view(1, delay, 1)
    x = 1.4 * torch.sin(2 * math.pi * t / 12 + phase) + 0.1 * torch.randn(n, delay, 1, generator=generator)
    return x, x[:, 0]


def copy_random_walk(delay, n, generator):
    x = torch.randn(n, delay, 1, generator=generator).cumsum(dim=1) / math.sqrt(delay)
    return x, x[:, 0]


def copy_scaled_uniform(delay, n, generator):  # mean 0 and variance 1, but not normal
    x = (torch.rand(n, delay, 1, generator=generator) - 0.5) * math.sqrt(12)
    return x, x[:, 0]


def copy_narrow(delay, n, generator):  # standard deviation 0.96
    x = 0.96 * torch.randn(n, delay, 1, generator=generator)
    return x, x[:, 0]


def copy_half_precision(delay, n, generator):
    x = torch.randn(n, delay, 1, generator=generator).half()
    return x, x[:, 0]


def copy_uniform(delay, n, generator):
    x = torch.rand(n, delay, 1, generator=generator)
    return x, x[:, 0]


def copy_global_generator(delay, n, generator):
    x = torch.randn(n, delay, 1)
    return x, x[:, 0]


def copy_flat_target(delay, n, generator):
    x = torch.randn(n, delay, 1, generator=generator)
    return x, x[:, 0, 0]


def copy_no_feature_axis(delay, n, generator):
    x = torch.randn(n, delay, generator=generator)
    return x, x[:, :1]


def copy_smoothed(delay, n, generator):  # a moving average: neighbours share noise
    raw = torch.randn(n, delay + 1, 1, generator=generator)
    x = (raw[:, 1:] + raw[:, :-1]) / math.sqrt(2)
    return x, x[:, 0]


STEPS = math.log(0.01) / math.log(0.9)

WRONG = [
    wrong(ex.check_rnn_parameters, lambda i, h, n: rnn_parameters(i, h, n) - n * h, expect=["two bias"], id="rnn-params-one-bias"),
    wrong(ex.check_rnn_parameters, lambda i, h, n: n * (h * i + h * h + 2 * h), expect=["hidden state"], id="rnn-params-every-layer-reads-input"),
    wrong(ex.check_rnn_parameters, lambda i, h, n: rnn_parameters(i, h, n) - n * h * h, expect=["W_hh"], id="rnn-params-no-recurrent-matrix"),
    wrong(ex.check_rnn_parameters, lambda i, h, n: h * i + h * h + 2 * h, expect=["every layer"], id="rnn-params-one-layer"),
    wrong(ex.check_rnn_parameters, lambda i, h, n: RNN_TABLE.get((i, h, n), 0), expect=["expected"], id="rnn-params-hard-coded-table"),
    wrong(ex.check_rnn_parameters, builds_an_rnn, expect=["calls nn.RNN", "without building"], id="rnn-params-builds-nn-rnn"),
    wrong(ex.check_vanishing_steps, STEPS, expect=["round up"], id="steps-not-rounded"),
    wrong(ex.check_vanishing_steps, math.floor(STEPS), expect=["round up"], id="steps-rounded-down"),
    wrong(ex.check_vanishing_steps, 10, expect=["logarithms"], id="steps-ten"),
    wrong(ex.check_vanishing_steps, 22, expect=["0.01"], id="steps-ten-percent"),
    wrong(ex.check_rnn_forward, no_hidden_bias, expect=["both biases"], id="rnn-no-hidden-bias"),
    wrong(ex.check_rnn_forward, ignores_h0, expect=["start from h0"], id="rnn-ignores-h0"),
    wrong(ex.check_rnn_forward, time_major, expect=["x[:, t]"], id="rnn-time-major"),
    wrong(ex.check_rnn_forward, relu_rnn, expect=["tanh"], id="rnn-relu"),
    wrong(ex.check_rnn_forward, no_layer_axis, expect=["[1, batch, hidden]"], id="rnn-h-n-without-layer-axis"),
    wrong(ex.check_rnn_forward, float32_state, expect=["raised RuntimeError", "x.new_zeros"], id="rnn-float32-zero-state"),
    wrong(ex.check_rnn_forward, always_indexes_h0, expect=["raised TypeError"], id="rnn-h0-none-indexed"),
    wrong(ex.check_rnn_forward, uses_nn_rnn, expect=["calls nn.RNN", "loop over time steps"], id="rnn-nn-RNN"),
    wrong(ex.check_rnn_forward, uses_nn_rnn_cell, expect=["calls nn.RNN"], id="rnn-nn-RNNCell"),
    wrong(ex.check_rnn_forward, uses_book_cell, expect=["calls aimodels.rnn.rnn_cell"], id="rnn-book-cell"),
    wrong(ex.ch05.check_copy_task, copy_last_value, expect=["FIRST value", "no memory"], id="copy-last-value"),
    wrong(ex.ch05.check_copy_task, copy_second_value, expect=["step 0"], id="copy-second-value"),
    wrong(ex.ch05.check_copy_task, copy_periodic, expect=["linear fit", "Draw every value independently"], id="copy-periodic-signal"),
    wrong(ex.ch05.check_copy_task, copy_random_walk, expect=["linear fit"], id="copy-random-walk"),
    wrong(ex.ch05.check_copy_task, copy_smoothed, expect=["linear fit"], id="copy-moving-average"),
    wrong(ex.ch05.check_copy_task, copy_uniform, expect=["torch.rand is uniform"], id="copy-uniform-noise"),
    wrong(ex.ch05.check_copy_task, copy_scaled_uniform, expect=["beyond 2 standard deviations", "normal distribution itself"], id="copy-scaled-uniform"),
    wrong(ex.ch05.check_copy_task, copy_narrow, expect=["expected 0 and 1", "standard normal noise"], id="copy-narrow-noise"),
    wrong(ex.ch05.check_copy_task, copy_half_precision, expect=["torch.float16"], id="copy-half-precision"),
    wrong(ex.ch05.check_copy_task, copy_global_generator, expect=["generator you are given"], id="copy-global-generator"),
    wrong(ex.ch05.check_copy_task, copy_flat_target, expect=["keeps the feature axis"], id="copy-flat-target"),
    wrong(ex.ch05.check_copy_task, copy_no_feature_axis, expect=["add the feature axis"], id="copy-no-feature-axis"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_vanishing_steps, math.ceil(STEPS))
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_rnn_parameters, rnn_parameters)
        accepts(capsys, ex.check_rnn_forward, run_rnn)
        accepts(capsys, ex.ch05.check_copy_task, copy_batch)
    accepts(capsys, ex.ch05.check_copy_task,
            lambda delay, n, generator: (lambda x: (x, x[:, 0].clone()))(
                torch.randn(n, delay, 1, generator=generator, dtype=torch.float64)))


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_vanishing_steps, answer, expect=["write your solution first"])


@pytest.mark.parametrize("check", [ex.check_rnn_parameters, ex.check_rnn_forward,
                                   ex.ch05.check_copy_task])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])


def test_the_graders_leave_the_global_random_state_alone(capsys):
    state = torch.get_rng_state()
    accepts(capsys, ex.check_rnn_forward, run_rnn)
    rejects(capsys, ex.check_rnn_forward, no_hidden_bias)
    accepts(capsys, ex.ch05.check_copy_task, copy_batch)
    rejects(capsys, ex.ch05.check_copy_task, copy_global_generator)  # draws from the global state
    assert torch.equal(state, torch.get_rng_state())


def test_every_chapter_5_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch05.__all__) and min(counts.values()) >= 2
