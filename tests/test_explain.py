"""Tests for aimodels.explain: saliency is autograd's gradient of the logit; integrated
gradients are exact for a linear model and complete (sum = f(x) - f(baseline)) for a net."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from aimodels import explain


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32),
                          nn.ReLU(), nn.Linear(32, 10)).double()
    return model.eval()


@pytest.fixture
def images():
    return torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)


def test_saliency_is_autograd_grad_of_the_target_logit(net, images):
    target = torch.tensor([0, 3, 3, 9, 1])
    got = explain.saliency(net, images, target, absolute=False)
    for i in range(len(images)):
        x = images[i : i + 1].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(net(x)[0, target[i]], x)
        assert_close(got[i : i + 1], expected)
    assert_close(explain.saliency(net, images, target), got.abs())


def test_integrated_gradients_of_a_linear_model_are_exact():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).double().eval()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    baseline = torch.full_like(x, 0.25)
    got = explain.integrated_gradients(linear, x, 7, baseline=baseline, steps=1)
    expected = (x - baseline) * linear[1].weight[7].view(1, 1, 4, 4)
    assert_close(got, expected.detach())


def test_integrated_gradients_are_complete(net, images):
    target = torch.tensor([2, 2, 5, 7, 0])
    attributions = explain.integrated_gradients(net, images, target, steps=256)
    gap = explain.completeness_gap(net, images, target, attributions)
    change = (explain.class_scores(net, images, target)
              - explain.class_scores(net, torch.zeros_like(images), target)).detach()
    # ReLU kinks make the trapezoid rule converge slowly: 1% of the largest change is the
    # tolerance (measured: about 0.15%).
    assert gap.abs().max() <= 1e-2 * change.abs().max()
    coarse = explain.completeness_gap(
        net, images, target, explain.integrated_gradients(net, images, target, steps=2))
    assert gap.abs().max() < coarse.abs().max()  # more steps, smaller quadrature error


def test_integrated_gradients_match_a_per_step_loop(net, images):
    steps, target = 8, 4
    total = torch.zeros_like(images)
    for k in range(steps + 1):
        point = (k / steps * images).requires_grad_(True)
        (grad,) = torch.autograd.grad(net(point)[:, target].sum(), point)
        total += grad * (0.5 if k in (0, steps) else 1.0) / steps
    assert_close(explain.integrated_gradients(net, images, target, steps=steps), images * total)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: explain.saliency(m.train(), x, 0), "model.eval"),
    (lambda m, x: explain.saliency(m, x, torch.tensor([1, 2])), "one class index per input"),
    (lambda m, x: explain.saliency(m, x.long(), 0), "floating-point batch"),
    (lambda m, x: explain.integrated_gradients(m, x, 0, steps=0), "steps must be"),
])
def test_bad_inputs_raise_clear_errors(net, images, call, message):
    with pytest.raises(ValueError, match=message):
        call(net, images)
