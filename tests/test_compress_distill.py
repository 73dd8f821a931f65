"""Tests for aimodels.compress.distill: the distillation loss and the training loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aimodels.compress.distill import distill, distillation_loss, train_hard
from aimodels.data import digits
from aimodels.train import accuracy


def _logits(seed: int = 0, n: int = 6, classes: int = 5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, classes, generator=g, dtype=dtype) * 3
    teacher = torch.randn(n, classes, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, classes, (n,), generator=g)
    return student, teacher, targets


def _direct(student, teacher, targets, T, alpha):
    """The same loss written out: explicit sums of p (log p - log q), an explicit CE."""
    p = torch.softmax(teacher / T, dim=1)
    log_p = torch.log_softmax(teacher / T, dim=1)
    log_q = torch.log_softmax(student / T, dim=1)
    n = student.shape[0]
    kl = sum((p[i] * (log_p[i] - log_q[i])).sum() for i in range(n)) / n
    log_probs = torch.log_softmax(student, dim=1)
    ce = -sum(log_probs[i, targets[i]] for i in range(n)) / n
    return alpha * T**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 0.9), (0.5, 0.7)])
def test_loss_equals_direct_computation(T, alpha):
    student, teacher, targets = _logits()
    expected, _, _ = _direct(student, teacher, targets, T, alpha)
    torch.testing.assert_close(distillation_loss(student, teacher, targets, T, alpha), expected)


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_scaled_kl():
    student, teacher, targets = _logits(seed=1)
    _, kl, ce = _direct(student, teacher, targets, 3.0, 0.0)
    torch.testing.assert_close(distillation_loss(student, teacher, targets, 3.0, 0.0), ce)
    torch.testing.assert_close(
        distillation_loss(student, teacher, targets, 3.0, 0.0),
        nn.functional.cross_entropy(student, targets))
    torch.testing.assert_close(distillation_loss(student, teacher, targets, 3.0, 1.0), 9.0 * kl)


def test_soft_term_is_zero_when_student_matches_teacher():
    _, teacher, targets = _logits(seed=2)
    loss = distillation_loss(teacher.clone(), teacher, targets, temperature=5.0, alpha=1.0)
    torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("T", [1.0, 2.5, 8.0])
def test_gradcheck_with_respect_to_student_logits(T):
    student, teacher, targets = _logits(seed=3)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(s, teacher, targets, temperature=T, alpha=0.6), (student,))


def test_gradient_of_soft_term_matches_formula():
    # d(T^2 KL)/dz = T (q - p) / n: the T^2 factor undoes the 1/T of the softmax.
    student, teacher, targets = _logits(seed=4)
    student.requires_grad_(True)
    T = 4.0
    distillation_loss(student, teacher, targets, T, alpha=1.0).backward()
    q, p = torch.softmax(student.detach() / T, 1), torch.softmax(teacher / T, 1)
    torch.testing.assert_close(student.grad, T * (q - p) / len(student))


def test_teacher_gets_no_gradient():
    student, teacher, targets = _logits(seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, targets, 2.0, 0.5).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_loss_validates_its_arguments():
    student, teacher, targets = _logits()
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        distillation_loss(student, teacher, targets, temperature=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        distillation_loss(student, teacher, targets, alpha=1.5)
    with pytest.raises(TypeError, match="alpha must be a real number, got str"):
        distillation_loss(student, teacher, targets, alpha="0.5")
    with pytest.raises(ValueError, match=r"teacher_logits must have the student's shape \[6, 5\], got \[6, 4\]"):
        distillation_loss(student, teacher[:, :4], targets)
    with pytest.raises(ValueError, match=r"student_logits must have shape \[batch, classes\]"):
        distillation_loss(student[0], teacher[0], targets[:1])
    with pytest.raises(ValueError, match=r"targets must have shape \[6\]"):
        distillation_loss(student, teacher, targets[:3])
    with pytest.raises(TypeError, match="targets must be int64 class indices, got torch.float64"):
        distillation_loss(student, teacher, targets.double())
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 5\)"):
        distillation_loss(student, teacher, targets + 5)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor, got list"):
        distillation_loss([[0.0, 1.0]], teacher, targets)


# --------------------------------------------------------------------------- training loops
def _mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def flat_digits():
    data = digits()
    return {key: value.reshape(len(value), -1) if key.startswith("X") else value
            for key, value in data.items()}


@pytest.fixture(scope="module")
def teacher(flat_digits):
    model = _mlp(256, seed=0)
    history = train_hard(model, flat_digits["X_train"], flat_digits["y_train"], epochs=15,
                         batch_size=64, lr=3e-3, seed=0)
    assert history["loss"][-1] < history["loss"][0]
    return model


def test_teacher_trains_to_high_accuracy(teacher, flat_digits):
    assert not teacher.training
    assert accuracy(teacher, flat_digits["X_test"], flat_digits["y_test"]) >= 0.95


def test_student_distils_to_reasonable_accuracy(teacher, flat_digits):
    student = _mlp(16, seed=1)
    before = [p.detach().clone() for p in teacher.parameters()]
    teacher.train()
    history = distill(student, teacher, flat_digits["X_train"], flat_digits["y_train"],
                      epochs=15, batch_size=64, lr=3e-3, temperature=4.0, alpha=0.7, seed=0)
    assert teacher.training  # the teacher's mode is restored
    teacher.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert len(history["loss"]) == 15
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert accuracy(student, flat_digits["X_test"], flat_digits["y_test"]) >= 0.88


def test_distill_with_alpha_zero_is_train_hard(teacher, flat_digits):
    # Same loop, same seed: with alpha = 0 the distillation loss is the cross-entropy.
    X, y = flat_digits["X_train"][:300], flat_digits["y_train"][:300]
    a, b = _mlp(8, seed=2), _mlp(8, seed=2)
    ha = distill(a, teacher, X, y, epochs=2, batch_size=50, lr=1e-2, temperature=3.0,
                 alpha=0.0, seed=7)
    hb = train_hard(b, X, y, epochs=2, batch_size=50, lr=1e-2, seed=7)
    assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_training_validates_its_arguments(teacher, flat_digits):
    X, y = flat_digits["X_train"][:10], flat_digits["y_train"][:10]
    student = _mlp(4, seed=0)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        train_hard(student, X, y, epochs=0, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="X and y must hold the same number"):
        train_hard(student, X, y[:5], epochs=1, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        train_hard(student, X, y.float(), epochs=1, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train_hard(student, X, y, epochs=1, batch_size=4, lr=-1.0, seed=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distill(student, teacher, X, y, epochs=1, batch_size=4, lr=1e-3, temperature=2.0,
                alpha=-0.1, seed=0)
    with pytest.raises(TypeError, match="teacher must be an nn.Module, got str"):
        distill(student, "teacher", X, y, epochs=1, batch_size=4, lr=1e-3, temperature=2.0,
                alpha=0.5, seed=0)
