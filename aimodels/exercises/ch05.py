"""Chapter 5 graders: recurrent networks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from aimodels import rnn, scaling

from ._common import (
    Library,
    NotYet,
    _close,
    _grade_number,
    _report,
    _shape,
    _whole_number,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

__all__ = ["check_copy_task", "check_rnn_forward", "check_rnn_parameters", "check_vanishing_steps"]

_BUILDS_AN_RNN = Library(
    task="the exercise asks you to count from the sizes, without building the module",
    hint="per layer: W_ih (hidden x inputs), W_hh (hidden x hidden) and two bias vectors.",
    python=((nn.modules.rnn, "nn.RNN"), (scaling.count_parameters, "count_parameters")),
)


def _rnn_parameters(input_size: int, hidden_size: int, num_layers: int) -> int:
    module = nn.RNN(input_size, hidden_size, num_layers=num_layers, device="meta")
    return scaling.count_parameters(module)


@grader
def check_rnn_parameters(fn: Callable[[int, int, int], int]) -> bool:
    """Ch. 5, exercise 1: ``fn(input_size, hidden_size, num_layers)`` counts nn.RNN weights.

    Checked on fixed and random configurations, against torch's own count.
    """
    rng = fresh_rng()
    cases = [(3, 5, 1), (10, 32, 2), (7, 4, 3), (4, 7, 3), (1, 1, 1)]
    cases += [(rng.randint(1, 300), rng.randint(1, 300), rng.randint(1, 5)) for _ in range(4)]
    for i, h, layers in cases:
        expected = _rnn_parameters(i, h, layers)
        where = f"input_size={i}, hidden_size={h}, num_layers={layers}"
        got = _whole_number(where, call(fn, i, h, layers, library=_BUILDS_AN_RNN))
        if got == expected:
            continue
        if got == expected - layers * h:
            hint = "nn.RNN has two bias vectors per layer, b_ih and b_hh."
        elif got == layers * (h * i + h * h + 2 * h):
            hint = "layers above the first read the hidden state, of size hidden_size."
        elif got == expected - layers * h * h:
            hint = "each layer also has the recurrent matrix W_hh, hidden x hidden."
        elif got == h * i + h * h + 2 * h:
            hint = "count every layer: the first reads the input, the others the hidden state."
        else:
            hint = "per layer: W_ih (hidden x inputs), W_hh (hidden x hidden), two biases."
        raise NotYet(f"{where}: got {got}, expected {expected}.", hint)
    return _report(True, f"all {len(cases)} configurations counted exactly.")


@grader
def check_vanishing_steps(answer: object) -> bool:
    """Ch. 5, exercise 2: steps until a gradient scaled by 0.9 per step falls below 1%."""
    exact = math.log(0.01) / math.log(0.9)
    return _grade_number(
        "steps", answer, math.ceil(exact),
        {exact: "a number of steps is a whole number: round up.",
         math.floor(exact): "after that many steps the gradient is still just above 1%: "
                            "round up.",
         10.0: "0.9^10 = 0.35, not 0.01: use logarithms, k = log(0.01) / log(0.9).",
         math.ceil(math.log(0.1) / math.log(0.9)): "1% is 0.01, not 0.1."},
        rel=1e-9,
    )


_TORCH_RNN = Library(
    task="the exercise asks you to write the loop over time steps yourself",
    hint="h_t = tanh(x_t W_ih^T + b_ih + h_(t-1) W_hh^T + b_hh), for t = 0, 1, ...",
    torch={name: "nn.RNN" for name in ("rnn_tanh", "rnn_relu", "lstm", "gru")}
    | {name: "nn.RNNCell" for name in ("rnn_tanh_cell", "rnn_relu_cell", "lstm_cell",
                                        "gru_cell")},
    python=((nn.modules.rnn, "nn.RNN"), (rnn.RNN, "aimodels.rnn.RNN"),
            (rnn.rnn_cell, "aimodels.rnn.rnn_cell")),
)


def _reference(x: torch.Tensor, weights: list[torch.Tensor], h0: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.RNN's answer, with the given weights; the global random state is left alone."""
    module = nn.RNN(x.shape[-1], weights[1].shape[0], batch_first=True, device="meta")
    module = module.to_empty(device="cpu").to(x.dtype)
    with torch.no_grad():
        for p, w in zip(module.parameters(), weights, strict=True):
            p.copy_(w)
        return module(x, h0)


