"""Chapter 3: hand-written activations, losses, back-propagation, dropout and initialisation."""

import math

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


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_with_the_same_seed_equals_torch_bit_for_bit(p, dtype):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(1), dtype=dtype)
    torch.manual_seed(123)
    reference = F.dropout(x, p, training=True)
    torch.manual_seed(123)
    ours = mlp.dropout(x, p, training=True)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.manual_seed(7)
    reference_module = torch.nn.Dropout(p)(x)
    torch.manual_seed(7)
    torch.testing.assert_close(mlp.Dropout(p)(x), reference_module, rtol=0, atol=0)


def test_dropout_scaling_given_torchs_mask_and_mask_statistics():
    p = 0.3
    x = torch.randn(200, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = F.dropout(x, p, training=True)
    kept = reference != 0
    # whatever the mask, a kept element is x / (1 - p) and a dropped one is 0
    torch.testing.assert_close(reference, torch.where(kept, x / (1 - p), torch.zeros_like(x)))
    ours = mlp.dropout(x, p, generator=torch.Generator().manual_seed(5))
    ours_kept = ours != 0
    torch.testing.assert_close(ours, torch.where(ours_kept, x / (1 - p), torch.zeros_like(x)))
    n = x.numel()
    sigma = math.sqrt(p * (1 - p) / n)  # standard deviation of the dropped fraction
    for mask in (kept, ours_kept):
        assert abs((~mask).double().mean().item() - p) < 5 * sigma
    # the expected value is preserved: mean of dropout(1) over many elements is about 1
    ones = torch.ones(n, dtype=torch.float64)
    assert mlp.dropout(ones, p).mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))


def test_dropout_is_the_identity_in_eval_mode_and_its_gradient_uses_the_mask():
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert mlp.dropout(x, 0.5, training=False) is x
    assert mlp.dropout(x, 0.0) is x
    layer = mlp.Dropout(0.5).eval()
    torch.testing.assert_close(layer(x), x)
    torch.testing.assert_close(mlp.dropout(x, 1.0), torch.zeros_like(x))
    torch.testing.assert_close(mlp.dropout(x, 1.0), F.dropout(x, 1.0))
    y = mlp.dropout(x, 0.25, generator=torch.Generator().manual_seed(0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).to(x.dtype) / 0.75)
    assert repr(mlp.Dropout(0.25)) == "Dropout(p=0.25)"
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        mlp.dropout(x, 1.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got -0.1"):
        mlp.Dropout(-0.1)


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("shape", [(256, 64), (10, 300), (16, 3, 5, 5)])
def test_xavier_uniform_equals_torch_with_the_same_generator(shape):
    ours = mlp.xavier_uniform(shape, gain=1.5, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.init.xavier_uniform_(torch.empty(shape), gain=1.5,
                                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    fan_in, fan_out = mlp.fans(shape)
    bound = mlp.xavier_uniform_bound(fan_in, fan_out, gain=1.5)
    assert bound == pytest.approx(1.5 * math.sqrt(6 / (fan_in + fan_out)), rel=1e-15)
    assert ours.abs().max().item() <= bound


@pytest.mark.parametrize("shape", [(256, 64), (10, 300), (16, 3, 5, 5)])
def test_kaiming_normal_equals_torch_with_the_same_generator(shape):
    ours = mlp.kaiming_normal(shape, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.init.kaiming_normal_(torch.empty(shape), nonlinearity="relu",
                                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    defaults = torch.nn.init.kaiming_normal_(torch.empty(shape),
                                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, defaults, rtol=0, atol=0)  # leaky_relu with a=0 is ReLU
    fan_in = mlp.fans(shape)[0]
    assert mlp.kaiming_normal_std(fan_in) == pytest.approx(math.sqrt(2 / fan_in), rel=1e-15)


def test_init_sample_statistics_and_fans():
    g = torch.Generator().manual_seed(0)
    w = mlp.xavier_uniform((400, 600), generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.var().item(), 2 / (400 + 600), rtol=0.01, atol=0)
    w = mlp.kaiming_normal((400, 600), generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.std().item(), math.sqrt(2 / 600), rtol=0.01, atol=0)
    assert mlp.fans((8, 3)) == (3, 8) and mlp.fans((16, 3, 5, 5)) == (75, 400)
    with pytest.raises(ValueError, match=r">= 2 dimensions, got \(5,\)"):
        mlp.fans((5,))
    with pytest.raises(ValueError, match="fan_in must be positive, got 0"):
        mlp.kaiming_normal_std(0)


def test_activation_variance_across_depth_follows_the_derivations():
    relu_he = mlp.activation_variances("he", "relu")
    relu_xavier = mlp.activation_variances("xavier", "relu")
    small = mlp.activation_variances("small", "tanh")
    tanh_xavier = mlp.activation_variances("xavier", "tanh")
    assert len(relu_he) == 20
    # He keeps ReLU's variance (up to a random walk: the weights are random)
    assert 0.1 < relu_he[-1] / relu_he[0] < 10
    assert relu_he[0] == pytest.approx(2 * (0.5 - 1 / (2 * math.pi)), rel=0.05)  # Var relu(N(0, 2))
    # Xavier halves ReLU's variance per layer: 2^-19 after 19 more layers
    assert 2.0**-23 < relu_xavier[-1] / relu_xavier[0] < 2.0**-15
    # N(0, 0.01²): each tanh layer multiplies the variance by about 256 * 0.01² ≈ 0.026
    assert small[-1] / small[0] == pytest.approx(0.0256**19, rel=0.5)
    assert tanh_xavier[-1] > 0.01  # shrinks slowly, not exponentially
    with pytest.raises(ValueError, match="init must be one of"):
        mlp.activation_variances("zeros", "relu")
    with pytest.raises(ValueError, match="activation must be 'tanh' or 'relu'"):
        mlp.activation_variances("he", "sigmoid")
