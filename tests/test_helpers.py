"""Unit tests of the small shared modules: train, display, plot, cnn, data, exercises."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from aimodels import cnn, data, display, exercises, optim, plot, scaling, train  # noqa: E402


def test_seed_everything_makes_runs_repeatable():
    train.seed_everything(3)
    a = (torch.rand(3), np.random.rand(2))
    train.seed_everything(3)
    b = (torch.rand(3), np.random.rand(2))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="got -1"):
        train.seed_everything(-1)


def test_device_and_timer():
    assert isinstance(train.device(), torch.device)
    with train.Timer() as t:
        sum(range(10_000))
    assert t.seconds > 0


def test_show_source_renders_the_package_code():
    md = display.show_source(scaling.training_flops)
    text = md.data
    assert text.startswith("`aimodels/scaling.py`, line ")
    assert "def training_flops(" in text and "```python" in text
    with pytest.raises(TypeError, match="expects a function, class or method"):
        display.show_source(42)


def test_lenet5_shapes_and_clear_error():
    model = cnn.LeNet5()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert cnn.LeNet5(in_channels=3, num_classes=5)(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"expects images of shape \[batch, 1, 32, 32\], got \(2, 1, 28, 28\)"):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        cnn.LeNet5(num_classes=1)


def test_diabetes_is_offline_standardised_and_split():
    d = data.diabetes_regression()
    assert d["X_train"].shape == (353, 10) and d["X_test"].shape == (89, 10)
    np.testing.assert_allclose(d["X_train"].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(d["y_train"].std(), 1, atol=1e-12)
    with pytest.raises(ValueError, match="test_fraction"):
        data.diabetes_regression(test_fraction=1.5)


def test_plots_label_their_axes():
    ax = plot.contour_paths(optim.rosenbrock, {"p": np.array([[0, 0], [1, 1]])}, (-2, 2), (-1, 3))
    assert ax.get_xlabel() and ax.get_ylabel()
    ax = plot.curves({"a": ([0, 1], [1, 0.1])}, "step", "loss")
    assert ax.get_xlabel() == "step" and ax.get_yscale() == "log"
    ax = plot.box_diagram({"a": (0, 0, "A"), "b": (3, 0, "B")}, [("a", "b", "call")])
    assert {"A", "B", "call"} <= {t.get_text() for t in ax.texts}
    with pytest.raises(KeyError, match="'c'"):
        plot.box_diagram({"a": (0, 0, "A")}, [("a", "c", "")])
    plt.close("all")


def test_number_checkers_accept_right_and_hint_on_slips(capsys):
    assert exercises.check_weights_gb(14, 3.5)
    assert not exercises.check_weights_gb(28, 3.5)
    assert "float32" in capsys.readouterr().out
    assert exercises.check_max_stable_lr(0.5)
    assert not exercises.check_max_stable_lr(0.25)
    assert "1/L" in capsys.readouterr().out
    days = scaling.training_days(scaling.training_flops(7e9, 140e9), 256 * 312e12, 0.4)
    assert exercises.check_training_days(days)
    assert not exercises.check_training_days(days * 24)
    assert "hours" in capsys.readouterr().out
    assert exercises.check_adam_first_step(0.01)
    assert not exercises.check_adam_first_step(0.0316227766)
    assert "bias correction" in capsys.readouterr().out
    with pytest.raises(TypeError, match="expected a number, got str"):
        exercises.check_max_stable_lr("0.5")


def test_code_checkers():
    def right(sizes):
        return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))

    def no_bias(sizes):
        return sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))

    assert exercises.check_mlp_parameters(right)
    assert not exercises.check_mlp_parameters(no_bias)

    class AdaGrad(optim.ScratchOptimizer):
        def __init__(self, params, lr, eps=1e-10):
            super().__init__(params, {"lr": lr, "eps": eps})

        def update(self, param, grad, state, group):
            state.setdefault("sum", torch.zeros_like(param)).addcmul_(grad, grad)
            param.addcdiv_(grad, state["sum"].sqrt().add_(group["eps"]), value=-group["lr"])

    assert exercises.check_adagrad(AdaGrad)
    class NoSquare(AdaGrad):
        def update(self, param, grad, state, group):
            state.setdefault("sum", torch.zeros_like(param)).add_(grad.abs())
            param.addcdiv_(grad, state["sum"].add(group["eps"]), value=-group["lr"])

    assert not exercises.check_adagrad(NoSquare)


def test_chapter3_checkers(capsys):
    import math

    def right(z, y):
        return (torch.softmax(z, 1) - torch.nn.functional.one_hot(y, z.shape[1])) / z.shape[0]

    assert exercises.check_ce_grad(right)
    assert not exercises.check_ce_grad(lambda z, y: right(z, y) * z.shape[0])
    assert "mean" in capsys.readouterr().out
    assert exercises.check_double_softmax_floor(math.log(math.e + 9) - 1)
    assert not exercises.check_double_softmax_floor(math.log(10))

    def central(f, x, h):
        grad = torch.zeros_like(x)
        for i in range(x.numel()):
            step = torch.zeros_like(x)
            step[i] = h
            grad[i] = (f(x + step) - f(x - step)) / (2 * h)
        return grad

    assert exercises.check_numerical_grad(central)
    assert not exercises.check_numerical_grad(lambda f, x, h: torch.zeros_like(x))


def test_chapter4_checkers(capsys):
    import torch.nn.functional as F

    assert exercises.check_conv_output_size(lambda n, k, s, p: (n + 2 * p - k) // s + 1)
    assert not exercises.check_conv_output_size(lambda n, k, s, p: (n + p - k) // s + 1)
    assert "both sides" in capsys.readouterr().out
    assert exercises.check_receptive_field(8)
    assert not exercises.check_receptive_field(7)
    assert exercises.check_conv2d(lambda x, w, b, s, p: F.conv2d(x, w, b, stride=s, padding=p))
    assert not exercises.check_conv2d(lambda x, w, b, s, p: F.conv2d(x, w.flip(2, 3), b, stride=s, padding=p))
    assert "flipped" in capsys.readouterr().out


def test_chapter5_checkers(capsys):
    import math

    def count(i, h, layers):
        return h * i + h * h + 2 * h + (layers - 1) * (2 * h * h + 2 * h)

    assert exercises.check_rnn_parameters(count)
    assert not exercises.check_rnn_parameters(lambda i, h, n: count(i, h, n) - n * h)
    assert "two bias" in capsys.readouterr().out
    assert exercises.check_vanishing_steps(math.ceil(math.log(0.01) / math.log(0.9)))
    assert not exercises.check_vanishing_steps(10)

    def run(x, w_ih, w_hh, b_ih, b_hh, h0=None):
        h = x.new_zeros(x.shape[0], w_hh.shape[0]) if h0 is None else h0[0]
        states = []
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
            states.append(h)
        return torch.stack(states, 1), h.unsqueeze(0)

    def no_hidden_bias(x, w_ih, w_hh, b_ih, b_hh, h0=None):
        return run(x, w_ih, w_hh, b_ih, torch.zeros_like(b_hh), h0)

    assert exercises.check_rnn_forward(run)
    assert not exercises.check_rnn_forward(no_hidden_bias)
    assert "values differ" in capsys.readouterr().out


def test_chapter6_to_8_checkers(capsys):
    import torch.nn.functional as F

    from aimodels import data, positional, text

    assert exercises.check_sinusoidal(positional.sinusoidal_encoding)
    assert not exercises.check_sinusoidal(lambda n, d: positional.sinusoidal_encoding(n, d).flip(1))
    assert exercises.check_pe_norm(32)
    assert not exercises.check_pe_norm(64)
    assert exercises.check_embedding_matmul(lambda ids, w: F.one_hot(ids, w.shape[0]).to(w.dtype) @ w)
    assert not exercises.check_embedding_matmul(lambda ids, w: F.one_hot(ids, w.shape[0]).to(w.dtype) @ w * 2)
    assert exercises.check_attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert not exercises.check_attention(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1) @ v)
    assert "sqrt(d_k)" in capsys.readouterr().out
    assert exercises.check_causal_mask(lambda n: torch.ones(n, n, dtype=torch.bool).tril())
    assert not exercises.check_causal_mask(lambda n: ~torch.ones(n, n, dtype=torch.bool).tril())
    assert exercises.check_mha_parameters(lambda e: 4 * e * e + 4 * e)
    assert not exercises.check_mha_parameters(lambda e: 3 * e * e + 3 * e)
    assert exercises.check_pad_batch(text.pad_batch)
    assert not exercises.check_pad_batch(lambda seqs, pad: text.pad_batch([s[::-1] for s in seqs], pad))
    assert exercises.check_bpe_merge(lambda ids, pair, new: list(text._merge(tuple(ids), pair, new)))
    assert not exercises.check_bpe_merge(lambda ids, pair, new: ids)
    assert exercises.check_chinese_number(data.chinese_number)
    assert not exercises.check_chinese_number(lambda n: data.chinese_number(n).replace("零", ""))
