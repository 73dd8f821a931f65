"""Chapter 3: hand-written activations, losses and back-propagation against autograd."""

import pytest
import torch
import torch.nn.functional as F

from aimodels import data, mlp, train
from aimodels.optim import Adam


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_activations_and_their_derivatives_match_torch(name):
    f, f_grad = mlp.ACTIVATIONS[name]
    z = torch.linspace(-6, 6, 101, dtype=torch.float64).requires_grad_(True)
    reference = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[name](z)
    torch.testing.assert_close(f(z), reference)
    reference.sum().backward()
    torch.testing.assert_close(f_grad(z.detach()), z.grad)


def test_stable_softmax_logsumexp_and_the_naive_failure():
    z = torch.tensor([[1000.0, 1001.0, 1002.0], [-3.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(mlp.logsumexp(z), torch.logsumexp(z, dim=-1))
    torch.testing.assert_close(mlp.softmax(z), torch.softmax(z, dim=-1))
    assert torch.isnan(mlp.naive_softmax(z)[0]).all()
    torch.testing.assert_close(mlp.naive_softmax(z[1:]), torch.softmax(z[1:], dim=-1))
    inf = torch.tensor([[-float("inf"), 0.0]])
    torch.testing.assert_close(mlp.softmax(inf), torch.softmax(inf, dim=-1))


def test_losses_match_torch_and_reject_bad_shapes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64) * 30
    targets = torch.randint(0, 5, (8,), generator=g)
    torch.testing.assert_close(mlp.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(mlp.mse_loss(a, b), F.mse_loss(a, b))
    with pytest.raises(ValueError, match=r"same shape, got \(4, 1\) and \(4,\)"):
        mlp.mse_loss(a[:, :1], b[:, 0])
    with pytest.raises(ValueError, match=r"integer class indices of shape \[8\], got torch.float32"):
        mlp.cross_entropy(logits, targets.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\], got 0..5"):
        mlp.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4, 5, 0, 0]))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("sizes", [(3, 4, 2), (7, 5, 3)])
def test_manual_backward_matches_autograd(activation, sizes):
    params = mlp.init_params(sizes, seed=1)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(6, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[2], (6,), generator=g)
    loss, cache = mlp.forward(params, X, y, activation)
    grads = mlp.backward(params, cache, activation)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    Xr = X.clone().requires_grad_(True)
    f = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
    reference = F.cross_entropy(f(Xr @ leaves["W1"].T + leaves["b1"]) @ leaves["W2"].T + leaves["b2"], y)
    torch.testing.assert_close(loss, reference)
    reference.backward()
    for name in params:
        torch.testing.assert_close(grads[name], leaves[name].grad)
    torch.testing.assert_close(grads["X"], Xr.grad)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_manual_backward_passes_gradcheck(activation):
    params = mlp.init_params((3, 4, 2), seed=0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    inputs = (X.requires_grad_(True),) + tuple(
        params[k].clone().requires_grad_(True) for k in ("W1", "b1", "W2", "b2")
    )
    assert torch.autograd.gradcheck(lambda *a: mlp.ManualMLPLoss.apply(*a, y, activation), inputs)


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    original = mlp.backward

    def off_by_a_factor(params, cache, activation="sigmoid"):
        grads = original(params, cache, activation)
        grads["W1"] = 2 * grads["W1"]
        return grads

    monkeypatch.setattr(mlp, "backward", off_by_a_factor)
    params = mlp.init_params((3, 4, 2), seed=0)
    X = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0, 1])
    inputs = (X,) + tuple(params[k].clone().requires_grad_(True) for k in ("W1", "b1", "W2", "b2"))
    from torch.autograd.gradcheck import GradcheckError

    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda *a: mlp.ManualMLPLoss.apply(*a, y), inputs)


def test_forward_rejects_bad_input():
    params = mlp.init_params((3, 4, 2))
    with pytest.raises(ValueError, match=r"expected X of shape \[batch, 3\], got \(5, 4\)"):
        mlp.forward(params, torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp.forward(params, torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.int64), "gelu")


def test_manual_training_learns_the_digits():
    d = data.digits()
    params = mlp.init_params((64, 32, 10), seed=0, dtype=torch.float32)
    history = mlp.train_manual(params, d["X_train"].flatten(1), d["y_train"], lr=0.5, epochs=15, batch_size=32)
    assert history[-1] < history[0] / 5
    assert (mlp.predict(params, d["X_test"].flatten(1)) == d["y_test"]).float().mean() > 0.9


def test_fit_is_reproducible_and_accuracy_is_computed():
    d = data.digits()
    X, y = d["X_train"].flatten(1), d["y_train"]
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        hist = train.fit(model, Adam(model.parameters(), lr=1e-2), torch.nn.CrossEntropyLoss(), X, y, epochs=3)
        results.append((hist, train.accuracy(model, d["X_test"].flatten(1), d["y_test"])))
    assert results[0] == results[1]
    assert results[0][0]["loss"][-1] < results[0][0]["loss"][0]
    assert results[0][1] > 0.85
    with pytest.raises(ValueError, match="same length, got 1437 and 3"):
        train.fit(model, Adam(model.parameters(), lr=1e-2), torch.nn.CrossEntropyLoss(), X, y[:3], epochs=1)


def test_digits_shapes_and_split():
    d8 = data.digits()
    assert d8["X_train"].shape == (1437, 1, 8, 8) and d8["X_test"].shape == (360, 1, 8, 8)
    assert float(d8["X_train"].max()) == 1.0 and float(d8["X_train"].min()) == 0.0
    assert torch.bincount(d8["y_test"]).min() >= 35  # stratified: every class is there
    d32 = data.digits(size=32)
    assert d32["X_train"].shape == (1437, 1, 32, 32)
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        data.digits(size=4)
