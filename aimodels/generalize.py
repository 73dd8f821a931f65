"""Generalisation: validation splits, capacity, early stopping and weight decay (Chapter 3).

A model is trained on one set of examples and used on others. This module holds the
small tools that measure and improve how well it does on the others:

* :func:`train_val_split` carves a validation set out of the training data, so that
  choices (capacity, epochs, penalties) never look at the test set;
* :func:`polynomial_features` and :func:`fit_polynomial` give the classic capacity
  sweep: a polynomial of growing degree fitted by least squares;
* :class:`EarlyStopping` watches the validation loss and keeps the best weights
  (Prechelt, 1998);
* :class:`SGDWeightDecay` is SGD with an L2 penalty folded into the gradient, the
  ``weight_decay`` of ``torch.optim.SGD``, and :func:`l2_penalty` is the same penalty
  written as a loss term (Krogh and Hertz, 1992);
* :func:`fit_with_validation` trains a model and records the training and validation
  loss after every epoch.

``tests/test_generalize.py`` checks each piece, and the optimiser against
``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .optim import SGD

Tensor = torch.Tensor

__all__ = [
    "EarlyStopping",
    "SGDWeightDecay",
    "fit_polynomial",
    "fit_with_validation",
    "l2_penalty",
    "polynomial_features",
    "train_val_split",
]


# --------------------------------------------------------------------------- splits
def train_val_split(
    X: Tensor, y: Tensor, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shuffle ``(X, y)`` with a seeded generator and cut off a validation part.

    Returns ``X_train, y_train, X_val, y_val``; the validation part holds
    ``round(val_fraction * n)`` examples. The test set stays untouched: it is used
    once, at the end, to report the chosen model.
    """
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y must have the same length, got {X.shape[0]} and {y.shape[0]}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = X.shape[0]
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} examples leaves an empty part")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return X[train], y[train], X[val], y[val]


# --------------------------------------------------------------------------- capacity
def polynomial_features(x: Tensor, degree: int) -> Tensor:
    r"""The columns :math:`1, x, x^2, \dots, x^d` of a 1-D input: shape ``[n, degree + 1]``."""
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of inputs, got shape {tuple(x.shape)}")
    return x.unsqueeze(1) ** torch.arange(degree + 1, dtype=x.dtype)


def fit_polynomial(x: Tensor, y: Tensor, degree: int) -> Tensor:
    r"""Least-squares coefficients :math:`c_0, \dots, c_d` of :math:`\sum_k c_k x^k`.

    Solves :math:`\min_c \lVert \Phi c - y \rVert^2` with ``torch.linalg.lstsq``, where
    :math:`\Phi` is :func:`polynomial_features`. A degree of ``len(x) - 1`` or more
    passes through every training point: zero training error, whatever the noise.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    features = polynomial_features(x, degree)
    driver = "gelsd" if x.device.type == "cpu" else None  # SVD-based: fine when d + 1 > n
    return torch.linalg.lstsq(features, y.unsqueeze(1), driver=driver).solution.squeeze(1)


# --------------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Stop training once the validation loss has not improved for ``patience`` epochs.

    Call :meth:`step` after each epoch with that epoch's validation loss; it returns
    ``True`` when training should stop. Every improvement (a loss below the best so far
    by more than ``min_delta``) saves a copy of the model's ``state_dict``, and
    :meth:`restore` loads that best copy back (Prechelt, 1998).
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best_loss = math.inf
        self.best_epoch = -1  # index of the best call to step(), counting from 0
        self.epochs_seen = 0
        self.bad_epochs = 0
        self.best_state: dict[str, Tensor] | None = None

    def step(self, val_loss: float, model: nn.Module) -> bool:
        """Record one epoch's validation loss; ``True`` means: stop now.

        A ``nan`` loss never counts as an improvement.
        """
        val_loss = float(val_loss)
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, self.epochs_seen, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        self.epochs_seen += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best weights seen so far into ``model``."""
        if self.best_state is None:
            raise RuntimeError("EarlyStopping.restore: no improvement recorded yet; call "
                               "step(val_loss, model) after each epoch first")
        model.load_state_dict(self.best_state)


