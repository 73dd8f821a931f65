"""Gradient descent and its descendants, from scratch (Chapter 2).

Two layers:

* plain NumPy functions (:func:`gradient_descent`, :func:`linear_regression_sgd`) that
  show the update rule with nothing hidden;
* ``torch.optim.Optimizer`` subclasses (:class:`SGD`, :class:`RMSProp`, :class:`Adam`)
  with the same update semantics as ``torch.optim.SGD``, ``RMSprop`` and ``Adam``,
  so that they drop into any PyTorch training loop. ``tests/test_optim.py`` checks
  each one against its twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

Array = np.ndarray


# --------------------------------------------------------------------------- test functions
def ill_conditioned_quadratic(p: Any, condition: float = 20.0) -> Any:
    r"""A stretched bowl :math:`f(x, y) = \tfrac12 (x^2 + \kappa y^2)`, minimum 0 at the origin.

    Its curvatures are 1 and :math:`\kappa` (``condition``), so :math:`\kappa` is the
    condition number of its Hessian. Works on NumPy arrays and torch tensors whose
    last axis holds (x, y).
    """
    return 0.5 * (p[..., 0] ** 2 + condition * p[..., 1] ** 2)


def rosenbrock(p: Any, a: float = 1.0, b: float = 100.0) -> Any:
    r"""Rosenbrock's banana :math:`f(x, y) = (a - x)^2 + b (y - x^2)^2`, minimum 0 at (a, a²).

    A curved, narrow valley: easy to find, slow to follow (Rosenbrock, 1960).
    Works on NumPy arrays and torch tensors whose last axis holds (x, y).
    """
    x, y = p[..., 0], p[..., 1]
    return (a - x) ** 2 + b * (y - x**2) ** 2


# --------------------------------------------------------------------------- plain NumPy
def gradient_descent(
    grad: Callable[[Array], Array], x0: Iterable[float] | float, lr: float, steps: int
) -> Array:
    r"""Run :math:`x_{t+1} = x_t - \eta \nabla f(x_t)` and return every iterate.

    ``grad`` maps a point (a 1-D array) to the gradient there. Returns an array of
    shape ``[steps + 1, dim]`` whose first row is ``x0``. Divergence is not an error:
    the iterates simply grow, which is what the chapter plots.
    """
    _check_lr("gradient_descent", lr)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got steps={steps!r}")
    x = np.atleast_1d(np.asarray(x0, dtype=np.float64)).copy()
    path = [x.copy()]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            x = x - lr * np.asarray(grad(x), dtype=np.float64)
            path.append(x.copy())
    return np.stack(path)


def linear_regression_sgd(
    X: Array,
    y: Array,
    lr: float,
    batch_size: int,
    epochs: int,
    seed: int = 0,
) -> dict[str, Array]:
    r"""Minibatch SGD on the mean squared error of a linear model :math:`\hat y = Xw + b`.

    Each update uses the gradient of the loss on one minibatch :math:`B`:

    .. math:: \nabla_w L_B = \tfrac{2}{|B|} X_B^\top (X_B w + b - y_B), \qquad
              \nabla_b L_B = \tfrac{2}{|B|} \mathbf 1^\top (X_B w + b - y_B).

    ``batch_size=len(X)`` is full-batch gradient descent, ``batch_size=1`` is
    stochastic gradient descent. The data are reshuffled every epoch. Returns
    ``w``, ``b``, the full-data loss after every update (``loss``) and the number of
    examples whose gradient had been computed by then (``examples``).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(
            f"expected X of shape [n, d] and y of shape [n], got X {X.shape} and y {y.shape}"
        )
    n = X.shape[0]
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}], got batch_size={batch_size!r}")
    _check_lr("linear_regression_sgd", lr)
    rng = np.random.default_rng(seed)
    w, b = np.zeros(X.shape[1]), 0.0
    losses, seen = [float(np.mean((X @ w + b - y) ** 2))], [0]
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            residual = X[idx] @ w + b - y[idx]
            w = w - lr * 2.0 / len(idx) * (X[idx].T @ residual)
            b = b - lr * 2.0 / len(idx) * residual.sum()
            losses.append(float(np.mean((X @ w + b - y) ** 2)))
            seen.append(seen[-1] + len(idx))
    return {"w": w, "b": np.float64(b), "loss": np.array(losses), "examples": np.array(seen)}


