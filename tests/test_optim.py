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
    "nesterov": (
        lambda p: optim.NesterovSGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    ),
    "nesterov-0.5": (
        lambda p: optim.NesterovSGD(p, lr=0.02, momentum=0.5),
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.5, dampening=0, nesterov=True),
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


# --------------------------------------------------------------------------- Nesterov
def test_nesterov_is_not_heavy_ball_and_needs_momentum():
    gap = optim.max_difference_from_twin(
        lambda p: optim.NesterovSGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=20)
    assert gap > 1e-3
    with pytest.raises(ValueError, match="needs momentum > 0, got momentum=0"):
        optim.NesterovSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\), got momentum=1.2"):
        optim.NesterovSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=1.2)


def test_nesterov_first_step_adds_the_gradient_twice_scaled():
    # b_1 = g, so the first step is lr * (g + beta * g)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = optim.NesterovSGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.1 * 1.9 * w.grad
    torch.testing.assert_close(w.detach(), expected)


# --------------------------------------------------------------------------- schedules
SCHEDULES = {
    "step-30-0.1": (lambda t: optim.step_decay_lr(t, 0.1, 30),
                    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30)),
    "step-7-0.5": (lambda t: optim.step_decay_lr(t, 0.1, 7, gamma=0.5),
                   lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    "cosine": (lambda t: optim.cosine_annealing_lr(t, 0.1, 100),
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100)),
    "cosine-past-t_max": (lambda t: optim.cosine_annealing_lr(t, 0.1, 40, min_lr=1e-3),
                          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40,
                                                                               eta_min=1e-3)),
    "warmup-default": (lambda t: optim.linear_warmup_lr(t, 0.1, 5),
                       lambda o: torch.optim.lr_scheduler.LinearLR(o)),
    "warmup-0.01-to-0.5": (
        lambda t: optim.linear_warmup_lr(t, 0.1, 20, start_factor=0.01, end_factor=0.5),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, end_factor=0.5,
                                                    total_iters=20)),
    "one-cycle": (lambda t: optim.one_cycle_lr(t, 100, 0.1),
                  lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=100)),
    "one-cycle-custom": (
        lambda t: optim.one_cycle_lr(t, 100, 0.3, pct_start=0.25, div_factor=10.0,
                                     final_div_factor=100.0),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=100,
                                                      pct_start=0.25, div_factor=10.0,
                                                      final_div_factor=100.0)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_match_torch_lr_scheduler(name):
    ours, make_scheduler = SCHEDULES[name]
    theirs = optim.torch_schedule(make_scheduler, 100, lr=0.1)["lr"]
    torch.testing.assert_close(torch.tensor([ours(t) for t in range(100)], dtype=torch.float64),
                               torch.tensor(theirs))


def test_schedule_comparison_detects_a_different_schedule():
    theirs = optim.torch_schedule(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=100,
                                                      anneal_strategy="linear"), 100)["lr"]
    ours = torch.tensor([optim.one_cycle_lr(t, 100, 0.1) for t in range(100)], dtype=torch.float64)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours, torch.tensor(theirs))


@pytest.mark.parametrize("adam", [False, True])
def test_one_cycle_momentum_matches_what_torch_writes_into_the_optimizer(adam):
    make = (lambda p: torch.optim.Adam(p, lr=0.1)) if adam else None
    trace = optim.torch_schedule(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=60,
                                                      pct_start=0.4), 60, make_optimizer=make)
    ours = torch.tensor([optim.one_cycle_momentum(t, 60, pct_start=0.4) for t in range(60)],
                        dtype=torch.float64)
    torch.testing.assert_close(ours, torch.tensor(trace["momentum"]))
    assert trace["momentum"][0] == pytest.approx(0.95) and trace["momentum"].min() < 0.851


def test_one_cycle_switches_on_momentum_in_plain_sgd():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)  # momentum 0
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert opt.param_groups[0]["momentum"] == pytest.approx(optim.one_cycle_momentum(0, 10))


