"""Chapter 5: our RNN against nn.RNN, gradients through time, and the forecasting data."""

import math

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


# --------------------------------------------------------------------------- AR baseline
def _ar_process(phi, n=3000, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros(n)
    for t in range(len(phi), n):
        y[t] = 0.3 + sum(p * y[t - 1 - i] for i, p in enumerate(phi)) + noise * rng.standard_normal()
    return y


def test_fit_autoregression_matches_numpy_lstsq_and_the_normal_equations():
    w = data.forecasting_windows(data.seasonal_series(600, period=12, seed=3), window=20)
    for p in (1, 5, 20):
        coef = rnn.fit_autoregression(w["X_train"], w["y_train"], p)
        assert coef.shape == (p + 1, 1) and coef.dtype == torch.float64
        A = np.concatenate([w["X_train"][:, -p:, 0].double().numpy(),
                            np.ones((len(w["X_train"]), 1))], axis=1)
        b = w["y_train"].double().numpy()
        reference = np.linalg.lstsq(A, b, rcond=None)[0]
        torch.testing.assert_close(coef, torch.from_numpy(reference))
        normal = np.linalg.solve(A.T @ A, A.T @ b)  # (A^T A) w = A^T b
        torch.testing.assert_close(coef, torch.from_numpy(normal), rtol=1e-6, atol=1e-8)
        prediction = rnn.predict_autoregression(coef, w["X_test"])
        assert prediction.shape == w["y_test"].shape and prediction.dtype == torch.float32
        torch.testing.assert_close(prediction.double(), torch.from_numpy(
            np.concatenate([w["X_test"][:, -p:, 0].double().numpy(),
                            np.ones((len(w["X_test"]), 1))], axis=1) @ reference))


def test_fit_autoregression_recovers_known_coefficients():
    phi = (0.6, -0.3, 0.2)  # y_t = 0.3 + 0.6 y_(t-1) - 0.3 y_(t-2) + 0.2 y_(t-3) + noise
    w = data.forecasting_windows(_ar_process(phi, n=20_000), window=3, test_fraction=0.1)
    coef = rnn.fit_autoregression(w["X_train"][:, :, 0], w["y_train"][:, 0], 3)
    assert coef.shape == (4,)
    expected = torch.tensor([phi[2], phi[1], phi[0], 0.3], dtype=torch.float64)  # oldest first
    torch.testing.assert_close(coef, expected, atol=0.02, rtol=0)


def test_direct_fit_solves_each_horizon_like_a_separate_fit():
    m = data.multistep_windows(data.seasonal_series(800, period=12, seed=1), 24, horizon=5)
    joint = rnn.fit_autoregression(m["X_train"], m["Y_train"], 12)
    assert joint.shape == (13, 5)
    for k in range(5):
        torch.testing.assert_close(joint[:, k],
                                   rnn.fit_autoregression(m["X_train"], m["Y_train"][:, k], 12))


def test_autoregression_checks_its_inputs():
    x = torch.randn(10, 6, 1)
    with pytest.raises(ValueError, match=r"p must be an int in \[1, window = 6\], got 7"):
        rnn.fit_autoregression(x, torch.randn(10), 7)
    with pytest.raises(ValueError, match=r"expected targets of shape \[n\] or \[n, k\] with n = 10"):
        rnn.fit_autoregression(x, torch.randn(9), 2)
    with pytest.raises(ValueError, match=r"expected windows of shape \[n, window\]"):
        rnn.fit_autoregression(torch.randn(10, 6, 2), torch.randn(10), 2)


def test_recursive_forecast_continues_a_sinusoid_exactly_with_its_exact_recurrence():
    # cos(w (t+1)) = 2 cos(w) cos(w t) - cos(w (t-1)): an exact AR(2) without intercept.
    omega, t = 0.3, torch.arange(40, dtype=torch.float64)
    wave = torch.cos(omega * t)
    coef = torch.tensor([-1.0, 2 * math.cos(omega), 0.0], dtype=torch.float64)
    windows = wave[:10].view(1, 10)
    forecast = rnn.recursive_forecast(lambda w: rnn.predict_autoregression(coef, w), windows, 30)
    assert forecast.shape == (1, 30)
    torch.testing.assert_close(forecast[0], wave[10:])
    # The same with windows [n, w, 1] and a step returning [n, 1], as SequenceRegressor does.
    three_d = rnn.recursive_forecast(lambda w: rnn.predict_autoregression(coef, w)[:, None],
                                     windows[:, :, None], 30)
    torch.testing.assert_close(three_d, forecast)


def test_recursive_forecast_feeds_its_own_predictions_back():
    seen = []

    def step(w):
        seen.append(w.clone())
        return w[:, -1] + 1.0  # "next = last + 1"

    windows = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    out = rnn.recursive_forecast(step, windows, 3)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]))
    torch.testing.assert_close(seen[2], torch.tensor([[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]))
    torch.testing.assert_close(rnn.recursive_forecast(step, windows, 1)[:, 0], step(windows))
    with pytest.raises(ValueError, match="one forecast per window"):
        rnn.recursive_forecast(lambda w: w, windows, 2)
    with pytest.raises(ValueError, match="horizon must be a positive int"):
        rnn.recursive_forecast(step, windows, 0)


# --------------------------------------------------------------------------- more data
def test_multistep_windows_split_in_time_without_shared_targets():
    series = np.arange(200, dtype=np.float64)  # value = index, so positions are visible
    m = data.multistep_windows(series, window=10, horizon=4, test_fraction=0.25)
    assert m["X_train"].shape[1:] == (10, 1) and m["Y_train"].shape[1] == 4
    torch.testing.assert_close(m["X_train"][7, :, 0], torch.arange(7, 17, dtype=torch.float32))
    torch.testing.assert_close(m["Y_train"][7], torch.arange(17, 21, dtype=torch.float32))
    assert m["Y_train"].max() < m["Y_test"].min()  # no training target is a test target
    assert m["Y_train"].max() + 1 == m["Y_test"].min()  # and no more is dropped than needed
    one = data.multistep_windows(series, window=10, horizon=1, test_fraction=0.25)
    ref = data.forecasting_windows(series, window=10, test_fraction=0.25)
    torch.testing.assert_close(one["X_test"], ref["X_test"])
    torch.testing.assert_close(one["Y_test"], ref["y_test"])
    torch.testing.assert_close(one["Y_train"], ref["y_train"])
    with pytest.raises(ValueError, match="longer than window \\+ horizon"):
        data.multistep_windows(series[:12], window=10, horizon=4)


def test_logistic_map_follows_its_recursion_and_is_linearly_unpredictable():
    x = data.logistic_map_series(3000, r=4.0, x0=0.2)
    np.testing.assert_allclose(x[1:], 4.0 * x[:-1] * (1 - x[:-1]), rtol=0, atol=1e-15)
    assert 0 <= x.min() and x.max() <= 1 and x[-200:].std() > 0.2  # not stuck at a fixed point
    for lag in (1, 2, 3):
        assert abs(np.corrcoef(x[:-lag], x[lag:])[0, 1]) < 0.05
    np.testing.assert_array_equal(x, data.logistic_map_series(3000))
    noisy = data.logistic_map_series(3000, noise=0.01, seed=1)
    assert 0.005 < np.std(noisy - x) < 0.015
    with pytest.raises(ValueError, match=r"r must be in \(0, 4\]"):
        data.logistic_map_series(r=4.5)


# --------------------------------------------------------------------------- language model
def test_perplexity_by_hand_equals_exp_cross_entropy():
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 50.0):  # large logits: the max is subtracted before exp
        logits = scale * torch.randn(3, 7, 11, generator=g)
        targets = torch.randint(0, 11, (3, 7), generator=g)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(),
                                                     targets.flatten()).exp().item()
        assert rnn.perplexity(logits, targets) == pytest.approx(expected, rel=1e-9)
    uniform = torch.zeros(5, 40)
    assert rnn.perplexity(uniform, torch.arange(5)) == pytest.approx(40.0)  # branching factor
    with pytest.raises(ValueError, match="expected targets of shape"):
        rnn.perplexity(uniform, torch.arange(4))