@grader
def check_rnn_forward(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Ch. 5, exercise 3: ``fn(x, w_ih, w_hh, b_ih, b_hh, h0=None)`` runs a 1-layer RNN.

    ``x`` is ``[batch, time, features]``; returns ``(output, h_n)`` like ``nn.RNN``.
    Checked for batch sizes 1, 3 and 8 (and random ones), a batch as long as the
    sequence, float32 and float64, with and without an initial state; ``nn.RNN`` and
    ``nn.RNNCell`` are not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    f64, f32 = torch.float64, torch.float32
    # A batch as long as the sequence first: reading x[t] for x[:, t] gives wrong values,
    # not an error, so the hint can name that slip.
    cases = [(6, 6, 3, 5, f64), (1, 6, 2, 4, f64), (3, 6, 2, 4, f64), (8, 6, 2, 4, f64),
             (4, 5, 3, 2, f32),
             (rng.randint(1, 9), rng.randint(1, 8), rng.randint(1, 5), rng.randint(1, 6),
              rng.choice([f32, f64]))]
    for batch, time, features, hidden, dtype in cases:
        x = torch.randn(batch, time, features, generator=g, dtype=dtype)
        weights = [torch.randn(shape, generator=g, dtype=dtype) * 0.5 for shape in
                   ((hidden, features), (hidden, hidden), (hidden,), (hidden,))]
        for h0 in (None, torch.randn(1, batch, hidden, generator=g, dtype=dtype)):
            expected_out, expected_h = _reference(x, weights, h0)
            which = "without h0" if h0 is None else "with h0"
            where = (f"x of shape {tuple(x.shape)} ({dtype}), hidden size {hidden}, {which}")
            result = call(fn, x.clone(), *[w.clone() for w in weights],
                          h0=None if h0 is None else h0.clone(), library=_TORCH_RNN,
                          hint="build the zero initial state with x.new_zeros(x.shape[0], "
                               "hidden): the batch size and dtype come from x.")
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise NotYet(f"{where}: expected a pair (output, h_n), got {_shape(result)}.",
                             "return both, like nn.RNN: the states at every step, and the last.")
            got_out, got_h = result
            shapes_ok = (isinstance(got_out, torch.Tensor) and isinstance(got_h, torch.Tensor)
                         and got_out.shape == expected_out.shape
                         and got_h.shape == expected_h.shape)
            if not shapes_ok:
                hint = ("output is [batch, time, hidden] (batch_first) and h_n is [1, batch, "
                        "hidden]: one layer.")
                raise NotYet(f"{where}: got {_shape(got_out)} and {_shape(got_h)}, expected "
                             f"{tuple(expected_out.shape)} and {tuple(expected_h.shape)}.", hint)
            tol = 1e-10 if dtype == f64 else 1e-5
            if _close(got_out, expected_out, tol) and _close(got_h, expected_h, tol):
                continue
            if h0 is not None and _close(got_out, _reference(x, weights, None)[0], tol):
                hint = "start from h0 when it is given; zeros only when h0 is None."
            elif _close(got_out, _reference(x, weights[:3] + [weights[3] * 0], h0)[0], tol):
                hint = "add both biases, b_ih and b_hh."
            elif batch == time and _close(got_out, _reference(x.transpose(0, 1), weights, h0)[0],
                                          tol):
                hint = "x is batch first: step t is x[:, t], not x[t]."
            else:
                hint = "h_t = tanh(x_t W_ih^T + b_ih + h_(t-1) W_hh^T + b_hh)."
            raise NotYet(f"{where}: values differ from nn.RNN.", hint)
    return _report(True, "your RNN matches nn.RNN for every batch size, dtype, with and "
                         "without h0.")


def _copy_batch(fn: Callable[..., object], delay: int, n: int, seed: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's batch for ``delay`` and ``n``, drawn with a generator seeded ``seed``."""
    result = call(fn, delay, n, torch.Generator().manual_seed(seed))
    where = f"delay={delay}, n={n}"
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise NotYet(f"{where}: expected a pair (x, y), got {_shape(result)}.",
                     "return the inputs and the targets: x, x[:, 0].")
    x, y = result
    if isinstance(x, torch.Tensor) and tuple(x.shape) == (n, delay):
        raise NotYet(f"{where}: x has shape {tuple(x.shape)}, expected {(n, delay, 1)}.",
                     "SequenceRegressor reads [batch, time, features]: add the feature axis, "
                     "torch.randn(n, delay, 1, ...).")
    if not (isinstance(x, torch.Tensor) and tuple(x.shape) == (n, delay, 1)
            and x.is_floating_point()):
        raise NotYet(f"{where}: expected x, a float tensor of shape {(n, delay, 1)}, "
                     f"got {_shape(x)}.", "x = torch.randn(n, delay, 1, generator=generator).")
    if isinstance(y, torch.Tensor) and tuple(y.shape) == (n,):
        raise NotYet(f"{where}: y has shape {(n,)}, expected {(n, 1)}.",
                     "the model predicts [batch, 1]; x[:, 0] keeps the feature axis.")
    if not (isinstance(y, torch.Tensor) and tuple(y.shape) == (n, 1)):
        raise NotYet(f"{where}: expected y of shape {(n, 1)}, got {_shape(y)}.",
                     "the target is the first value of each sequence, x[:, 0].")
    return x.detach(), y.detach()


def _explained_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """R^2 of the least-squares fit of y on x_1 ... x_(T-1) and a constant."""
    later = x[:, 1:, 0].double()
    design = torch.cat([later, later.new_ones(len(later), 1)], dim=1)
    target = y.double()
    residual = target - design @ torch.linalg.lstsq(design, target).solution
    return 1.0 - (residual.var() / target.var()).item()


@grader
def check_copy_task(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Ch. 5, exercise 4: ``fn(delay, n, generator)`` makes a batch of the copy task.

    Returns inputs ``x`` of shape ``[n, delay, 1]``, i.i.d. standard normal values drawn
    with ``generator``, and targets ``y = x[:, 0]`` of shape ``[n, 1]``. Checked: the
    shapes, the target, that the later values carry no linear information about the
    first (R^2 of a least-squares fit), the mean and spread, and that the same seed gives
    the same batch. The global random state is left alone.
    """
    rng = fresh_rng()
    n, seed = 4000, rng.randrange(2**62)
    state = torch.get_rng_state()
    try:
        for delay in (rng.randint(20, 40), 5):
            x, y = _copy_batch(fn, delay, n, seed)
            where = f"delay={delay}"
            if not torch.equal(y, x[:, 0]):
                if torch.equal(y, x[:, -1]):
                    hint = ("the target is the FIRST value, x[:, 0]: the last one is still in "
                            "the input at the end, so recalling it needs no memory.")
                elif any(torch.equal(y, x[:, k]) for k in range(1, delay)):
                    hint = "the first value is step 0: x[:, 0]."
                else:
                    hint = "the target is the first value of each sequence: y = x[:, 0]."
                raise NotYet(f"{where}: y is not the first value of each sequence.", hint)
            share = _explained_share(x, y)
            if share > 0.05:
                raise NotYet(f"{where}: a linear fit on the later values explains {share:.0%} "
                             "of x_0, so a model need not remember it.",
                             "with a periodic, smooth or cumulative signal, x_0 can be read "
                             "off the later values. Draw every value independently: "
                             "torch.randn(n, delay, 1, generator=generator).")
            pairs = x[:, :, 0].double()
            lag1 = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(),
                                               pairs[:, 1:].flatten()]))[0, 1].item()
            if abs(lag1) > 0.05:
                raise NotYet(f"{where}: neighbouring values are correlated ({lag1:.2f}).",
                             "draw every value independently, with torch.randn.")
            if x.dtype not in (torch.float32, torch.float64):
                raise NotYet(f"{where}: the inputs are {x.dtype}.",
                             "keep torch.randn's default float32 (or float64): a recurrent "
                             "layer computes in those.")
            mean, std = x.double().mean().item(), x.double().std().item()
            if abs(mean) > 0.05 or abs(std - 1) > 0.025:
                hint = ("torch.rand is uniform on [0, 1); the task uses standard normal noise, "
                        "torch.randn." if abs(mean - 0.5) < 0.05 else
                        "use standard normal noise, mean 0 and variance 1: torch.randn.")
                raise NotYet(f"{where}: the inputs have mean {mean:.2f} and standard deviation "
                             f"{std:.2f}, expected 0 and 1.", hint)
            tails = (x.double().abs() > 2).double().mean().item()  # 4.55% for N(0, 1)
            if abs(tails - 0.0455) > 0.01:
                raise NotYet(f"{where}: {tails:.2%} of the inputs lie beyond 2 standard "
                             "deviations; a standard normal puts 4.55% there.",
                             "mean 0 and variance 1 are not enough: draw from the normal "
                             "distribution itself, torch.randn.")
            again, _ = _copy_batch(fn, delay, n, seed)
            other, _ = _copy_batch(fn, delay, n, seed + 1)
            if not torch.equal(again, x) or torch.equal(other, x):
                raise NotYet(f"{where}: the same seed gave a different batch, or another "
                             "seed the same one.",
                             "draw with the generator you are given: torch.randn(..., "
                             "generator=generator).")
    finally:
        torch.set_rng_state(state)
    return _report(True, "i.i.d. standard normal inputs, the target is x_0, and nothing "
                         "after it predicts it.")
