"""Chapter 2 graders: gradient descent and optimisers."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from ._common import (
    Library,
    NotYet,
    _grade_number,
    _judge_number,
    _report,
    _require_callable,
    call,
    fresh_rng,
    grader,
)

__all__ = [
    "check_adagrad",
    "check_adam_first_step",
    "check_clipped_gradient",
    "check_max_stable_lr",
    "check_warmup_cosine_lr",
]


@grader
def check_max_stable_lr(answer: object) -> bool:
    """Ch. 2, exercise 1: the learning rate above which GD diverges on f(x) = 2x²."""
    curvature = 4.0  # f''(x) for f(x) = 2 x^2
    return _grade_number(
        "largest stable learning rate", answer, 2.0 / curvature,
        {1.0 / curvature: "1/λ is the step that lands on the minimum at once; "
                          "the iteration still converges (oscillating) up to 2/λ.",
         1.0: "for f(x) = x² the bound is 1; here f(x) = 2x², so f''(x) = 4, not 2.",
         2.0: "2/λ needs the curvature of 2x², λ = f''(x) = 4, not 1.",
         4.0: "that is the curvature λ = f''(x); the largest stable rate is 2/λ."},
        rel=1e-3,
    )


_TORCH_ADAGRAD = Library(
    task="the exercise asks you to write AdaGrad's update rule yourself",
    hint="subclass aimodels.optim.ScratchOptimizer and write update(): keep a running sum "
         "of squared gradients in the state.",
    python=((importlib.import_module(torch.optim.Adagrad.__module__), "torch.optim.Adagrad"),),
    torch={"_fused_adagrad_": "torch.optim.Adagrad"},
)


def _trajectory(make: Callable, lr: float, eps: float, dtype: torch.dtype, seed: int,
                steps: int, scale: float) -> list[torch.Tensor]:
    """Parameters after each of ``steps`` steps of ``make(params, lr=lr, eps=eps)``.

    The gradients are random (the same for every optimiser with the same seed), of size
    ``scale``: tiny gradients make the place of eps matter.
    """
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g, dtype=dtype).requires_grad_(),
              torch.randn(3, generator=g, dtype=dtype).requires_grad_()]
    optimizer = make(params, lr=lr, eps=eps)
    history = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * scale
        optimizer.step()
        history.append(torch.cat([p.detach().flatten() for p in params]).clone())
    return history


def _reference_variant(eps_inside: bool) -> Callable:
    """A plain AdaGrad (or the eps-inside-the-root slip) for recognising wrong answers."""

    class Variant:
        def __init__(self, params: list[torch.Tensor], lr: float, eps: float) -> None:
            self.params, self.lr, self.eps = params, lr, eps
            self.sums = [torch.zeros_like(p) for p in params]

        @torch.no_grad()
        def step(self) -> None:
            for p, s in zip(self.params, self.sums, strict=True):
                s += p.grad * p.grad
                root = (s + self.eps).sqrt() if eps_inside else s.sqrt() + self.eps
                p -= self.lr * p.grad / root

    return Variant


@grader
def check_adagrad(optimizer_class: Callable[..., torch.optim.Optimizer]) -> bool:
    """Ch. 2, exercise 2: an AdaGrad that matches ``torch.optim.Adagrad``.

    ``optimizer_class(params, lr, eps=1e-10)``; torch's default AdaGrad has no learning
    rate decay and starts its sum of squares at 0. Checked over 30 steps of random
    gradients for several learning rates, epsilons, gradient sizes and both float dtypes.
    Subclassing or calling ``torch.optim.Adagrad`` is not allowed.
    """
    _require_callable(optimizer_class)
    name = getattr(optimizer_class, "__name__", "optimiser")
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Adagrad):
        raise NotYet(f"your {name} subclasses torch.optim.Adagrad; {_TORCH_ADAGRAD.task}.",
                     _TORCH_ADAGRAD.hint)
    rng = fresh_rng()
    cases = [(0.1, 1e-10, torch.float64, 1.0), (0.01, 1e-10, torch.float64, 10.0),
             (0.5, 0.1, torch.float64, 0.01), (0.1, 1e-10, torch.float32, 1.0),
             (rng.choice([0.03, 0.2, 1.0]), 10 ** rng.uniform(-4, -1), torch.float64,
              10 ** rng.uniform(-3, 1))]

    def learner(params: list[torch.Tensor], lr: float, eps: float) -> torch.optim.Optimizer:
        optimizer = optimizer_class(params, lr=lr, eps=eps)
        if isinstance(optimizer, torch.optim.Adagrad):
            raise NotYet(f"your {name} builds a torch.optim.Adagrad; {_TORCH_ADAGRAD.task}.",
                         _TORCH_ADAGRAD.hint)
        return optimizer

    for lr, eps, dtype, scale in cases:
        seed = rng.randrange(2**62)
        ours = call(_trajectory, learner, lr, eps, dtype, seed, 30, scale,
                    label=name, library=_TORCH_ADAGRAD,
                    hint="call it as AdaGrad(params, lr=..., eps=...) and let step() update "
                         "every parameter that has a gradient.")
        torchs = _trajectory(torch.optim.Adagrad, lr, eps, dtype, seed, 30, scale)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        gaps = [float((a - b).abs().max()) for a, b in zip(ours, torchs, strict=True)]
        gap = max(gaps) if all(math.isfinite(x) for x in gaps) else math.inf
        if gap <= tol:
            continue
        label = f"lr={lr:.3g}, eps={eps:.2g}, gradients of size {scale:.2g}, {dtype}"
        inside = _trajectory(_reference_variant(True), lr, eps, dtype, seed, 30, scale)
        if max(float((a - b).abs().max()) for a, b in zip(ours, inside, strict=True)) <= tol:
            hint = ("you put eps inside the square root; torch adds it *after*: "
                    "g / (sqrt(s) + eps). It matters when gradients are small.")
        elif not math.isfinite(gap):
            hint = "your parameters became inf or NaN: add the squared gradient to the sum " \
                   "*before* dividing by its square root."
        else:
            hint = ("keep a per-coordinate running *sum* of squared gradients (not an average), "
                    "add eps after the square root, and update with lr * g / (sqrt(s) + eps).")
        raise NotYet(f"with {label} your parameters drift up to {gap:.3g} away from "
                     "torch's.", hint)
    return _report(True, f"your AdaGrad matches torch.optim.Adagrad over {len(cases)} runs "
                         "of 30 steps.")


@grader
def check_adam_first_step(answer: object) -> bool:
    """Ch. 2, exercise 3: size of Adam's first update with lr = 0.01 and gradient g = 1000."""
    lr, g, eps, beta1, beta2 = 0.01, 1000.0, 1e-8, 0.9, 0.999
    expected = lr * g / (abs(g) + eps)
    uncorrected = lr * ((1 - beta1) * g) / (math.sqrt((1 - beta2) * g * g) + eps)
    return _grade_number(
        "first Adam step", answer, expected,
        {uncorrected: "that is Adam without bias correction: divide m by 1 - beta1 "
                      "and v by 1 - beta2 at step 1.",
         lr * g: "that is plain gradient descent; Adam divides by sqrt(v_hat).",
         (1 - beta1) * lr: "remember the bias correction of m at t = 1.",
         lr / math.sqrt(1 - beta2): "remember the bias correction of v: divide it by "
                                    "1 - beta2 at step 1."},
        rel=1e-4,
    )