# --------------------------------------------------------------------------- weight decay
def l2_penalty(parameters: Iterable[Tensor], weight_decay: float) -> Tensor:
    r"""The L2 penalty :math:`\tfrac{\lambda}{2} \sum_i \lVert \theta_i \rVert^2`.

    Its gradient is :math:`\lambda \theta`: adding it to the loss is the same as
    ``weight_decay=λ`` in ``torch.optim.SGD``, which adds :math:`\lambda\theta` to
    every gradient.
    """
    params = list(parameters)
    if not params:
        raise ValueError("l2_penalty: expected at least one parameter, got none")
    return 0.5 * weight_decay * sum((p**2).sum() for p in params)


class SGDWeightDecay(SGD):
    r"""SGD with momentum and L2 weight decay, the update of ``torch.optim.SGD``.

    .. math:: g_t = \nabla L(\theta_{t-1}) + \lambda \theta_{t-1}, \qquad
              b_t = \beta b_{t-1} + g_t, \qquad \theta_t = \theta_{t-1} - \eta b_t

    with :math:`b_1 = g_1` (no dampening, no Nesterov). With :math:`\beta = 0` it is
    :math:`\theta \leftarrow (1 - \eta\lambda)\theta - \eta \nabla L`: every step shrinks
    the weights by the factor :math:`1 - \eta\lambda`, hence "weight decay". The decay is
    one more term in the gradient; the rest is chapter 2's :class:`aimodels.optim.SGD`.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"SGDWeightDecay: expected weight_decay >= 0, got "
                             f"weight_decay={weight_decay!r}")
        super().__init__(params, lr, momentum)
        for group in self.param_groups:
            group.setdefault("weight_decay", weight_decay)

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        super().update(param, grad.add(param, alpha=group["weight_decay"]), state, group)


# --------------------------------------------------------------------------- training
@torch.no_grad()
def _evaluate(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Loss and (for class indices) accuracy of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    output = model(X)
    loss = float(loss_fn(output, y))
    accuracy = math.nan
    if output.ndim == 2 and not y.is_floating_point() and y.ndim == 1:
        accuracy = float((output.argmax(1) == y).float().mean())
    model.train(was_training)
    return loss, accuracy


def fit_with_validation(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    X_train: Tensor,
    y_train: Tensor,
    X_val: Tensor,
    y_val: Tensor,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    early_stopping: EarlyStopping | None = None,
) -> dict[str, list[float]]:
    """Minibatch training that measures the model on both sets after every epoch.

    The history holds, per epoch, ``train_loss`` and ``val_loss`` (both in eval mode,
    on the whole set, so that dropout does not inflate the training number) and
    ``val_accuracy`` (``nan`` unless the targets are class indices). With
    ``early_stopping``, training stops when it says so and the model ends with the
    best weights it saw.
    """
    if X_train.shape[0] != y_train.shape[0] or X_val.shape[0] != y_val.shape[0]:
        raise ValueError(f"each X must match its y in length, got {X_train.shape[0]} and "
                         f"{y_train.shape[0]} (train), {X_val.shape[0]} and {y_val.shape[0]} (val)")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_accuracy": []}
    model.train()
    for _ in range(epochs):
        order = torch.randperm(X_train.shape[0], generator=generator)
        for start in range(0, X_train.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(X_train[idx]), y_train[idx]).backward()
            optimizer.step()
        train_loss, _ = _evaluate(model, loss_fn, X_train, y_train)
        val_loss, val_accuracy = _evaluate(model, loss_fn, X_val, y_val)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_accuracy)
        if early_stopping is not None and early_stopping.step(val_loss, model):
            break
    if early_stopping is not None and early_stopping.best_state is not None:
        early_stopping.restore(model)
    return history
