"""Chapter 3, generalisation: splits, polynomial capacity, early stopping and weight decay."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from aimodels import generalize, optim


# --------------------------------------------------------------------------- splits
def test_train_val_split_is_a_seeded_partition():
    X = torch.arange(50, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(50)
    X_tr, y_tr, X_val, y_val = generalize.train_val_split(X, y, val_fraction=0.2, seed=3)
    assert len(X_tr) == 40 and len(X_val) == 10
    torch.testing.assert_close(X_tr.squeeze(1).long(), y_tr)  # rows stay with their labels
    assert sorted(torch.cat([y_tr, y_val]).tolist()) == list(range(50))
    again = generalize.train_val_split(X, y, val_fraction=0.2, seed=3)
    torch.testing.assert_close(again[3], y_val)
    other = generalize.train_val_split(X, y, val_fraction=0.2, seed=4)
    assert not torch.equal(other[3], y_val)


def test_train_val_split_rejects_bad_input():
    X, y = torch.zeros(10, 2), torch.zeros(10)
    with pytest.raises(ValueError, match="same length, got 10 and 9"):
        generalize.train_val_split(X, y[:9])
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        generalize.train_val_split(X, y, val_fraction=1.5)
    with pytest.raises(ValueError, match="leaves an empty part"):
        generalize.train_val_split(X, y, val_fraction=0.01)


# --------------------------------------------------------------------------- capacity
def test_polynomial_features_columns():
    x = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    expected = torch.tensor([[1, 2, 4, 8], [1, -1, 1, -1], [1, 0.5, 0.25, 0.125]],
                            dtype=torch.float64)
    torch.testing.assert_close(generalize.polynomial_features(x, 3), expected)
    with pytest.raises(ValueError, match="degree must be a non-negative int, got -1"):
        generalize.polynomial_features(x, -1)
    with pytest.raises(ValueError, match=r"1-D tensor of inputs, got shape \(3, 1\)"):
        generalize.polynomial_features(x.unsqueeze(1), 2)


@pytest.mark.parametrize("degree", [0, 1, 3, 6])
def test_fit_polynomial_matches_numpy_polyfit(degree):
    g = torch.Generator().manual_seed(degree)
    x = torch.rand(30, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    ours = generalize.fit_polynomial(x, y, degree)
    reference = np.polynomial.polynomial.polyfit(x.numpy(), y.numpy(), degree)
    torch.testing.assert_close(ours, torch.from_numpy(reference))


def test_a_polynomial_of_degree_n_minus_1_interpolates_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    coefficients = generalize.fit_polynomial(x, y, 7)
    fitted = generalize.polynomial_features(x, 7) @ coefficients
    torch.testing.assert_close(fitted, y)
    with pytest.raises(ValueError, match="same shape"):
        generalize.fit_polynomial(x, y[:5], 2)


# --------------------------------------------------------------------------- early stopping
def _model_at(value: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return model


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    losses = [1.0, 0.8, 0.6, 0.65, 0.7, 0.62, 0.9]
    stopper = generalize.EarlyStopping(patience=3)
    model = nn.Linear(1, 1)
    decisions = []
    for epoch, loss in enumerate(losses):
        with torch.no_grad():  # the weights "move" every epoch
            model.weight.fill_(float(epoch))
            model.bias.fill_(-float(epoch))
        decisions.append(stopper.step(loss, model))
    # best at epoch 2 (0.6); epochs 3, 4, 5 do not improve: stop after epoch 5
    assert decisions == [False, False, False, False, False, True, True]
    assert stopper.best_epoch == 2 and stopper.best_loss == 0.6
    stopper.restore(model)
    torch.testing.assert_close(model.weight, torch.full((1, 1), 2.0))
    torch.testing.assert_close(model.bias, torch.full((1,), -2.0))


def test_early_stopping_copies_the_weights_instead_of_aliasing_them():
    model = _model_at(1.0)
    stopper = generalize.EarlyStopping(patience=2)
    stopper.step(0.5, model)
    with torch.no_grad():
        model.weight.fill_(7.0)  # an in-place update after the best epoch
    stopper.restore(model)
    torch.testing.assert_close(model.weight, torch.ones(1, 1))


def test_early_stopping_min_delta_and_nan():
    stopper = generalize.EarlyStopping(patience=2, min_delta=0.1)
    model = _model_at(0.0)
    assert stopper.step(1.0, model) is False
    assert stopper.step(0.95, model) is False  # better, but by less than min_delta
    assert stopper.step(0.92, model) is True
    assert stopper.best_loss == 1.0 and stopper.best_epoch == 0
    nan_stopper = generalize.EarlyStopping(patience=1)
    assert nan_stopper.step(math.nan, model) is True and nan_stopper.best_state is None


def test_early_stopping_rejects_bad_settings_and_early_restore():
    with pytest.raises(ValueError, match="patience must be a positive int, got 0"):
        generalize.EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta must be a number >= 0, got -1"):
        generalize.EarlyStopping(min_delta=-1)
    with pytest.raises(RuntimeError, match="no improvement recorded yet"):
        generalize.EarlyStopping().restore(nn.Linear(1, 1))


# --------------------------------------------------------------------------- weight decay
def test_l2_penalty_gradient_is_weight_decay_times_the_weights():
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    penalty = generalize.l2_penalty([w, b], weight_decay=0.3)
    torch.testing.assert_close(penalty, 0.15 * ((w**2).sum() + (b**2).sum()))
    penalty.backward()
    torch.testing.assert_close(w.grad, 0.3 * w.detach())
    torch.testing.assert_close(b.grad, 0.3 * b.detach())
    with pytest.raises(ValueError, match="at least one parameter"):
        generalize.l2_penalty([], 0.1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.5])
def test_sgd_weight_decay_matches_torch_sgd(momentum, weight_decay):
    def ours(p):
        return generalize.SGDWeightDecay(p, lr=0.05, momentum=momentum, weight_decay=weight_decay)

    def reference(p):
        return torch.optim.SGD(p, lr=0.05, momentum=momentum, weight_decay=weight_decay)

    assert optim.max_difference_from_twin(ours, reference, steps=100) < 1e-10


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_equals_an_l2_penalty_in_the_loss(momentum):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin.load_state_dict(net.state_dict())
    decayed = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum, weight_decay=0.2)
    penalised = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        X = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randn(8, 2, generator=g, dtype=torch.float64)
        decayed.zero_grad()
        nn.functional.mse_loss(net(X), y).backward()
        decayed.step()
        penalised.zero_grad()
        loss = nn.functional.mse_loss(twin(X), y) + generalize.l2_penalty(twin.parameters(), 0.2)
        loss.backward()
        penalised.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_weight_decay_alone_shrinks_weights_by_one_minus_lr_times_lambda():
    w = torch.ones(3, requires_grad=True)
    opt = generalize.SGDWeightDecay([w], lr=0.1, weight_decay=0.5)
    for _ in range(4):
        opt.zero_grad()
        (0 * w).sum().backward()  # a zero gradient: only the decay acts
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.95**4))
    with pytest.raises(ValueError, match="expected weight_decay >= 0, got weight_decay=-0.1"):
        generalize.SGDWeightDecay([w], lr=0.1, weight_decay=-0.1)


# --------------------------------------------------------------------------- training
def _toy_classification(seed: int = 0, noise: float = 0.0):
    """A linear boundary; a fraction ``noise`` of the labels is flipped."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(120, 4, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long()
    y = torch.where(torch.rand(120, generator=g) < noise, 1 - y, y)
    return X[:80], y[:80], X[80:], y[80:]