def _cosine_phase(t: float, total: float, warmup: float, max_lr: float, min_lr: float,
                  offset: bool = True) -> float:
    progress = (t - warmup) / (total - warmup) if offset else t / total
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


@grader
def check_warmup_cosine_lr(at_step_99: object, at_step_3000: object) -> bool:
    """Ch. 2, exercise 5: two learning rates of a warm-up + cosine schedule.

    S = 10,000 steps, W = 500 warm-up steps, peak 6e-4, floor 6e-5, steps counted from 0,
    with the formula of ``aimodels.optim.warmup_cosine``.
    """
    total, warmup, peak, floor = 10_000, 500, 6e-4, 6e-5
    right_warmup = _judge_number(
        "rate at step 99", at_step_99, peak * (99 + 1) / warmup,
        {peak * 99 / warmup: "steps count from 0, so step 99 is the 100th step: the rate is "
                             "peak * (t + 1) / W.",
         peak: "step 99 is still inside the warm-up (t < W = 500): the rate is still growing.",
         _cosine_phase(99, total, warmup, peak, floor, offset=False):
             "step 99 is still inside the warm-up (t < W = 500): use peak * (t + 1) / W.",
         peak / warmup: "multiply by t + 1 = 100: the rate grows by peak / W per step.",
         floor: "the warm-up starts near 0, not at the floor min_lr: use peak * (t + 1) / W."},
        rel=1e-3,
    )
    try:
        right_decay = _judge_number(
            "rate at step 3000", at_step_3000, _cosine_phase(3000, total, warmup, peak, floor),
            {_cosine_phase(3000, total, warmup, peak, floor, offset=False):
                 "the cosine starts after the warm-up: its progress is (t - W) / (S - W), "
                 "not t / S.",
             _cosine_phase(3000 - warmup, total, 0, peak, floor):
                 "the cosine runs over the S - W steps after the warm-up: divide t - W by "
                 "S - W, not by S.",
             _cosine_phase(3000, total, warmup, peak, 0.0):
                 "the cosine ends at the floor 6e-5, not at 0: add min_lr and scale by "
                 "(max_lr - min_lr).",
             peak - (peak - floor) * (3000 - warmup) / (total - warmup):
                 "that is a linear decay; this schedule follows half a cosine: "
                 "min + (max - min) (1 + cos(pi p)) / 2.",
             0.5 * (peak - floor) * (1 + math.cos((3000 - warmup) / (total - warmup))):
                 "put pi inside the cosine, cos(pi p), and add the floor min_lr."},
            rel=0.005,
        )
    except NotYet as wrong:
        raise NotYet(f"the warm-up rate is right; {wrong.message}", wrong.hint) from None
    return _report(True, f"{right_warmup[:-1]}, {right_decay}")


