"""Chapter 5: our RNN against nn.RNN, gradients through time, and the forecasting data."""

import numpy as np
import pytest
import torch
from torch import nn

from aimodels import data, rnn


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_rnn_matches_nn_rnn(num_layers, batch_first, with_h0):
    torch.manual_seed(num_layers)
    reference = nn.RNN(3, 5, num_layers=num_layers, batch_first=batch_first).double()
    ours = rnn.RNN(3, 5, num_layers=num_layers, batch_first=batch_first).double()
    ours.load_state_dict(reference.state_dict())  # strict: same names and shapes
    x = torch.randn((4, 7, 3) if batch_first else (7, 4, 3), dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(num_layers, 4, 5, dtype=torch.float64) if with_h0 else None
    out, h_n = ours(x, h0)
    ref_out, ref_h_n = reference(x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_h_n)
    ours_grads = torch.autograd.grad((out.sum() + h_n.square().sum()), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad((ref_out.sum() + ref_h_n.square().sum()), [x, *reference.parameters()])
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dicts_load_both_ways_and_initialisation_is_nn_rnns():
    torch.manual_seed(0)
    ours = rnn.RNN(2, 4, num_layers=2)
    torch.manual_seed(0)
    reference = nn.RNN(2, 4, num_layers=2, batch_first=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} initialised differently")
    fresh = nn.RNN(2, 4, num_layers=2, batch_first=True)
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 2)
    torch.testing.assert_close(fresh(x)[0], ours(x)[0])


def test_initial_state_follows_the_batch_and_is_checked():
    model = rnn.RNN(1, 8, num_layers=2)
    for batch in (1, 3, 64):
        out, h_n = model(torch.randn(batch, 5, 1))
        assert out.shape == (batch, 5, 8) and h_n.shape == (2, batch, 8)
    with pytest.raises(ValueError, match=r"expected h0 of shape \[num_layers, batch, hidden_size\] = \[2, 3, 8\] for this input, got \[2, 1, 8\]"):
        model(torch.randn(3, 5, 1), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, time, features\] with features = 1, got \[3, 5\]"):
        model(torch.randn(3, 5))
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        rnn.RNN(1, 0)


@pytest.mark.parametrize("cell", ["scratch", "rnn", "lstm", "gru"])
def test_sequence_regressor_works_for_any_batch_size(cell):
    model = rnn.SequenceRegressor(cell, hidden_size=6)
    for batch in (1, 7):
        assert model(torch.randn(batch, 10, 1)).shape == (batch, 1)
    with pytest.raises(ValueError, match="cell must be one of"):
        rnn.SequenceRegressor("transformer")


def test_gradient_norms_shrink_or_grow_geometrically():
    torch.manual_seed(0)
    hidden = 16
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))
    x = 1e-4 * torch.randn(2, 30, 1, dtype=torch.float64)  # tiny inputs: tanh is nearly linear
    for gamma in (0.5, 1.2):
        model = rnn.RNN(1, hidden).double()
        with torch.no_grad():
            model.weight_hh_l0.copy_(gamma * q)
            model.bias_ih_l0.zero_()
            model.bias_hh_l0.zero_()
        norms = rnn.gradient_norms_through_time(model, x)
        assert norms.shape == (30,)
        ratios = norms[:-1] / norms[1:]  # one step further back multiplies by gamma
        torch.testing.assert_close(ratios, torch.full_like(ratios, gamma), rtol=1e-3, atol=0)


def test_seasonal_series_and_windows_do_not_leak_the_future():
    series = data.seasonal_series(500, period=12, noise=0.0, seed=1)
    assert series.shape == (500,)
    np.testing.assert_allclose(series[:12], data.seasonal_series(500, 12, 0.0, 2)[:12])
    w = data.forecasting_windows(series, window=20, test_fraction=0.25)
    n = len(series) - 20
    assert len(w["y_train"]) + len(w["y_test"]) == n
    assert w["X_train"].shape == (len(w["y_train"]), 20, 1) and w["y_train"].shape[1] == 1
    # Window i holds series[i:i+20] and its target is series[i+20].
    torch.testing.assert_close(w["X_train"][5, :, 0], torch.tensor(series[5:25], dtype=torch.float32))
    assert w["y_train"][5, 0].item() == pytest.approx(series[25], abs=1e-6)
    first_test_target = w["y_test"][0, 0].item()
    assert first_test_target == pytest.approx(series[20 + len(w["y_train"])], abs=1e-6)
    with pytest.raises(ValueError, match="longer than window"):
        data.forecasting_windows(series[:10], window=20)
    with pytest.raises(ValueError, match="period must be an int >= 2"):
        data.seasonal_series(period=1)
