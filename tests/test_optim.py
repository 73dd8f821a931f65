"""Our optimisers against their torch.optim twins, and the NumPy gradient-descent helpers."""

import numpy as np
import pytest
import torch

from aimodels import optim

TWINS = {
    "sgd": (lambda p: optim.SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    "momentum": (
        lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
    "rmsprop": (
        lambda p: optim.RMSProp(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
    ),
    "rmsprop-alpha": (
        lambda p: optim.RMSProp(p, lr=0.003, alpha=0.9, eps=1e-6),
        lambda p: torch.optim.RMSprop(p, lr=0.003, alpha=0.9, eps=1e-6),
    ),
    "adam": (lambda p: optim.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam-betas": (
        lambda p: optim.Adam(p, lr=0.002, betas=(0.8, 0.99), eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=0.002, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": (lambda p: optim.AdamW(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01)),
    "adamw-decay": (
        lambda p: optim.AdamW(p, lr=0.02, betas=(0.9, 0.95), weight_decay=0.3),
        lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.9, 0.95), weight_decay=0.3),
    ),
}


@pytest.mark.parametrize("name", sorted(TWINS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_twin_within_1e_6_over_100_steps(name, seed):
    ours, reference = TWINS[name]
    assert optim.max_difference_from_twin(ours, reference, steps=100, seed=seed) < 1e-6


@pytest.mark.parametrize("name", sorted(TWINS))
def test_matches_torch_twin_in_float32(name):
    ours, reference = TWINS[name]
    gap = optim.max_difference_from_twin(ours, reference, steps=100, dtype=torch.float32)
    assert gap < 1e-4


def test_parameters_match_with_assert_close_on_a_random_problem():
    torch.manual_seed(0)
    a = torch.randn(20, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    target = torch.randn(20, dtype=torch.float64)
    ours, theirs = optim.Adam([a], lr=0.1), torch.optim.Adam([b], lr=0.1)
    for _ in range(100):
        for x, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            ((x - target) ** 4).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_twin_comparison_detects_a_different_rule():
    gap = optim.max_difference_from_twin(
        lambda p: optim.RMSProp(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01), steps=20
    )
    assert gap > 1e-3


def test_param_groups_closure_and_state_dict():
    w1 = torch.nn.Parameter(torch.ones(3))
    w2 = torch.nn.Parameter(torch.ones(2))
    opt = optim.Adam([{"params": [w1]}, {"params": [w2], "lr": 0.0}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w1**2).sum() + (w2**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert torch.all(w1 < 1) and torch.all(w2 == 1)
    state = opt.state_dict()
    fresh = optim.Adam([{"params": [w1]}, {"params": [w2], "lr": 0.0}], lr=0.1)
    fresh.load_state_dict(state)
    assert fresh.state[w1]["step"] == 1


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda p: optim.SGD(p, lr=-0.1), r"SGD: expected a learning rate lr >= 0, got lr=-0.1"),
        (lambda p: optim.SGD(p, lr=0.1, momentum=1.0), r"expected momentum in \[0, 1\), got momentum=1.0"),
        (lambda p: optim.RMSProp(p, lr=-1), r"RMSProp: expected a learning rate lr >= 0, got lr=-1"),
        (lambda p: optim.RMSProp(p, lr=0.1, alpha=1.5), r"expected alpha in \[0, 1\), got alpha=1.5"),
        (lambda p: optim.RMSProp(p, lr=0.1, eps=-1e-8), r"expected eps >= 0, got eps=-1e-08"),
        (lambda p: optim.Adam(p, lr=-0.001), r"Adam: expected a learning rate lr >= 0, got lr=-0.001"),
        (lambda p: optim.Adam(p, lr=0.1, betas=(1.0, 0.999)), r"betas\[0\] in \[0, 1\), got betas\[0\]=1.0"),
        (lambda p: optim.Adam(p, lr=0.1, betas=(0.9, -0.1)), r"betas\[1\] in \[0, 1\), got betas\[1\]=-0.1"),
        (lambda p: optim.Adam(p, lr=0.1, betas=0.9), r"expected betas as a pair"),
        (lambda p: optim.Adam(p, lr=float("nan")), r"got lr=nan"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter_and_value(build, message):
    with pytest.raises(ValueError, match=message):
        build([torch.nn.Parameter(torch.zeros(1))])


def test_gradient_descent_on_a_quadratic_converges_diverges_as_theory_says():
    grad = lambda x: 2 * x  # f(x) = x^2, curvature 2, stable iff lr < 1  # noqa: E731
    path = optim.gradient_descent(grad, 1.0, lr=0.25, steps=10)
    assert path.shape == (11, 1)
    np.testing.assert_allclose(path[:, 0], 0.5 ** np.arange(11))
    assert abs(optim.gradient_descent(grad, 1.0, lr=1.05, steps=100)[-1, 0]) > 1e4  # |1 - 2 lr|^100 = 1.1^100
    assert abs(optim.gradient_descent(grad, 1.0, lr=0.5, steps=1)[-1, 0]) == 0.0
    with pytest.raises(ValueError, match="lr=-1"):
        optim.gradient_descent(grad, 1.0, lr=-1, steps=3)


def test_linear_regression_sgd_reaches_least_squares():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=200)
    A = np.c_[X, np.ones(200)]
    best = np.mean((A @ np.linalg.lstsq(A, y, rcond=None)[0] - y) ** 2)
    full = optim.linear_regression_sgd(X, y, lr=0.1, batch_size=200, epochs=200)
    assert full["loss"][-1] == pytest.approx(best, rel=1e-6)
    assert full["examples"][-1] == 200 * 200
    mini = optim.linear_regression_sgd(X, y, lr=0.02, batch_size=20, epochs=30)
    assert mini["loss"][-1] < 1.1 * best
    assert len(mini["loss"]) == 30 * 10 + 1
    with pytest.raises(ValueError, match="batch_size=0"):
        optim.linear_regression_sgd(X, y, lr=0.1, batch_size=0, epochs=1)
    with pytest.raises(ValueError, match=r"got X \(200, 3\) and y \(199,\)"):
        optim.linear_regression_sgd(X, y[:-1], lr=0.1, batch_size=1, epochs=1)


def test_optimize_follows_the_optimizer_and_test_functions_have_their_minima():
    path, losses = optim.optimize(optim.rosenbrock, [-1.5, 2.0], lambda p: optim.Adam(p, lr=0.05), 2000)
    assert path.shape == (2001, 2) and losses.shape == (2001,)
    assert losses[-1] < 1e-4
    np.testing.assert_allclose(path[-1], [1.0, 1.0], atol=1e-2)
    assert optim.ill_conditioned_quadratic(np.zeros(2)) == 0
    assert optim.rosenbrock(np.ones(2)) == 0
    assert optim.ill_conditioned_quadratic(np.array([0.0, 1.0]), condition=20) == 10


def test_steps_to_reach():
    assert optim.steps_to_reach([3.0, 2.0, 0.5, 0.1], 1.0) == 2
    assert optim.steps_to_reach([3.0, 2.0], 1.0) is None
    assert optim.steps_to_reach(np.array([np.nan, 0.0]), 1.0) == 1


def test_optimize_stops_at_divergence():
    path, losses = optim.optimize(optim.rosenbrock, [-1.5, 2.0], lambda p: optim.SGD(p, lr=3e-3), 2000)
    assert not np.isfinite(losses[-1])
    assert np.all(np.isfinite(losses[:-1]))
    assert len(path) == len(losses) < 2001


def test_adamw_param_groups_keep_their_own_weight_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    groups = lambda: [{"params": [model[0].weight], "weight_decay": 0.5},  # noqa: E731
                      {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for make in (optim.AdamW, torch.optim.AdamW):
        model.load_state_dict(start)
        opt = make(groups(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(8, 4, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
            opt.step()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in start:
        torch.testing.assert_close(results[0][key], results[1][key])


def test_adamw_decay_is_decoupled_from_the_gradient():
    # With a zero gradient Adam's step is zero, so only the decay moves the weight.
    w = torch.nn.Parameter(torch.ones(3))
    opt = optim.AdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    with pytest.raises(ValueError, match="weight_decay"):
        optim.AdamW([w], lr=0.1, weight_decay=-1.0)


@pytest.mark.parametrize(("total", "warmup", "min_lr"), [(100, 10, 0.0), (37, 5, 1e-4), (20, 0, 0.0)])
def test_warmup_cosine_matches_pytorch_schedulers(total, warmup, min_lr):
    max_lr = 0.1
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=max_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1)
        schedule = torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])
    else:
        schedule = cosine
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    ours = [optim.warmup_cosine(t, total, max_lr, warmup, min_lr) for t in range(total)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert ours[-1] > min_lr and max(ours) == pytest.approx(max_lr)


def test_warmup_cosine_rejects_bad_settings():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine(0, 10, 0.1, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        optim.warmup_cosine(0, 10, 0.1, min_lr=0.2)