def steps_to_reach(losses: Iterable[float], tolerance: float) -> int | None:
    """Index of the first loss below ``tolerance``, or ``None`` if it never gets there."""
    below = np.flatnonzero(np.asarray(losses, dtype=np.float64) < tolerance)
    return int(below[0]) if below.size else None


# --------------------------------------------------------------------------- torch optimisers
def _check_lr(owner: str, lr: float) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{owner}: expected a learning rate lr >= 0, got lr={lr!r}")


def _check_unit_interval(owner: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: expected {name} in [0, 1), got {name}={value!r}")


def _check_eps(owner: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{owner}: expected eps >= 0, got eps={eps!r}")


class ScratchOptimizer(Optimizer):
    """Base class of the course's optimisers: it loops over parameters, you write the update.

    A subclass implements :meth:`update`, which changes one parameter in place from
    its gradient, its per-parameter ``state`` dict and its group's hyperparameters.
    Everything else (param groups, ``zero_grad``, ``state_dict``, closures) comes
    from ``torch.optim.Optimizer``.
    """

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict
    ) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply one update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self.update(param, param.grad, self.state[param], group)
        return loss


class SGD(ScratchOptimizer):
    r"""Stochastic gradient descent with optional (heavy-ball) momentum.

    .. math:: b_{t} = \beta b_{t-1} + g_t, \qquad \theta_{t} = \theta_{t-1} - \eta b_t

    with :math:`\beta` = ``momentum``, :math:`b_1 = g_1`, as ``torch.optim.SGD`` (no dampening).
    With ``momentum=0`` it is plain :math:`\theta \leftarrow \theta - \eta g`.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0) -> None:
        _check_lr("SGD", lr)
        _check_unit_interval("SGD", "momentum", momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum})

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        step = grad
        if group["momentum"] != 0:
            if "velocity" not in state:
                state["velocity"] = grad.clone()
            else:
                state["velocity"].mul_(group["momentum"]).add_(grad)
            step = state["velocity"]
        param.add_(step, alpha=-group["lr"])


class RMSProp(ScratchOptimizer):
    r"""RMSProp: divide each coordinate's step by a running root-mean-square of its gradients.

    .. math:: s_t = \alpha s_{t-1} + (1 - \alpha) g_t^2, \qquad
              \theta_t = \theta_{t-1} - \eta \, \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0 = 0`, exactly as ``torch.optim.RMSprop`` (not centred, no momentum).
    """

    def __init__(self, params: Iterable, lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
        _check_lr("RMSProp", lr)
        _check_unit_interval("RMSProp", "alpha", alpha)
        _check_eps("RMSProp", eps)
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if "square_avg" not in state:
            state["square_avg"] = torch.zeros_like(param)
        square_avg = state["square_avg"]
        square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
        param.addcdiv_(grad, square_avg.sqrt().add_(group["eps"]), value=-group["lr"])


class Adam(ScratchOptimizer):
    r"""Adam: momentum on the gradient plus RMSProp scaling, both bias-corrected.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, &\quad
        \hat m_t &= m_t / (1 - \beta_1^t), \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, &\quad
        \hat v_t &= v_t / (1 - \beta_2^t), \\
        \theta_t &= \theta_{t-1} - \eta \, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

    with :math:`m_0 = v_0 = 0` (Kingma and Ba, 2015), exactly as ``torch.optim.Adam``
    with its defaults (no weight decay, no AMSGrad).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        _check_lr("Adam", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam: expected betas as a pair (beta1, beta2), got betas={betas!r}")
        _check_unit_interval("Adam", "betas[0]", betas[0])
        _check_unit_interval("Adam", "betas[1]", betas[1])
        _check_eps("Adam", eps)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state["step"] = 0
            state["m"] = torch.zeros_like(param)
            state["v"] = torch.zeros_like(param)
        state["step"] += 1
        t, m, v = state["step"], state["m"], state["v"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        param.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])


def optimize(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: Iterable[float],
    make_optimizer: Callable[[list[torch.Tensor]], Optimizer],
    steps: int,
) -> tuple[Array, Array]:
    """Minimise ``fn`` from ``x0`` with any torch optimiser; return the path and the losses.

    ``make_optimizer`` receives the list of parameters (one float64 tensor holding the
    point) and returns the optimiser, e.g. ``lambda p: Adam(p, lr=0.1)``. Returns the
    iterates, shape ``[steps + 1, dim]``, and ``fn`` at each of them, shape ``[steps + 1]``.
    A run that diverges (the loss becomes inf or nan) stops there, so both arrays end
    at the first non-finite loss.
    """
    x = torch.tensor(list(x0), dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([x])
    path, losses = [x.detach().clone()], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = fn(x)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            return torch.stack(path).numpy(), np.array(losses)
        loss.backward()
        optimizer.step()
        path.append(x.detach().clone())
    losses.append(fn(x).item())
    return torch.stack(path).numpy(), np.array(losses)


def max_difference_from_twin(
    make_ours: Callable[[Iterable], Optimizer],
    make_reference: Callable[[Iterable], Optimizer],
    steps: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Train two identical small networks, one per optimiser; return the largest gap.

    Both copies start from the same random weights and see the same random minibatches
    of a regression problem, so any difference comes from the update rules alone.
    Returns the maximum absolute difference between corresponding parameters over all
    ``steps`` steps: 0 up to rounding when the two optimisers agree.
    """
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net = net.to(dtype)
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin = twin.to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype))
    twin.load_state_dict(net.state_dict())
    ours, reference = make_ours(net.parameters()), make_reference(twin.parameters())
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(16, 5, generator=generator, dtype=dtype)
        y = torch.randn(16, 3, generator=generator, dtype=dtype)
        for model, optimizer in ((net, ours), (twin, reference)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        for a, b in zip(net.parameters(), twin.parameters(), strict=True):
            worst = max(worst, (a - b).abs().max().item())
    return worst


class AdamW(Adam):
    r"""AdamW: Adam with *decoupled* weight decay (Loshchilov and Hutter, 2019).

    Before the Adam step, every weight shrinks towards zero by a fixed fraction,
    :math:`\theta \leftarrow \theta (1 - \eta \lambda)`, instead of adding
    :math:`\lambda\theta` to the gradient. Adding it to the gradient (L2 regularisation)
    would let Adam's per-coordinate scaling shrink the decay of weights with large
    gradients; decoupling keeps the decay the same for every weight. Matches
    ``torch.optim.AdamW`` (default ``weight_decay=0.01``, no AMSGrad).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        _check_lr("AdamW", lr)
        if not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay * lr < 1:
            raise ValueError(f"AdamW: expected 0 <= weight_decay < 1/lr, got "
                             f"weight_decay={weight_decay!r}")
        super().__init__(params, lr, betas, eps)
        for group in self.param_groups:
            group.setdefault("weight_decay", weight_decay)

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        param.mul_(1 - group["lr"] * group["weight_decay"])
        super().update(param, grad, state, group)


def warmup_cosine(
    step: int, total_steps: int, max_lr: float, warmup_steps: int = 0, min_lr: float = 0.0
) -> float:
    r"""Learning rate at ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr``.

    .. math::
        \eta_t = \eta_{\max} \frac{t + 1}{W} \quad (t < W), \qquad
        \eta_t = \eta_{\min} + \tfrac12 (\eta_{\max} - \eta_{\min})
        \Big(1 + \cos \pi \frac{t - W}{S - W}\Big) \quad (t \ge W)

    for W warm-up steps out of S in all. Warm-up keeps the first updates small while
    Adam's moment estimates are still noisy; the cosine spends most steps at a high
    rate and ends with small, careful ones.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), "
                         f"got {warmup_steps!r}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"expected 0 <= min_lr <= max_lr, got min_lr={min_lr!r}, "
                         f"max_lr={max_lr!r}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- Nesterov momentum
class NesterovSGD(SGD):
    r"""SGD with Nesterov momentum: take the momentum step, then correct with the gradient.

    .. math:: b_t = \beta b_{t-1} + g_t, \qquad \theta_t = \theta_{t-1} - \eta\,(g_t + \beta b_t)

    with :math:`b_1 = g_1`, exactly as ``torch.optim.SGD(..., momentum=beta, nesterov=True)``
    (no dampening). Heavy-ball momentum steps by :math:`\eta b_t`; Nesterov's step adds the
    current gradient once more and damps the rest by :math:`\beta`. In this form the stored
    parameter is the *look-ahead* point :math:`\theta + \beta v` of Sutskever et al. (2013),
    where the gradient of Nesterov's (1983) method is evaluated.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9) -> None:
        _check_unit_interval("NesterovSGD", "momentum", momentum)
        if momentum == 0:
            raise ValueError("NesterovSGD: Nesterov momentum needs momentum > 0, got momentum=0")
        super().__init__(params, lr, momentum)

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta = group["momentum"]
        if "velocity" not in state:
            state["velocity"] = grad.clone()
        else:
            state["velocity"].mul_(beta).add_(grad)
        param.add_(grad.add(state["velocity"], alpha=beta), alpha=-group["lr"])


# --------------------------------------------------------------------------- schedules
def _check_step(owner: str, step: int, last: int | None = None) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{owner}: expected a step count (an int >= 0), got step={step!r}")
    if last is not None and step > last:
        raise ValueError(f"{owner}: expected step <= total_steps={last}, got step={step}")


def _check_positive_int(owner: str, name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: expected {name} as an int >= 1, got {name}={value!r}")


def _cosine_between(start: float, end: float, fraction: float) -> float:
    r"""Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1).

    :math:`\text{end} + \tfrac12 (\text{start} - \text{end})(1 + \cos \pi f)`: flat at both
    ends, steepest in the middle.
    """
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * fraction))


def step_decay_lr(step: int, base_lr: float, step_size: int, gamma: float = 0.1) -> float:
    r"""Step decay: multiply the rate by ``gamma`` every ``step_size`` steps.

    .. math:: \eta_t = \eta_0 \, \gamma^{\lfloor t / s \rfloor}

    Equals ``torch.optim.lr_scheduler.StepLR(optimizer, step_size=s, gamma=gamma)`` after
    ``t`` calls of its ``step()``.
    """
    _check_step("step_decay_lr", step)
    _check_lr("step_decay_lr", base_lr)
    _check_positive_int("step_decay_lr", "step_size", step_size)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 < gamma <= 1:
        raise ValueError(f"step_decay_lr: expected gamma in (0, 1], got gamma={gamma!r}")
    return base_lr * gamma ** (step // step_size)


def cosine_annealing_lr(step: int, base_lr: float, t_max: int, min_lr: float = 0.0) -> float:
    r"""Cosine annealing from ``base_lr`` down to ``min_lr`` over ``t_max`` steps.

    .. math:: \eta_t = \eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min})
              \Big(1 + \cos \frac{\pi t}{T_{\max}}\Big)

    the schedule of SGDR (Loshchilov and Hutter, 2017) without its restarts. Equals
    ``torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max, eta_min)``; like it,
    the cosine keeps going past ``t_max`` and climbs back up.
    """
    _check_step("cosine_annealing_lr", step)
    _check_lr("cosine_annealing_lr", base_lr)
    _check_positive_int("cosine_annealing_lr", "t_max", t_max)
    if not isinstance(min_lr, (int, float)) or not 0 <= min_lr <= base_lr:
        raise ValueError(f"cosine_annealing_lr: expected 0 <= min_lr <= base_lr={base_lr!r}, "
                         f"got min_lr={min_lr!r}")
    return _cosine_between(base_lr, min_lr, step / t_max)


def linear_warmup_lr(
    step: int,
    base_lr: float,
    warmup_steps: int,
    start_factor: float = 1 / 3,
    end_factor: float = 1.0,
) -> float:
    r"""Linear warm-up: grow the rate from ``start_factor * base_lr`` over ``warmup_steps``.

    .. math:: \eta_t = \eta_0 \Big(s + (e - s)\,\frac{\min(t, W)}{W}\Big)

    then hold it at ``end_factor * base_lr``. Equals ``torch.optim.lr_scheduler.LinearLR(
    optimizer, start_factor, end_factor, total_iters=W)`` (whose defaults are used here).
    Goyal et al. (2017) warm up this way so that large-batch SGD survives its first epochs.
    """
    _check_step("linear_warmup_lr", step)
    _check_lr("linear_warmup_lr", base_lr)
    _check_positive_int("linear_warmup_lr", "warmup_steps", warmup_steps)
    if not isinstance(start_factor, (int, float)) or not 0 < start_factor <= 1:
        raise ValueError(f"linear_warmup_lr: expected start_factor in (0, 1], "
                         f"got start_factor={start_factor!r}")
    if not isinstance(end_factor, (int, float)) or not 0 <= end_factor <= 1:
        raise ValueError(f"linear_warmup_lr: expected end_factor in [0, 1], "
                         f"got end_factor={end_factor!r}")
    progress = min(step, warmup_steps) / warmup_steps
    return base_lr * (start_factor + (end_factor - start_factor) * progress)


def _one_cycle_phase(
    owner: str, step: int, total_steps: int, pct_start: float
) -> tuple[int, float]:
    """Which phase of the one-cycle policy ``step`` is in (0 rising, 1 falling), and how far."""
    _check_positive_int(owner, "total_steps", total_steps)
    _check_step(owner, step, last=total_steps)
    peak = pct_start * total_steps - 1  # the last step of the rising phase, as in PyTorch
    if not isinstance(pct_start, float) or not 0 < peak < total_steps - 1:
        raise ValueError(f"{owner}: expected a float pct_start with 1 < pct_start * total_steps "
                         f"< total_steps, got pct_start={pct_start!r}, total_steps={total_steps}")
    if step <= peak:
        return 0, step / peak
    return 1, (step - peak) / (total_steps - 1 - peak)


def one_cycle_lr(
    step: int,
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    r"""The one-cycle policy (Smith, 2018; Smith and Topin, 2019): one rise, one long fall.

    The rate climbs along half a cosine from :math:`\eta_{\max}/d` to :math:`\eta_{\max}`
    during the first ``pct_start`` of the steps, then falls along another half cosine to
    :math:`\eta_{\max}/(d\,d_f)`, far below where it started. Equals
    ``torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps)`` with its defaults
    ``anneal_strategy='cos'`` and ``three_phase=False``. That scheduler also cycles the
    momentum (or Adam's :math:`\beta_1`) the other way: see :func:`one_cycle_momentum`.
    """
    phase, fraction = _one_cycle_phase("one_cycle_lr", step, total_steps, pct_start)
    _check_lr("one_cycle_lr", max_lr)
    if not div_factor > 0 or not final_div_factor > 0:
        raise ValueError(f"one_cycle_lr: expected div_factor > 0 and final_div_factor > 0, got "
                         f"div_factor={div_factor!r}, final_div_factor={final_div_factor!r}")
    initial_lr = max_lr / div_factor
    if phase == 0:
        return _cosine_between(initial_lr, max_lr, fraction)
    return _cosine_between(max_lr, initial_lr / final_div_factor, fraction)


def one_cycle_momentum(
    step: int,
    total_steps: int,
    pct_start: float = 0.3,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> float:
    r"""The momentum (or :math:`\beta_1`) that ``OneCycleLR`` sets at ``step``.

    It moves opposite to the rate: from ``max_momentum`` down to ``base_momentum`` while
    the rate rises, and back up while it falls, along the same half cosines. PyTorch does
    this by default (``cycle_momentum=True``) and writes it into ``group["momentum"]`` (SGD)
    or ``group["betas"][0]`` (Adam and AdamW).
    """
    phase, fraction = _one_cycle_phase("one_cycle_momentum", step, total_steps, pct_start)
    if not 0 <= base_momentum <= max_momentum < 1:
        raise ValueError(f"one_cycle_momentum: expected 0 <= base_momentum <= max_momentum < 1, "
                         f"got base_momentum={base_momentum!r}, max_momentum={max_momentum!r}")
    if phase == 0:
        return _cosine_between(max_momentum, base_momentum, fraction)
    return _cosine_between(base_momentum, max_momentum, fraction)


# --------------------------------------------------------------------------- clipping
def _p_norm(x: torch.Tensor, p: float) -> torch.Tensor:
    """The p-norm of all entries of ``x``: the largest magnitude when p is infinite."""
    if math.isinf(p):
        return x.abs().max()
    return x.abs().pow(p).sum().pow(1 / p)


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    r"""Rescale all gradients *together* so that their global norm is at most ``max_norm``.

    .. math:: N = \big\lVert (\lVert g_1 \rVert_p, \dots, \lVert g_k \rVert_p) \big\rVert_p,
              \qquad g_i \leftarrow g_i \cdot \min\Big(1, \frac{c}{N + 10^{-6}}\Big)

    :math:`N` is the norm of every gradient entry stacked into one vector, so clipping
    shortens the whole update without turning it (Pascanu et al., 2013). Changes the
    gradients in place and returns :math:`N` measured *before* clipping, exactly as
    ``torch.nn.utils.clip_grad_norm_``. Parameters without a gradient are skipped.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not max_norm >= 0:
        raise ValueError(f"clip_grad_norm_: expected max_norm >= 0, got max_norm={max_norm!r}")
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"clip_grad_norm_: expected norm_type > 0 (or inf), got {norm_type!r}")
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = _p_norm(torch.stack([_p_norm(g, p) for g in grads]), p)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
    return total


# --------------------------------------------------------------------------- weight decay
def weight_decay_under_noise(
    make_optimizer: Callable[[list[torch.Tensor]], Optimizer],
    grad_scales: Iterable[float],
    steps: int,
    l2: float = 0.0,
    size: int = 1000,
    seed: int = 0,
) -> Array:
    r"""How fast an optimiser shrinks weights whose loss gives them nothing but noise.

    One row of ``size`` weights per entry of ``grad_scales``, all starting at 1. At every
    step the gradient of row k is Gaussian noise of standard deviation ``grad_scales[k]``
    (the same noise for every optimiser with the same ``seed``), plus :math:`\delta\theta`
    when ``l2`` :math:`= \delta` is not 0: L2 regularisation, the penalty
    :math:`\tfrac{\delta}{2}\lVert\theta\rVert^2` added to the loss. The noise averages
    out, so what moves the *mean* weight is the decay alone. Returns the mean of each row
    after every step, shape ``[steps + 1, len(grad_scales)]``.
    """
    grad_scales = list(grad_scales)
    if not grad_scales or not all(isinstance(s, (int, float)) and s >= 0 for s in grad_scales):
        raise ValueError(f"weight_decay_under_noise: expected a non-empty list of gradient "
                         f"scales >= 0, got {grad_scales!r}")
    scales = torch.tensor(grad_scales, dtype=torch.float64)
    _check_positive_int("weight_decay_under_noise", "size", size)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.ones(len(scales), size, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([weights])
    means = [weights.detach().mean(dim=1).clone()]
    for _ in range(steps):
        noise = torch.randn(weights.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            weights.grad = noise * scales[:, None] + l2 * weights
        optimizer.step()
        means.append(weights.detach().mean(dim=1).clone())
    return torch.stack(means).numpy()


def torch_schedule(
    make_scheduler: Callable[[Optimizer], Any],
    steps: int,
    lr: float = 1.0,
    make_optimizer: Callable[[list[torch.Tensor]], Optimizer] | None = None,
) -> dict[str, Array]:
    """The learning rate and momentum a ``torch.optim.lr_scheduler`` sets at steps 0..steps-1.

    ``make_scheduler`` receives an optimiser (by default ``torch.optim.SGD`` with ``lr`` and
    momentum 0.9 on one dummy parameter) and returns the scheduler. The loop calls
    ``optimizer.step()`` then ``scheduler.step()``, as a training loop does, and records
    ``group["lr"]`` and the momentum (``group["momentum"]``, or ``group["betas"][0]`` for
    Adam) *before* each step: the values that step trains with.
    """
    _check_positive_int("torch_schedule", "steps", steps)
    param = torch.nn.Parameter(torch.zeros(1))
    if make_optimizer is None:
        optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)
    else:
        optimizer = make_optimizer([param])
    scheduler = make_scheduler(optimizer)
    rates, momenta = [], []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        rates.append(float(group["lr"]))
        momenta.append(float(group["betas"][0] if "betas" in group else group.get("momentum", 0)))
        optimizer.step()  # no gradient: parameters stay, the step counter moves
        scheduler.step()
    return {"lr": np.array(rates), "momentum": np.array(momenta)}