def _train(early_stopping=None, epochs=30, noise=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    history = generalize.fit_with_validation(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
        *_toy_classification(noise=noise), epochs=epochs, batch_size=16,
        early_stopping=early_stopping)
    return model, history


def test_fit_with_validation_records_losses_and_is_reproducible():
    model, history = _train()
    assert set(history) == {"train_loss", "val_loss", "val_accuracy"}
    assert all(len(v) == 30 for v in history.values())
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_accuracy"][-1] > 0.8
    X_tr, y_tr, _, _ = _toy_classification()
    with torch.no_grad():  # the recorded training loss is the eval-mode loss on the whole set
        final = nn.functional.cross_entropy(model(X_tr), y_tr).item()
    assert final == pytest.approx(history["train_loss"][-1], rel=1e-6)
    assert _train()[1] == history


def test_fit_with_validation_stops_early_and_keeps_the_best_model():
    stopper = generalize.EarlyStopping(patience=3)
    model, history = _train(early_stopping=stopper, epochs=200, noise=0.2)
    val = history["val_loss"]
    assert len(val) < 200 and len(val) == stopper.best_epoch + 1 + 3  # 3 epochs of patience
    assert stopper.best_loss == min(val) and val.index(min(val)) == stopper.best_epoch
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stopper.best_state[name])
    _, _, X_val, y_val = _toy_classification(noise=0.2)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(X_val), y_val).item()
    assert loss == pytest.approx(stopper.best_loss, rel=1e-6)


def test_fit_with_validation_rejects_bad_input():
    model = nn.Linear(4, 2)
    X_tr, y_tr, X_val, y_val = _toy_classification()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"got 80 and 79 \(train\)"):
        generalize.fit_with_validation(model, opt, nn.CrossEntropyLoss(), X_tr, y_tr[:79],
                                       X_val, y_val, epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        generalize.fit_with_validation(model, opt, nn.CrossEntropyLoss(), X_tr, y_tr,
                                       X_val, y_val, epochs=0)
