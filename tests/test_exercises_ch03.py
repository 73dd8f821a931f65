"""Chapter 3 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch.nn import functional as F

from aimodels import exercises as ex
from aimodels import mlp


# --------------------------------------------------------------------------- answers
def ce_grad(logits, targets):  # the notebook's solution
    one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return (mlp.softmax(logits, dim=1) - one_hot) / logits.shape[0]


def ce_grad_torch_softmax(logits, targets):
    return (torch.softmax(logits, -1) - F.one_hot(targets, logits.shape[-1])) / len(logits)


def ce_sum(logits, targets):
    return ce_grad(logits, targets) * logits.shape[0]


def ce_sign(logits, targets):
    return -ce_grad(logits, targets)


def ce_wrong_axis(logits, targets):
    return (torch.softmax(logits, 0) - F.one_hot(targets, logits.shape[1])) / logits.shape[0]


def ce_one_hot_guesses_classes(logits, targets):
    return (torch.softmax(logits, 1) - F.one_hot(targets)) / logits.shape[0]


def ce_float32(logits, targets):
    return (torch.softmax(logits.float(), 1) - F.one_hot(targets, logits.shape[1])) / len(logits)


def ce_autograd(logits, targets):
    logits = logits.clone().requires_grad_(True)
    F.cross_entropy(logits, targets).backward()
    return logits.grad


def ce_autograd_grad(logits, targets):
    logits = logits.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(logits, targets), logits)[0]


def ce_functorch(logits, targets):
    return torch.func.grad(lambda z: F.cross_entropy(z, targets))(logits)


def numerical_grad(f, x, h):  # the notebook's solution
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def numerical_grad_in_place(f, x, h):  # perturbs x itself and restores it
    grad = torch.empty_like(x)
    for i in range(len(x)):
        old = x[i].item()
        x[i] = old + h
        plus = f(x)
        x[i] = old - h
        minus = f(x)
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def forward_difference(f, x, h):
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x)) / h
    return grad


def backward_difference(f, x, h):
    return forward_difference(f, x, -h)


def divides_by_h(f, x, h):
    return 2 * numerical_grad(f, x, h)


def float32_result(f, x, h):
    grad = torch.zeros(x.shape)  # float32, whatever x is
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def forgets_to_restore(f, x, h):
    grad, x = torch.zeros_like(x), x.clone()
    for i in range(len(x)):
        x[i] += h
        plus = f(x)
        x[i] -= 2 * h
        grad[i] = (plus - f(x)) / (2 * h)  # x[i] stays at x_i - h for the next coordinates
    return grad


def autograd_instead(f, x, h):
    x = x.clone().requires_grad_(True)
    f(x).backward()
    return x.grad


def jacobian_instead(f, x, h):
    return torch.autograd.functional.jacobian(f, x)


def two_layer_grads(params, X, y):  # the notebook's solution
    Z1 = X @ params["W1"].T + params["b1"]
    H1 = mlp.sigmoid(Z1)
    Z2 = H1 @ params["W2"].T + params["b2"]
    H2 = mlp.sigmoid(Z2)
    Z3 = H2 @ params["W3"].T + params["b3"]
    delta3 = (mlp.softmax(Z3, dim=1) - F.one_hot(y, Z3.shape[1]).to(Z3.dtype)) / X.shape[0]
    delta2 = (delta3 @ params["W3"]) * mlp.sigmoid_grad(Z2)
    delta1 = (delta2 @ params["W2"]) * mlp.sigmoid_grad(Z1)
    return {"W3": delta3.T @ H2, "b3": delta3.sum(0), "W2": delta2.T @ H1, "b2": delta2.sum(0),
            "W1": delta1.T @ X, "b1": delta1.sum(0)}


def two_layer_loop(params, X, y):  # a loop over layers, with torch's own softmax
    hs, zs = [X], []
    for i in (1, 2, 3):
        zs.append(hs[-1] @ params[f"W{i}"].T + params[f"b{i}"])
        hs.append(torch.sigmoid(zs[-1]))
    delta = (torch.softmax(zs[-1], 1) - F.one_hot(y, zs[-1].shape[1])) / len(X)
    grads = {}
    for i in (3, 2, 1):
        grads[f"W{i}"], grads[f"b{i}"] = delta.T @ hs[i - 1], delta.sum(0)
        if i > 1:
            delta = (delta @ params[f"W{i}"]) * hs[i - 1] * (1 - hs[i - 1])
    return grads


def _variant(**changes):
    def grads(params, X, y):
        Z1 = X @ params["W1"].T + params["b1"]
        H1 = torch.sigmoid(Z1)
        Z2 = H1 @ params["W2"].T + params["b2"]
        H2 = torch.sigmoid(Z2)
        Z3 = H2 @ params["W3"].T + params["b3"]
        delta3 = torch.softmax(Z3, 1) - F.one_hot(y, Z3.shape[1]).to(Z3.dtype)
        if not changes.get("sum"):
            delta3 = delta3 / len(X)
        slope = changes.get("slope", lambda Z, H: H * (1 - H))
        delta2 = (delta3 @ params["W3"]) * slope(Z2, H2)
        delta1 = (delta2 @ params["W2"]) * slope(Z1, H1)
        out = {"W3": delta3.T @ H2, "b3": delta3.sum(0), "W2": delta2.T @ H1,
               "b2": delta2.sum(0), "W1": delta1.T @ X, "b1": delta1.sum(0)}
        if changes.get("transposed"):
            out["W1"] = X.T @ delta1
        if changes.get("wrong_input"):
            out["W2"] = delta2.T @ H2 if H2.shape[1] == H1.shape[1] else delta2.T @ H1 * 0
        if changes.get("missing"):
            del out["b1"]
        return out

    return grads


def two_layer_autograd(params, X, y):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    H1 = torch.sigmoid(X @ leaves["W1"].T + leaves["b1"])
    H2 = torch.sigmoid(H1 @ leaves["W2"].T + leaves["b2"])
    F.cross_entropy(H2 @ leaves["W3"].T + leaves["b3"], y).backward()
    return {k: v.grad for k, v in leaves.items()}


def inverted_dropout(x, keep, p, training):  # the notebook's solution
    if not training:
        return x
    return x * keep / (1 - p)


def dropout_where(x, keep, p, training):
    return torch.where(keep, x / (1 - p), torch.zeros_like(x)) if training else x


def dropout_in_place(x, keep, p, training):
    if training:
        x.mul_(keep).div_(1 - p)
    return x


def dropout_float32(x, keep, p, training):
    return (x * keep / (1 - p)).float() if training else x.float()


WRONG = [
    wrong(ex.check_ce_grad, ce_sum, expect=["*mean*"], id="ce-sum-not-mean"),
    wrong(ex.check_ce_grad, ce_sign, expect=["sign"], id="ce-sign-flipped"),
    wrong(ex.check_ce_grad, ce_wrong_axis, expect=["last axis"], id="ce-softmax-over-batch"),
    wrong(ex.check_ce_grad, ce_one_hot_guesses_classes, expect=["num_classes"], id="ce-one-hot-without-num-classes"),
    wrong(ex.check_ce_grad, ce_float32, expect=["dtype"], id="ce-float32"),
    wrong(ex.check_ce_grad, ce_autograd, expect=["calls autograd", "by hand"], id="ce-backward"),
    wrong(ex.check_ce_grad, ce_autograd_grad, expect=["calls autograd"], id="ce-autograd-grad"),
    wrong(ex.check_ce_grad, ce_functorch, expect=["calls autograd"], id="ce-torch-func-grad"),
    wrong(ex.check_double_softmax_floor, math.log(10), expect=["uniform"], id="floor-uniform"),
    wrong(ex.check_double_softmax_floor, 0.0, expect=["probabilities"], id="floor-zero"),
    wrong(ex.check_double_softmax_floor, -math.log(math.e / (math.e + 1)), expect=["9 wrong classes"], id="floor-one-wrong-class"),
    wrong(ex.check_double_softmax_floor, math.log(math.e + 9), expect=["subtract"], id="floor-forgot-true-logit"),
    wrong(ex.check_numerical_grad, forward_difference, expect=["one-sided"], id="fd-forward-difference"),
    wrong(ex.check_numerical_grad, backward_difference, expect=["one-sided"], id="fd-backward-difference"),
    wrong(ex.check_numerical_grad, divides_by_h, expect=["2h apart"], id="fd-divides-by-h"),
    wrong(ex.check_numerical_grad, float32_result, expect=["dtype"], id="fd-float32-result"),
    wrong(ex.check_numerical_grad, forgets_to_restore, expect=["expected"], id="fd-forgets-to-restore-x"),
    wrong(ex.check_numerical_grad, lambda f, x, h: torch.zeros_like(x), expect=["expected"], id="fd-zeros"),
    wrong(ex.check_numerical_grad, autograd_instead, expect=["calls autograd", "finite differences"], id="fd-autograd"),
    wrong(ex.check_numerical_grad, jacobian_instead, expect=["calls autograd"], id="fd-jacobian"),
    wrong(ex.ch03.check_two_layer_grads, _variant(sum=True), expect=["*mean*"], id="two-sum-not-mean"),
    wrong(ex.ch03.check_two_layer_grads, _variant(slope=lambda Z, H: torch.sigmoid(H) * (1 - torch.sigmoid(H))), expect=["applied sigmoid_grad to H"], id="two-slope-of-H"),
    wrong(ex.ch03.check_two_layer_grads, _variant(slope=lambda Z, H: torch.ones_like(Z)), expect=["slope at its own layer"], id="two-no-slope"),
    wrong(ex.ch03.check_two_layer_grads, _variant(transposed=True), expect=["expected a tensor of shape", "parameter's shape"], id="two-transposed"),
    wrong(ex.ch03.check_two_layer_grads, _variant(wrong_input=True), expect=["gradient W2 is wrong", "layers above are right"], id="two-wrong-input"),
    wrong(ex.ch03.check_two_layer_grads, _variant(missing=True), expect=["expected a dict with the keys"], id="two-missing-key"),
    wrong(ex.ch03.check_two_layer_grads, two_layer_autograd, expect=["calls autograd"], id="two-autograd"),
    wrong(ex.ch03.check_two_layer_grads, lambda p, X, y: {k: v.float() for k, v in two_layer_grads(p, X, y).items()}, expect=["not float64"], id="two-float32"),
    wrong(ex.ch03.check_he_std, 2 / 512, expect=["variance"], id="he-variance-not-std"),
    wrong(ex.ch03.check_he_std, math.sqrt(1 / 512), expect=["half of its inputs"], id="he-lecun"),
    wrong(ex.ch03.check_he_std, math.sqrt(2 / 128), expect=["fan_in by default"], id="he-fan-out"),
    wrong(ex.ch03.check_he_std, math.sqrt(2 / 640), expect=["Xavier's normal"], id="he-xavier-normal"),
    wrong(ex.ch03.check_he_std, math.sqrt(6 / 512), expect=["*uniform*"], id="he-uniform-bound"),
    wrong(ex.ch03.check_he_std, math.sqrt(6 / 640), expect=["Xavier's uniform"], id="he-xavier-uniform"),
    wrong(ex.ch03.check_he_std, 0.5, expect=["off by a factor"], id="he-unrelated"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * keep if t else x, expect=["1 / (1 - p)"], id="dropout-no-scale"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * keep / p if t else x, expect=["probability of *dropping*"], id="dropout-divides-by-p"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * keep * (1 - p) if t else x, expect=["old convention"], id="dropout-multiplies"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * ~keep / (1 - p) if t else x, expect=["*survive*"], id="dropout-inverted-mask"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * keep / (1 - p) if t else x / (1 - p), expect=["identity"], id="dropout-scales-in-eval"),
    wrong(ex.ch03.check_inverted_dropout, lambda x, keep, p, t: x * keep / (1 - p), expect=["nothing is dropped"], id="dropout-masks-in-eval"),
    wrong(ex.ch03.check_inverted_dropout, dropout_in_place, expect=["in place"], id="dropout-in-place"),
    wrong(ex.ch03.check_inverted_dropout, dropout_float32, expect=["dtype"], id="dropout-float32"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_double_softmax_floor, math.log(math.e + 9) - 1)
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_ce_grad, ce_grad)
        accepts(capsys, ex.check_ce_grad, ce_grad_torch_softmax)
        accepts(capsys, ex.check_numerical_grad, numerical_grad)
        accepts(capsys, ex.check_numerical_grad, numerical_grad_in_place)
        accepts(capsys, ex.ch03.check_two_layer_grads, two_layer_grads)
        accepts(capsys, ex.ch03.check_two_layer_grads, two_layer_loop)
        accepts(capsys, ex.ch03.check_inverted_dropout, inverted_dropout)
        accepts(capsys, ex.ch03.check_inverted_dropout, dropout_where)
    accepts(capsys, ex.ch03.check_he_std, math.sqrt(2 / 512))
    accepts(capsys, ex.ch03.check_he_std, torch.nn.init.calculate_gain("relu") / math.sqrt(512))


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_double_softmax_floor, answer, expect=["write your solution first"])
    rejects(capsys, ex.ch03.check_he_std, answer, expect=["write your solution first"])


@pytest.mark.parametrize("check", [ex.check_ce_grad, ex.check_numerical_grad,
                                   ex.ch03.check_two_layer_grads, ex.ch03.check_inverted_dropout])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])
    expect = "a dict with the keys" if check is ex.ch03.check_two_layer_grads else "a tensor of shape"
    rejects(capsys, check, lambda *args: [0.0], expect=["expected " + expect])


def test_every_chapter_3_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch03.__all__) and min(counts.values()) >= 2
