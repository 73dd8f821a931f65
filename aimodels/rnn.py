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


# --------------------------------------------------------------------------- linear baseline
# Appended after the chapter's first sections so that their displayed line numbers stay put.
from collections.abc import Callable  # noqa: E402


def _lag_matrix(windows: Tensor, p: int) -> Tensor:
    """The last ``p`` values of each window and a column of ones: ``[n, p + 1]``, float64."""
    if windows.ndim == 3 and windows.shape[-1] == 1:
        windows = windows[..., 0]
    if windows.ndim != 2:
        raise ValueError(f"expected windows of shape [n, window] or [n, window, 1], "
                         f"got {list(windows.shape)}")
    if not isinstance(p, int) or not 1 <= p <= windows.shape[1]:
        raise ValueError(f"p must be an int in [1, window = {windows.shape[1]}], got {p!r}")
    lags = windows[:, -p:].double()
    return torch.cat([lags, lags.new_ones(len(lags), 1)], dim=1)


def fit_autoregression(windows: Tensor, targets: Tensor, p: int) -> Tensor:
    r"""Fit a linear autoregression AR(p) by least squares.

    :math:`\hat y_{t+1} = c + \sum_{i=1}^{p} \phi_i\, y_{t+1-i}`: the forecast is a fixed
    weighted sum of the last p values (Box and Jenkins; Hyndman and Athanasopoulos, ch. 9).
    ``windows`` is ``[n, window]`` or ``[n, window, 1]`` (oldest value first, as
    :func:`aimodels.data.forecasting_windows` returns them) and ``targets`` is ``[n]`` or
    ``[n, k]``: with k columns, k separate regressions are solved at once (the *direct*
    strategy fits one per horizon). Returns float64 coefficients ``[p + 1]`` or
    ``[p + 1, k]``: the weights of the last p values, oldest first, then the intercept c.
    Solved with ``torch.linalg.lstsq``, which minimises :math:`\lVert A w - y \rVert^2`.
    """
    design = _lag_matrix(windows, p)
    if targets.ndim not in (1, 2) or targets.shape[0] != design.shape[0]:
        raise ValueError(f"expected targets of shape [n] or [n, k] with n = {design.shape[0]} "
                         f"windows, got {list(targets.shape)}")
    column = targets.double().reshape(len(targets), -1)
    coef = torch.linalg.lstsq(design, column).solution
    return coef[:, 0] if targets.ndim == 1 else coef


def predict_autoregression(coef: Tensor, windows: Tensor) -> Tensor:
    """Forecasts of a fitted AR(p) for each window: ``[n]`` or ``[n, k]``, like its targets."""
    if coef.ndim not in (1, 2):
        raise ValueError(f"expected coefficients of shape [p + 1] or [p + 1, k], "
                         f"got {list(coef.shape)}")
    design = _lag_matrix(windows, coef.shape[0] - 1)
    return (design @ coef.double()).to(windows.dtype)


def recursive_forecast(step: Callable[[Tensor], Tensor], windows: Tensor,
                       horizon: int) -> Tensor:
    r"""Forecast ``horizon`` steps ahead by iterating a one-step forecaster.

    Each prediction is appended to the window as if it had been observed, and the oldest
    value dropped: :math:`\hat y_{t+2} = f(y_{t-w+2}, \dots, y_t, \hat y_{t+1})`, and so on.
    ``step`` maps windows (the layout of ``windows``: ``[n, w]`` or ``[n, w, 1]``) to one
    forecast per window (``[n]`` or ``[n, 1]``). Returns ``[n, horizon]``. Errors made at
    early steps become inputs of later ones, so they can compound (the *recursive*
    strategy of Ben Taieb et al., 2012).
    """
    if windows.ndim not in (2, 3) or (windows.ndim == 3 and windows.shape[-1] != 1):
        raise ValueError(f"expected windows of shape [n, window] or [n, window, 1], "
                         f"got {list(windows.shape)}")
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive int, got {horizon!r}")
    history, forecasts = windows, []
    for _ in range(horizon):
        nxt = step(history)
        if nxt.numel() != len(windows):
            raise ValueError(f"step must return one forecast per window ({len(windows)}), "
                             f"got shape {list(nxt.shape)}")
        nxt = nxt.reshape(len(windows), 1).to(windows.dtype)
        forecasts.append(nxt)
        newest = nxt if windows.ndim == 2 else nxt[:, :, None]
        history = torch.cat([history[:, 1:], newest], dim=1)
    return torch.cat(forecasts, dim=1)


