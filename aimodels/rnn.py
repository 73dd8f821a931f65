"""Recurrent networks from scratch (Chapter 5).

:class:`RNN` is an Elman network with the same parameter names, shapes, initialisation
and semantics as ``torch.nn.RNN`` (tanh, biases, any number of layers), so state dicts
load both ways. ``tests/test_rnn.py`` checks outputs, final states and gradients
against PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


def rnn_cell(x_t: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor, b_hh: Tensor) -> Tensor:
    r"""One step of an Elman RNN (Elman, 1990).

    :math:`h_t = \tanh(x_t W_{ih}^\top + b_{ih} + h_{t-1} W_{hh}^\top + b_{hh})`.

    ``x_t`` is ``[batch, input_size]`` and ``h_prev`` is ``[batch, hidden_size]``.
    """
    return torch.tanh(x_t @ w_ih.T + b_ih + h_prev @ w_hh.T + b_hh)


class RNN(nn.Module):
    """A multi-layer Elman RNN written step by step, a drop-in twin of ``nn.RNN``.

    Parameters ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}`` and
    ``bias_hh_l{k}`` have ``nn.RNN``'s names and shapes, and are initialised from
    :math:`U(-1/\\sqrt{H}, 1/\\sqrt{H})` as there. ``forward(x, h0=None)`` returns
    ``(output, h_n)``: the last layer's state at every step, and every layer's final
    state, shape ``[num_layers, batch, hidden_size]``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 batch_first: bool = True) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, batch_first
        bound = 1 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            fan_in = input_size if layer == 0 else hidden_size
            shapes = {
                f"weight_ih_l{layer}": (hidden_size, fan_in),
                f"weight_hh_l{layer}": (hidden_size, hidden_size),
                f"bias_ih_l{layer}": (hidden_size,),
                f"bias_hh_l{layer}": (hidden_size,),
            }
            for name, shape in shapes.items():
                weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                self.register_parameter(name, weight)

    def initial_state(self, x: Tensor, h0: Tensor | None) -> Tensor:
        """``h0``, checked; or zeros whose batch size is read from ``x``, never assumed."""
        batch = x.shape[0] if self.batch_first else x.shape[1]
        expected = (self.num_layers, batch, self.hidden_size)
        if h0 is None:
            return x.new_zeros(expected)
        if tuple(h0.shape) != expected:
            raise ValueError(
                f"expected h0 of shape [num_layers, batch, hidden_size] = {list(expected)} "
                f"for this input, got {list(h0.shape)}"
            )
        return h0

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            layout = "[batch, time, features]" if self.batch_first else "[time, batch, features]"
            raise ValueError(
                f"expected input of shape {layout} with features = {self.input_size}, "
                f"got {list(x.shape)}"
            )
        h0 = self.initial_state(x, h0)
        sequence = x if self.batch_first else x.transpose(0, 1)  # [batch, time, features]
        finals = []
        for layer in range(self.num_layers):
            weights = layer_weights(self, layer)
            h, states = h0[layer], []
            for t in range(sequence.shape[1]):
                h = rnn_cell(sequence[:, t], h, *weights)
                states.append(h)
            sequence = torch.stack(states, dim=1)
            finals.append(h)
        output = sequence if self.batch_first else sequence.transpose(0, 1)
        return output, torch.stack(finals)


def layer_weights(rnn: RNN | nn.RNN, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_ih, W_hh, b_ih, b_hh)`` of one layer of our RNN or of ``nn.RNN`` (same names)."""
    return tuple(getattr(rnn, f"{kind}_l{layer}")  # type: ignore[return-value]
                 for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def gradient_norms_through_time(rnn: RNN | nn.RNN, x: Tensor) -> Tensor:
    r"""How strongly the final state depends on each earlier one.

    Measures :math:`\lVert \partial h_T / \partial h_t \rVert` for every t.

    Runs the first layer of ``rnn`` step by step on ``x`` (``[batch, time, features]``)
    from a zero state, then back-propagates :math:`\sum h_T` to every :math:`h_t`.
    Returns the norm of each gradient, for t = 1..T. Through the chain rule,
    :math:`\partial h_T / \partial h_t = \prod_{k=t+1}^{T} \operatorname{diag}(1 - h_k^2)\, W_{hh}`,
    so the norms shrink or grow geometrically with T - t.
    """
    weights = layer_weights(rnn, 0)
    h = x.new_zeros(x.shape[0], weights[1].shape[0])
    states = []
    for t in range(x.shape[1]):
        h = rnn_cell(x[:, t], h, *weights)
        states.append(h)
    grads = torch.autograd.grad(states[-1].sum(), states)
    return torch.stack([g.norm() for g in grads]).detach()


class SequenceRegressor(nn.Module):
    """Reads a sequence with a recurrent layer and predicts the next value from its last state.

    ``cell`` is ``"scratch"`` (our :class:`RNN`), or ``"rnn"``, ``"lstm"`` or ``"gru"``
    (PyTorch's layers). Input ``[batch, time, features]``, output ``[batch, outputs]``.
    The initial state is created inside each layer from the batch it receives.
    """

    CELLS = {"scratch": RNN, "rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, cell: str = "scratch", input_size: int = 1, hidden_size: int = 32,
                 num_layers: int = 1, outputs: int = 1) -> None:
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"cell must be one of {sorted(self.CELLS)}, got {cell!r}")
        self.recurrent = self.CELLS[cell](input_size, hidden_size, num_layers=num_layers,
                                          batch_first=True)
        self.head = nn.Linear(hidden_size, outputs)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.recurrent(x)
        return self.head(output[:, -1])
