"""Chapter 2 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels import exercises as ex
from aimodels import optim


# --------------------------------------------------------------------------- answers
def cosine(t, warmup, total, floor, peak=6e-4):  # the cosine part of optim.warmup_cosine
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


COSINE_3000 = cosine(3000, 500, 10_000, 6e-5)


class AdaGrad(optim.ScratchOptimizer):  # the notebook's solution
    def __init__(self, params, lr, eps=1e-10):
        super().__init__(params, {"lr": lr, "eps": eps})

    def update(self, param, grad, state, group):
        total = state.setdefault("sum", torch.zeros_like(param))
        total.addcmul_(grad, grad)
        param.addcdiv_(grad, total.sqrt().add_(group["eps"]), value=-group["lr"])


class PlainAdaGrad(torch.optim.Optimizer):  # from scratch on torch's base class
    def __init__(self, params, lr, eps=1e-10):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p].setdefault("s", torch.zeros_like(p))
                s += p.grad**2
                p -= group["lr"] * p.grad / (s.sqrt() + group["eps"])


class NoSquare(AdaGrad):
    def update(self, param, grad, state, group):
        state.setdefault("sum", torch.zeros_like(param)).add_(grad.abs())
        param.addcdiv_(grad, state["sum"].add(group["eps"]), value=-group["lr"])


class EpsInsideRoot(AdaGrad):
    def update(self, param, grad, state, group):
        total = state.setdefault("sum", torch.zeros_like(param)).addcmul_(grad, grad)
        param.addcdiv_(grad, total.add(group["eps"]).sqrt(), value=-group["lr"])


class MovingAverage(AdaGrad):  # that is RMSProp
    def update(self, param, grad, state, group):
        avg = state.setdefault("sum", torch.zeros_like(param)).mul_(0.99).addcmul_(grad, grad, value=0.01)
        param.addcdiv_(grad, avg.sqrt().add_(group["eps"]), value=-group["lr"])


class Float32State(AdaGrad):  # torch.zeros(shape) is float32 whatever the parameter
    def update(self, param, grad, state, group):
        total = state.setdefault("sum", torch.zeros(param.shape))
        total.addcmul_(grad.float(), grad.float())
        param.addcdiv_(grad, total.sqrt().add_(group["eps"]).to(param.dtype), value=-group["lr"])


class FixedLearningRate(AdaGrad):
    def update(self, param, grad, state, group):
        total = state.setdefault("sum", torch.zeros_like(param)).addcmul_(grad, grad)
        param.addcdiv_(grad, total.sqrt().add_(group["eps"]), value=-0.1)


class SubclassesTorch(torch.optim.Adagrad):
    def __init__(self, params, lr, eps=1e-10):
        super().__init__(params, lr=lr, eps=eps)


class WrapsTorch(optim.ScratchOptimizer):
    def __init__(self, params, lr, eps=1e-10):
        params = list(params)
        super().__init__(params, {"lr": lr, "eps": eps})
        self.inner = torch.optim.Adagrad(params, lr=lr, eps=eps)

    def step(self, closure=None):
        return self.inner.step()


def torch_factory(params, lr, eps=1e-10):
    return torch.optim.Adagrad(params, lr=lr, eps=eps)


class StubAdaGrad(optim.ScratchOptimizer):  # the student edition's stub
    def __init__(self, params, lr, eps=1e-10):
        raise NotImplementedError("write your solution here")

    def update(self, param, grad, state, group):
        raise NotImplementedError("write your solution here")


class StubUpdate(AdaGrad):  # __init__ written, update still a stub
    def update(self, param, grad, state, group):
        raise NotImplementedError("write your solution here")


class BrokenUpdate(AdaGrad):
    def update(self, param, grad, state, group):
        raise TypeError("unsupported operand type(s)")


WRONG = [
    wrong(ex.check_max_stable_lr, 0.25, expect=["1/λ"], id="lr-one-over-lambda"),
    wrong(ex.check_max_stable_lr, 1.0, expect=["f''(x) = 4"], id="lr-curvature-2"),
    wrong(ex.check_max_stable_lr, 2.0, expect=["λ = f''(x) = 4"], id="lr-curvature-1"),
    wrong(ex.check_max_stable_lr, 4.0, expect=["2/λ"], id="lr-the-curvature"),
    wrong(ex.check_adagrad, NoSquare, expect=["drift"], id="adagrad-no-square"),
    wrong(ex.check_adagrad, EpsInsideRoot, expect=["eps inside the square root"], id="adagrad-eps-inside-root"),
    wrong(ex.check_adagrad, MovingAverage, expect=["*sum*"], id="adagrad-moving-average"),
    wrong(ex.check_adagrad, Float32State, expect=["drift"], id="adagrad-float32-state"),
    wrong(ex.check_adagrad, FixedLearningRate, expect=["drift"], id="adagrad-fixed-lr"),
    wrong(ex.check_adagrad, SubclassesTorch, expect=["subclasses torch.optim.Adagrad"], id="adagrad-subclasses-torch"),
    wrong(ex.check_adagrad, WrapsTorch, expect=["calls torch.optim.Adagrad", "update rule"], id="adagrad-wraps-torch"),
    wrong(ex.check_adagrad, torch_factory, expect=["torch.optim.Adagrad"], id="adagrad-torch-factory"),
    wrong(ex.check_adam_first_step, 0.01 * 0.1 / 0.001**0.5, expect=["without bias correction"], id="adam-no-bias-correction"),
    wrong(ex.check_adam_first_step, 10.0, expect=["plain gradient descent"], id="adam-plain-gd"),
    wrong(ex.check_adam_first_step, 0.001, expect=["bias correction of m"], id="adam-m-uncorrected"),
    wrong(ex.check_adam_first_step, 0.01 / 0.001**0.5, expect=["bias correction of v"], id="adam-v-uncorrected"),
    wrong(ex.ch02.check_warmup_cosine_lr, 6e-4 * 99 / 500, COSINE_3000, expect=["100th step"], id="warmup-off-by-one"),
    wrong(ex.ch02.check_warmup_cosine_lr, 6e-4, COSINE_3000, expect=["inside the warm-up"], id="warmup-at-peak"),
    wrong(ex.ch02.check_warmup_cosine_lr, 6e-5, COSINE_3000, expect=["not at the floor"], id="warmup-from-floor"),
    wrong(ex.ch02.check_warmup_cosine_lr, 1.2e-4, cosine(3000, 0, 10_000, 6e-5), expect=["warm-up rate is right", "(t - W) / (S - W)"], id="cosine-no-offset"),
    wrong(ex.ch02.check_warmup_cosine_lr, 1.2e-4, cosine(2500, 0, 10_000, 6e-5), expect=["S - W, not by S"], id="cosine-over-S"),
    wrong(ex.ch02.check_warmup_cosine_lr, 1.2e-4, cosine(3000, 500, 10_000, 0.0), expect=["floor 6e-5"], id="cosine-no-floor"),
    wrong(ex.ch02.check_warmup_cosine_lr, 1.2e-4, 6e-4 - 5.4e-4 * 2500 / 9500, expect=["linear decay"], id="cosine-linear"),
    wrong(ex.ch02.check_warmup_cosine_lr, 1.2e-4, 3e-4, expect=["warm-up rate is right"], id="cosine-guess"),
    wrong(ex.ch02.check_clipped_gradient, 2.6, 1.0, expect=["*before* clipping"], id="clip-returns-after"),
    wrong(ex.ch02.check_clipped_gradient, 17, 1.0, expect=["added the two norms"], id="clip-sum-of-norms"),
    wrong(ex.ch02.check_clipped_gradient, 19, 1.0, expect=["L1 norm"], id="clip-l1"),
    wrong(ex.ch02.check_clipped_gradient, 169, 1.0, expect=["square root"], id="clip-squared"),
    wrong(ex.ch02.check_clipped_gradient, 13, 2.6, expect=["norm is right", "each tensor on its own"], id="clip-per-tensor"),
    wrong(ex.ch02.check_clipped_gradient, 13, 5.0, expect=["scaled down"], id="clip-not-applied"),
    wrong(ex.ch02.check_clipped_gradient, 13, 0.2, expect=["scale factor"], id="clip-the-factor"),
    wrong(ex.ch02.check_clipped_gradient, 13, 5 * 2.6 / 17, expect=["not 5 + 12"], id="clip-factor-from-sum"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_max_stable_lr, 2 / 4)
    accepts(capsys, ex.check_adam_first_step, 0.01 * 1000 / (1000 + 1e-8))
    for answer in (AdaGrad, PlainAdaGrad):
        accepts(capsys, ex.check_adagrad, answer)
    accepts(capsys, ex.ch02.check_warmup_cosine_lr, 6e-4 * (99 + 1) / 500, COSINE_3000)
    accepts(capsys, ex.ch02.check_warmup_cosine_lr, optim.warmup_cosine(99, 10_000, 6e-4, 500, 6e-5),
            torch.tensor(optim.warmup_cosine(3000, 10_000, 6e-4, 500, 6e-5)))
    accepts(capsys, ex.ch02.check_warmup_cosine_lr, 1.2e-4, 5.129e-4)  # rounded to 4 digits
    accepts(capsys, ex.ch02.check_clipped_gradient, 13.0, 1.0)
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    total = torch.nn.utils.clip_grad_norm_([a, b], max_norm=2.6)
    accepts(capsys, ex.ch02.check_clipped_gradient, total, a.grad.norm())


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", [ex.check_max_stable_lr, ex.check_adam_first_step])
@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, check, answer):
    rejects(capsys, check, answer, expect=["write your solution first"])


@pytest.mark.parametrize("check", [ex.ch02.check_warmup_cosine_lr, ex.ch02.check_clipped_gradient])
@pytest.mark.parametrize("answer", [..., None, "0.1", [1.0]])
def test_two_number_graders_reject_stubs_and_non_numbers(capsys, check, answer):
    rejects(capsys, check, answer, answer, expect=["Hint: "])
    right_first = (1.2e-4, 13.0)[check is ex.ch02.check_clipped_gradient]
    rejects(capsys, check, right_first, answer, expect=["is right"])


def test_class_stubs_and_errors_get_not_yet(capsys):
    for answer in (StubAdaGrad, StubUpdate, stub):
        rejects(capsys, ex.check_adagrad, answer, expect=["not written yet", "write your solution first"])
    for answer in (BrokenUpdate, broken):
        rejects(capsys, ex.check_adagrad, answer, expect=["raised TypeError: unsupported operand"])
    rejects(capsys, ex.check_adagrad, ..., expect=["write your solution first"])


def test_the_grader_leaves_the_global_random_state_alone(capsys):
    state = torch.get_rng_state()
    accepts(capsys, ex.check_adagrad, AdaGrad)
    assert torch.equal(state, torch.get_rng_state())


def test_every_chapter_2_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch02.__all__) and min(counts.values()) >= 2
