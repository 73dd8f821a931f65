r"""Knowledge distillation: a small student learns from a large teacher (Chapter 11).

**The idea.** A trained classifier knows more than its top answer. Its probabilities over
the wrong classes say which mistakes are plausible: a "7" that looks a little like a "1".
Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network"
(arXiv:1503.02531), train a small *student* to match these *soft targets* of a large
*teacher*, as well as the true labels. The student then learns the teacher's notion of
similarity between classes, which one-hot labels cannot give it.

**Temperature.** A confident teacher puts almost all its mass on one class, so the soft
targets carry little. Dividing the logits :math:`v` (teacher) and :math:`z` (student) by
a temperature :math:`T > 1` before the softmax flattens both distributions:

.. math::

    p_i = \frac{e^{v_i / T}}{\sum_j e^{v_j / T}}, \qquad
    q_i = \frac{e^{z_i / T}}{\sum_j e^{z_j / T}}.

**The loss.** With :math:`\alpha \in [0, 1]` weighing the two terms,

.. math::

    L = \alpha\, T^2\, \mathrm{KL}(p \,\|\, q) + (1 - \alpha)\, \mathrm{CE}(z, y),
    \qquad \mathrm{KL}(p \,\|\, q) = \sum_i p_i (\log p_i - \log q_i),

with the KL divergence summed over classes and averaged over the batch (PyTorch's
``reduction="batchmean"``, the true mean KL per example) and the cross-entropy with the
hard labels :math:`y` computed at :math:`T = 1`, averaged over the batch.

**Why** :math:`T^2`. The gradient of the soft term with respect to a student logit is
:math:`\partial\,\mathrm{KL} / \partial z_i = (q_i - p_i) / T`. For large :math:`T`,
:math:`q_i \approx (1 + z_i / T) / C` and likewise for :math:`p_i`, so (with zero-mean
logits) the gradient is about :math:`(z_i - v_i) / (C\,T^2)`: it shrinks as
:math:`1 / T^2`. Multiplying by :math:`T^2` keeps the soft term's share of the gradient
roughly the same whatever temperature is chosen, so :math:`\alpha` means the same thing
at :math:`T = 2` and at :math:`T = 8`.

**The teacher is fixed.** Its logits are detached inside :func:`distillation_loss`, so
no gradient ever flows into the teacher, even if the caller forgot ``torch.no_grad()``.
:func:`distill` computes them once, with the teacher in eval mode under ``no_grad``.

**A fair comparison.** :func:`distill` and :func:`train_hard` run the *same* loop
(Adam, the same shuffling from ``seed``, the same batches); only the loss differs. So a
difference in the student's accuracy comes from the soft targets and nothing else.

========================= ==============================================================
name                      what it does
========================= ==============================================================
:func:`distillation_loss` :math:`\alpha T^2 \mathrm{KL}(p\|q) + (1-\alpha)\mathrm{CE}(z, y)`
:func:`distill`           train a student on a teacher's soft targets and the labels
:func:`train_hard`        train the same way on the labels alone (the baseline)
========================= ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor

__all__ = ["distill", "distillation_loss", "train_hard"]


# --------------------------------------------------------------------------- the loss
def _check_positive_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_logits_and_targets(student_logits: Tensor, teacher_logits: Tensor,
                              targets: Tensor) -> None:
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                        ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, "
                        f"got {student_logits.dtype}")
    if not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, "
                        f"got {teacher_logits.dtype}")
    if student_logits.ndim != 2 or student_logits.shape[0] == 0 or student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must have shape [batch, classes] with batch >= 1 and "
                         f"classes >= 2, got {list(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the student's shape "
                         f"{list(student_logits.shape)}, got {list(teacher_logits.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 class indices, got {targets.dtype}")
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must have shape [{student_logits.shape[0]}] (one class per "
                         f"example), got {list(targets.shape)}")
    classes = student_logits.shape[1]
    if int(targets.min()) < 0 or int(targets.max()) >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}), got values from "
                         f"{int(targets.min())} to {int(targets.max())}")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> Tensor:
    r"""Hinton et al.'s loss :math:`\alpha T^2 \mathrm{KL}(p\|q) + (1-\alpha)\mathrm{CE}(z, y)`.

    ``student_logits`` and ``teacher_logits`` are ``[batch, classes]``; ``targets`` holds
    the int64 class of each example. :math:`p = \mathrm{softmax}(v / T)` are the
    teacher's soft targets and :math:`q = \mathrm{softmax}(z / T)` the student's; the KL
    divergence is summed over classes and averaged over the batch; the cross-entropy with
    the hard labels uses the raw logits (:math:`T = 1`) and is averaged over the batch.
    ``alpha = 0`` gives plain cross-entropy, ``alpha = 1`` pure distillation.

    The teacher's logits are detached: the loss never sends a gradient to the teacher.
    """
    _check_logits_and_targets(student_logits, teacher_logits, targets)
    t = _check_positive_real("temperature", temperature)
    a = _check_alpha(alpha)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = sum_i p_i (log p_i - log q_i);
    # "batchmean" sums over classes and divides by the batch size.
    soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, targets)
    return a * t * t * soft + (1.0 - a) * hard


# --------------------------------------------------------------------------- training
def _check_data(model: object, X: object, y: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(X, Tensor) or not X.is_floating_point() or X.ndim < 1:
        got = f"{X.dtype} tensor" if isinstance(X, Tensor) else type(X).__name__
        raise TypeError(f"X must be a floating-point tensor [n, ...], got {got}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.ndim != 1:
        got = (f"{y.dtype} tensor of shape {list(y.shape)}" if isinstance(y, Tensor)
               else type(y).__name__)
        raise TypeError(f"y must be an int64 tensor [n] of class indices, got {got}")
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must hold the same number (>= 1) of examples, "
                         f"got {len(X)} and {len(y)}")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _fit(student: nn.Module, X: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
         *, epochs: int, batch_size: int, lr: float, seed: int,
         weight_decay: float) -> dict[str, list[float]]:
    """The one training loop behind :func:`distill` and :func:`train_hard`.

    ``loss_fn(logits, idx)`` gets the student's logits for the examples ``idx`` of the
    current batch. Each epoch visits every example once in an order drawn from ``seed``;
    the last batch may be smaller. Returns ``{"loss": [mean loss of each epoch]}``.
    """
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    lr = _check_positive_real("lr", lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": []}
    student.train()
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(X), generator=generator).split(batch_size):
            idx = idx.to(X.device)
            optimizer.zero_grad()
            loss = loss_fn(student(X[idx]), idx)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        history["loss"].append(total / len(X))
    student.eval()
    return history


def distill(student: nn.Module, teacher: nn.Module, X: Tensor, y: Tensor, *, epochs: int,
            batch_size: int, lr: float, temperature: float, alpha: float, seed: int,
            weight_decay: float = 0.0) -> dict[str, list[float]]:
    """Train ``student`` (in place) with :func:`distillation_loss` against ``teacher``.

    ``X`` holds the inputs ``[n, ...]`` and ``y`` the int64 labels ``[n]``. The teacher's
    logits on all of ``X`` are computed once, in eval mode under ``torch.no_grad()`` (the
    data are not augmented, so they would be the same at every epoch); the teacher's
    train/eval mode is restored afterwards. Adam with learning rate ``lr`` and
    ``weight_decay``; mini-batches of ``batch_size`` (``batch_size >= len(X)`` is
    full-batch training), shuffled by a generator seeded with ``seed``. The seed does
    not touch the student's initial weights, which the caller chose. The student is left
    in eval mode.

    Returns the history ``{"loss": [mean distillation loss of each epoch]}``.
    """
    _check_data(student, X, y)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    temperature = _check_positive_real("temperature", temperature)
    alpha = _check_alpha(alpha)
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(X)
    teacher.train(was_training)
    if teacher_logits.ndim != 2 or len(teacher_logits) != len(X):
        raise ValueError(f"the teacher must map X to logits [n, classes] with n = {len(X)}, "
                         f"got shape {list(teacher_logits.shape)}")

    def loss_fn(logits: Tensor, idx: Tensor) -> Tensor:
        return distillation_loss(logits, teacher_logits[idx], y[idx], temperature, alpha)

    return _fit(student, X, y, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, weight_decay=weight_decay)


def train_hard(student: nn.Module, X: Tensor, y: Tensor, *, epochs: int, batch_size: int,
               lr: float, seed: int, weight_decay: float = 0.0) -> dict[str, list[float]]:
    """Train ``student`` (in place) on the labels alone: the baseline for :func:`distill`.

    The same loop as :func:`distill` (same optimiser, batches and shuffling for the same
    ``seed``) with the plain cross-entropy loss. Also the way to train the teacher.
    Returns ``{"loss": [mean cross-entropy of each epoch]}``.
    """
    _check_data(student, X, y)

    def loss_fn(logits: Tensor, idx: Tensor) -> Tensor:
        return F.cross_entropy(logits, y[idx])

    return _fit(student, X, y, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, weight_decay=weight_decay)