def test_schedule_shapes():
    assert optim.step_decay_lr(59, 1.0, 30) == pytest.approx(0.1)
    assert optim.cosine_annealing_lr(50, 1.0, 100) == pytest.approx(0.5)
    assert optim.cosine_annealing_lr(100, 1.0, 100, min_lr=0.1) == pytest.approx(0.1)
    assert optim.linear_warmup_lr(0, 0.3, 10, start_factor=0.1) == pytest.approx(0.03)
    assert optim.linear_warmup_lr(1000, 0.3, 10) == pytest.approx(0.3)
    peak = optim.one_cycle_lr(29, 100, 1.0)  # the last step of the rise: 0.3 * 100 - 1
    assert peak == pytest.approx(1.0)
    assert optim.one_cycle_lr(0, 100, 1.0) == pytest.approx(1 / 25)
    assert optim.one_cycle_lr(99, 100, 1.0) == pytest.approx(1 / 25 / 1e4)
    assert optim.one_cycle_momentum(29, 100) == pytest.approx(0.85)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: optim.step_decay_lr(-1, 0.1, 10), r"step_decay_lr: expected a step count .* step=-1"),
        (lambda: optim.step_decay_lr(1.5, 0.1, 10), r"got step=1.5"),
        (lambda: optim.step_decay_lr(1, 0.1, 0), r"step_size as an int >= 1, got step_size=0"),
        (lambda: optim.step_decay_lr(1, 0.1, 10, gamma=2.0), r"gamma in \(0, 1\], got gamma=2.0"),
        (lambda: optim.cosine_annealing_lr(1, 0.1, 0), r"t_max as an int >= 1, got t_max=0"),
        (lambda: optim.cosine_annealing_lr(1, 0.1, 10, min_lr=0.2), r"min_lr <= base_lr=0.1"),
        (lambda: optim.linear_warmup_lr(1, -0.1, 5), r"lr >= 0, got lr=-0.1"),
        (lambda: optim.linear_warmup_lr(1, 0.1, 5, start_factor=0.0), r"start_factor in \(0, 1\]"),
        (lambda: optim.linear_warmup_lr(1, 0.1, 5, end_factor=2.0), r"end_factor in \[0, 1\]"),
        (lambda: optim.one_cycle_lr(101, 100, 0.1), r"step <= total_steps=100, got step=101"),
        (lambda: optim.one_cycle_lr(0, 100, 0.1, pct_start=1), r"float pct_start"),
        (lambda: optim.one_cycle_lr(0, 3, 0.1), r"pct_start \* total_steps"),
        (lambda: optim.one_cycle_lr(0, 100, 0.1, div_factor=0), r"div_factor > 0"),
        (lambda: optim.one_cycle_momentum(0, 100, base_momentum=0.99), r"base_momentum <= max_momentum"),
    ],
)
def test_schedules_reject_bad_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- clipping
def _grads_pair(seed, scale):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    ours = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64) * scale
        b.grad = a.grad.clone()
    return ours, theirs


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_grad_norm_matches_torch(norm_type, scale):
    ours, theirs = _grads_pair(0, scale)
    ours.append(torch.zeros(2, requires_grad=True))  # no gradient: skipped by both
    theirs.append(torch.zeros(2, requires_grad=True))
    total = optim.clip_grad_norm_(ours, max_norm=1.0, norm_type=norm_type)
    reference = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(total, reference)
    for a, b in zip(ours[:-1], theirs[:-1], strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[-1].grad is None


def test_clip_grad_norm_scales_all_gradients_by_one_factor():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    total = optim.clip_grad_norm_([a, b], max_norm=2.6)
    torch.testing.assert_close(total, torch.tensor(13.0))
    factor = 2.6 / (13.0 + 1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * factor)
    torch.testing.assert_close(b.grad, torch.tensor([12.0]) * factor)
    # below the threshold nothing changes; a single tensor is accepted
    total = optim.clip_grad_norm_(a, max_norm=100.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * factor)
    assert optim.clip_grad_norm_([], 1.0).item() == 0.0
    with pytest.raises(ValueError, match="max_norm >= 0, got max_norm=-1"):
        optim.clip_grad_norm_([a], max_norm=-1)
    with pytest.raises(ValueError, match="norm_type > 0"):
        optim.clip_grad_norm_([a], max_norm=1.0, norm_type=0)


# --------------------------------------------------------------------------- weight decay
def test_adam_with_l2_in_the_gradient_is_torch_adam_weight_decay():
    ours = optim.weight_decay_under_noise(lambda p: optim.Adam(p, lr=0.01), [0.1, 3.0], 50,
                                          l2=0.2, size=20)
    theirs = optim.weight_decay_under_noise(
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.2), [0.1, 3.0], 50, size=20)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs))
    adamw = optim.weight_decay_under_noise(
        lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.2), [0.1, 3.0], 50, size=20)
    torch_adamw = optim.weight_decay_under_noise(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.2), [0.1, 3.0], 50, size=20)
    torch.testing.assert_close(torch.tensor(adamw), torch.tensor(torch_adamw))


def test_l2_decays_weights_with_small_gradients_faster_adamw_decays_all_alike():
    scales, steps, lr, decay = [0.01, 1.0, 10.0], 600, 0.01, 0.1
    adamw = optim.weight_decay_under_noise(
        lambda p: optim.AdamW(p, lr=lr, weight_decay=decay), scales, steps)
    l2 = optim.weight_decay_under_noise(lambda p: optim.Adam(p, lr=lr), scales, steps, l2=decay)
    assert adamw.shape == (steps + 1, 3)
    np.testing.assert_allclose(adamw[-1], (1 - lr * decay) ** steps, atol=0.03)
    assert l2[-1, 0] < 0.05 < 0.9 < l2[-1, 2]  # small gradients: gone; large: barely decayed
    assert abs(l2[-1, 1] - adamw[-1, 1]) < 0.05  # gradient scale 1: the two agree
    with pytest.raises(ValueError, match="gradient scales >= 0"):
        optim.weight_decay_under_noise(lambda p: optim.Adam(p, lr=lr), [-1.0], 3)