# --------------------------------------------------------------------------- language model
class CharLanguageModel(nn.Module):
    """A character-level language model: embedding, a recurrent layer, a linear head.

    ``forward(ids, state=None)`` takes ids ``[batch, time]`` and returns the logits of the
    next character at every step, ``[batch, time, vocab_size]``, and the final state (pass
    it back in to continue a text). ``cell`` is ``"scratch"`` (our :class:`RNN`), ``"rnn"``,
    ``"lstm"`` or ``"gru"``.
    """

    CELLS = SequenceRegressor.CELLS

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden_size: int = 128,
                 cell: str = "gru", num_layers: int = 1) -> None:
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"cell must be one of {sorted(self.CELLS)}, got {cell!r}")
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.recurrent = self.CELLS[cell](embed_dim, hidden_size, num_layers=num_layers,
                                          batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: Tensor, state: Tensor | tuple[Tensor, Tensor] | None = None,
                ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"expected int64 ids of shape [batch, time], got "
                             f"{list(ids.shape)} ({ids.dtype})")
        output, state = self.recurrent(self.embed(ids), state)
        return self.head(output), state


def perplexity(logits: Tensor, targets: Tensor) -> float:
    r"""Perplexity of next-token predictions, from the logits, by hand.

    :math:`\mathrm{PPL} = \exp\!\big(-\frac{1}{N}\sum_i \log p(y_i)\big)`, with
    :math:`\log p(y) = z_y - \log \sum_j e^{z_j}` (the maximum is subtracted first so the
    exponentials cannot overflow). It equals ``exp(F.cross_entropy(logits, targets))``.
    ``logits`` is ``[..., V]`` and ``targets`` holds the matching ids, shape ``[...]``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"expected targets of shape {list(logits.shape[:-1])} for logits "
                         f"{list(logits.shape)}, got {list(targets.shape)}")
    z = logits.double().reshape(-1, logits.shape[-1])
    top = z.max(dim=1, keepdim=True).values
    log_normaliser = top[:, 0] + (z - top).exp().sum(dim=1).log()
    log_p = z.gather(1, targets.reshape(-1, 1))[:, 0] - log_normaliser
    return math.exp(-log_p.mean().item())


@torch.no_grad()
def stream_logits(model: CharLanguageModel, ids: Tensor, n_streams: int = 16,
                  ) -> tuple[Tensor, Tensor]:
    """Run ``model`` over a long id stream cut into ``n_streams`` contiguous pieces.

    Each piece is read from its start in one pass, so every prediction (after a piece's
    first character) sees all the text before it in that piece. Returns the logits
    ``[n_streams, L - 1, V]`` and the ids they predict ``[n_streams, L - 1]``.
    """
    if ids.ndim != 1 or ids.numel() < 2 * n_streams:
        raise ValueError(f"expected a 1-D stream of at least {2 * n_streams} ids, "
                         f"got shape {list(ids.shape)}")
    length = ids.numel() // n_streams
    pieces = ids[: n_streams * length].view(n_streams, length)
    was_training = model.training
    model.eval()
    logits, _ = model(pieces[:, :-1])
    model.train(was_training)
    return logits, pieces[:, 1:]


@torch.no_grad()
def generate_chars(model: CharLanguageModel, prompt: list[int], n_chars: int,
                   temperature: float = 1.0, generator: torch.Generator | None = None,
                   ) -> list[int]:
    """Continue ``prompt`` (ids) by ``n_chars`` characters, one at a time.

    The prompt is read once; then each sampled character is fed back with the carried
    state. ``temperature`` divides the logits before the softmax (0 means greedy), with
    :func:`aimodels.gpt.sample_next`. Returns the new ids only.
    """
    from aimodels.gpt import sample_next

    if not prompt:
        raise ValueError("prompt must hold at least one id")
    was_training = model.training
    model.eval()
    logits, state = model(torch.tensor([prompt], dtype=torch.long))
    out: list[int] = []
    for _ in range(n_chars):
        nxt = sample_next(logits[:, -1], temperature, generator=generator)
        out.append(int(nxt))
        logits, state = model(nxt.view(1, 1), state)
    model.train(was_training)
    return out