@pytest.mark.parametrize("cell", ["scratch", "gru", "lstm"])
def test_char_language_model_carries_its_state_across_calls(cell):
    torch.manual_seed(0)
    model = rnn.CharLanguageModel(20, embed_dim=8, hidden_size=12, cell=cell).double()
    ids = torch.randint(0, 20, (3, 9))
    whole, _ = model(ids)
    assert whole.shape == (3, 9, 20)
    first, state = model(ids[:, :4])
    rest, _ = model(ids[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)
    with pytest.raises(ValueError, match=r"expected int64 ids of shape \[batch, time\]"):
        model(ids.float())


def test_stream_logits_cut_the_stream_and_shift_the_targets():
    torch.manual_seed(0)
    model = rnn.CharLanguageModel(10, embed_dim=4, hidden_size=6)
    ids = torch.randint(0, 10, (103,))
    logits, targets = rnn.stream_logits(model, ids, n_streams=4)  # 4 pieces of 25
    assert logits.shape == (4, 24, 10) and targets.shape == (4, 24)
    torch.testing.assert_close(targets[1], ids[26:50])
    with torch.no_grad():
        torch.testing.assert_close(logits[2], model(ids[50:74].view(1, -1))[0][0])


def test_generate_chars_greedy_is_the_argmax_loop_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = rnn.CharLanguageModel(10, embed_dim=4, hidden_size=6)
    prompt = [1, 2, 3]
    greedy = rnn.generate_chars(model, prompt, 6, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # re-reading the whole text each time: same answer, slower
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert greedy == ids[3:]
    a = rnn.generate_chars(model, prompt, 20, 1.0, torch.Generator().manual_seed(5))
    b = rnn.generate_chars(model, prompt, 20, 1.0, torch.Generator().manual_seed(5))
    assert a == b and len(a) == 20 and all(0 <= i < 10 for i in a)
    with pytest.raises(ValueError, match="prompt must hold at least one id"):
        rnn.generate_chars(model, [], 3)