@grader
def check_clipped_gradient(total_norm: object, length_a: object) -> bool:
    """Ch. 2, exercise 6: global-norm clipping of g_a = (3, 4) and g_b = (0, 12) to 2.6.

    The two answers: the norm ``clip_grad_norm_`` returns, and the length of g_a after it.
    """
    norm_a, norm_b, max_norm = 5.0, 12.0, 2.6
    total = math.hypot(norm_a, norm_b)  # 13: all four entries as one vector
    right_total = _judge_number(
        "returned norm", total_norm, total,
        {max_norm: "clip_grad_norm_ returns the norm *before* clipping, so that you can log "
                   "how large the gradients really were.",
         norm_a + norm_b: "you added the two norms; the global norm is the norm of all "
                          "entries as one vector: sqrt(5^2 + 12^2).",
         3 + 4 + 12: "that is the L1 norm (sum of absolute values); norm_type=2 means the "
                     "Euclidean length sqrt(3^2 + 4^2 + 0^2 + 12^2).",
         total**2: "take the square root of the sum of squares.",
         norm_b: "that is the largest single norm; the global norm combines both gradients."},
        rel=1e-3,
    )
    try:
        right_length = _judge_number(
            "length of g_a after clipping", length_a, norm_a * max_norm / (total + 1e-6),
            {max_norm: "that is clipping each tensor on its own; clip_grad_norm_ scales every "
                       "gradient by the same factor max_norm / total_norm.",
             norm_a: "the total norm 13 is above 2.6, so every gradient is scaled down.",
             max_norm / total: "that is the scale factor; multiply it by the length of g_a.",
             norm_a * max_norm / (norm_a + norm_b): "the factor uses the global norm "
                                                    "sqrt(5^2 + 12^2) = 13, not 5 + 12.",
             norm_a * max_norm / 19: "the factor uses the Euclidean global norm 13, not the "
                                     "L1 norm 19."},
            rel=1e-3,
        )
    except NotYet as wrong:
        raise NotYet(f"the returned norm is right; {wrong.message}", wrong.hint) from None
    return _report(True, f"{right_total[:-1]}, {right_length}")
