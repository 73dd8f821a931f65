"""Chapter 3 graders: back-propagation by hand and gradient checking."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F  # noqa: N812

from ._common import (
    AUTOGRAD,
    Library,
    NotYet,
    _close,
    _expect_tensor,
    _grade_number,
    _report,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

__all__ = [
    "check_ce_grad",
    "check_double_softmax_floor",
    "check_he_std",
    "check_inverted_dropout",
    "check_numerical_grad",
    "check_two_layer_grads",
]

_AUTOGRAD_CE = Library(
    task="the exercise asks for the gradient by hand, without autograd",
    hint="the gradient of the mean cross-entropy is (softmax(logits) - onehot(targets)) / batch.",
    torch=AUTOGRAD,
)


def _guessed_classes(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The slip ``F.one_hot(targets)`` without num_classes, where it broadcasts."""
    one_hot = F.one_hot(targets)
    if one_hot.shape[1] not in (1, logits.shape[1]):
        return torch.full_like(logits, math.nan)
    return (torch.softmax(logits, 1) - one_hot) / len(logits)


@grader
def check_ce_grad(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Ch. 3, exercise 1: ``fn(logits, targets)`` returns d(mean cross-entropy)/d(logits).

    Checked against autograd on fixed and random batches, in float32 and float64,
    including batches whose targets miss the last classes. Autograd itself is not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    cases = [(1, 2, torch.float64), (4, 3, torch.float64), (16, 10, torch.float64),
             (5, 7, torch.float32), (6, 9, "few"),
             (rng.randint(1, 32), rng.randint(2, 20), torch.float64),
             (rng.randint(1, 32), rng.randint(2, 20), torch.float32)]
    for batch, classes, kind in cases:
        dtype = torch.float64 if kind == "few" else kind
        logits = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * 5).to(dtype)
        high = classes - 3 if kind == "few" else classes  # the last classes never appear
        targets = torch.randint(0, high, (batch,), generator=g)
        leaf = logits.clone().requires_grad_(True)
        F.cross_entropy(leaf, targets).backward()
        expected = leaf.grad
        where = f"a batch of {batch} with {classes} classes ({dtype})"
        got = call(fn, logits.clone(), targets.clone(), library=_AUTOGRAD_CE,
                   hint="one_hot needs num_classes=logits.shape[1], and the result must have "
                        "the shape of the logits.")
        got = _expect_tensor(got, tuple(logits.shape), where,
                             "return one gradient per logit: the shape of the logits.")
        tol = 1e-10 if dtype == torch.float64 else 1e-6
        if _close(got, expected, tol):
            continue
        if _close(got, expected * batch, tol * batch):
            hint = "the loss is a *mean* over the batch: divide by the batch size."
        elif _close(got, -expected, tol):
            hint = "the sign is flipped: the gradient is softmax(logits) - onehot(targets)."
        elif _close(got, (torch.softmax(logits, 0) - F.one_hot(targets, classes)) / batch, tol):
            hint = "softmax runs over the classes, the last axis (dim=1), not over the batch."
        elif _close(got, _guessed_classes(logits, targets), tol):
            hint = ("give one_hot num_classes=logits.shape[1]: without it, it makes only "
                    "max(targets) + 1 columns.")
        elif _close(got, expected, 1e-5, 1e-5) and got.dtype != logits.dtype:
            hint = f"keep the logits' dtype ({logits.dtype}) for the result."
        else:
            hint = "the gradient is (softmax(logits) - onehot(targets)) / batch."
        raise NotYet(f"wrong for {where}.", hint)
    return _report(True, "your gradient matches autograd for all batch and class sizes.")


@grader
def check_double_softmax_floor(answer: object) -> bool:
    """Ch. 3, exercise 2: lowest CrossEntropyLoss with 10 classes when fed probabilities."""
    expected = math.log(math.e + 9) - 1
    return _grade_number(
        "loss floor", answer, expected,
        {0.0: "the inputs are probabilities in [0, 1], so the best logit gap is 1, not infinite.",
         math.log(10): "that is the loss of a uniform guess; the model can still do a bit better.",
         -math.log(math.e / (math.e + 1)): "there are 9 wrong classes, each contributing e^0 = 1.",
         math.log(math.e + 9): "the true class's logit is 1: subtract it, -log(e / (e + 9))."},
        rel=1e-3,
    )


_AUTOGRAD_FD = Library(
    task="the exercise asks for finite differences, which check autograd rather than use it",
    hint="perturb one coordinate at a time: (f(x + h e_i) - f(x - h e_i)) / (2h).",
    torch=AUTOGRAD,
)


Scalar = Callable[[torch.Tensor], torch.Tensor]


def _functions(rng_matrix: torch.Tensor) -> list[tuple[str, Scalar]]:
    return [
        ("sum(x**2)", lambda x: (x**2).sum()),
        ("prod(sin(x))", lambda x: torch.sin(x).prod()),
        ("logsumexp(x)", lambda x: torch.logsumexp(x, 0)),
        ("sum(exp(x) * x**3)", lambda x: (torch.exp(x) * x**3).sum()),
        ("x @ A @ x", lambda x: x @ rng_matrix[: len(x), : len(x)] @ x),
    ]


def _central(f: Callable, x: torch.Tensor, h: float, sides: tuple[float, float] = (1, -1),
             ) -> torch.Tensor:
    """(f(x + a h e_i) - f(x + b h e_i)) / ((a - b) h) per coordinate; central for (1, -1)."""
    a, b = sides
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + a * step) - f(x + b * step)) / ((a - b) * h)
    return grad


@grader
def check_numerical_grad(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 3, exercise 3: ``fn(f, x, h)`` returns the central-difference gradient of f at x.

    ``x`` is a 1-D float64 tensor. Checked on several functions, random points and steps
    h from 1e-3 to 1e-6: at h = 1e-3 a one-sided difference is off by about h / 2 times
    the curvature, far more than the central difference's rounding. Autograd is not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    functions = _functions(torch.randn(6, 6, generator=g, dtype=torch.float64))
    fixed = [(0, [1.0, -2.0, 3.0], 1e-6), (1, [0.3, 1.1], 1e-6), (2, [1.0, 2.0, -1.0], 1e-6),
             (0, [1.0, -2.0, 3.0], 1e-3), (3, [0.5, -0.7], 1e-3), (4, [0.2, -1.0, 0.4], 1e-4)]
    randoms = [(rng.randrange(len(functions)),
                torch.randn(rng.randint(1, 6), generator=g, dtype=torch.float64).tolist(),
                rng.choice([1e-3, 1e-4])) for _ in range(4)]
    for index, values, h in fixed + randoms:
        name, f = functions[index]
        x = torch.tensor(values, dtype=torch.float64)
        expected = _central(f, x, h)
        where = f"f = {name} at x = {[round(v, 3) for v in values]} with h = {h:g}"
        got = call(fn, f, x.clone(), h, library=_AUTOGRAD_FD,
                   hint="x is a 1-D tensor: loop over its coordinates, perturbing one at a time.")
        got = _expect_tensor(got, tuple(x.shape), where,
                             "return one partial derivative per coordinate of x.")
        tol = 1e-9 + 1e-12 / h * (1 + abs(float(f(x))))
        if _close(got, expected, tol):
            continue
        if any(_close(got, _central(f, x, h, sides), tol) for sides in ((1, 0), (0, -1))):
            hint = ("that is a one-sided difference, (f(x + h e_i) - f(x)) / h; the exercise "
                    "asks for the central one, (f(x + h e_i) - f(x - h e_i)) / (2h), whose "
                    "error shrinks like h² instead of h.")
        elif _close(got, 2 * expected, 2 * tol):
            hint = "divide by 2h: the two points x + h e_i and x - h e_i are 2h apart."
        elif got.dtype != x.dtype:
            hint = (f"keep x's dtype ({x.dtype}), e.g. torch.zeros_like(x): {got.dtype} loses "
                    "the digits a difference of two close values needs.")
        else:
            hint = "perturb one coordinate at a time: (f(x + h e_i) - f(x - h e_i)) / (2h)."
        raise NotYet(f"{where}: got {[float(f'{v:.6g}') for v in got.tolist()]}, expected "
                     f"{[float(f'{v:.6g}') for v in expected.tolist()]}.", hint)
    return _report(True, "your central differences agree with the formula at every step size.")


# --------------------------------------------------------------------------- two hidden layers
_AUTOGRAD_TWO = Library(
    task="the exercise asks for the backward pass by hand, without autograd",
    hint="start from delta3 = (softmax(Z3) - onehot(y)) / batch and go down one layer at a time.",
    torch=AUTOGRAD,
)
_TWO_LAYER_KEYS = ("W1", "b1", "W2", "b2", "W3", "b3")


def _two_layer_reference(params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor,
                         slip: str = "") -> dict[str, torch.Tensor]:
    """Hand-written gradients of the 2-hidden-layer sigmoid MLP, or a named slip of them."""
    Z1 = X @ params["W1"].T + params["b1"]
    H1 = torch.sigmoid(Z1)
    Z2 = H1 @ params["W2"].T + params["b2"]
    H2 = torch.sigmoid(Z2)
    Z3 = H2 @ params["W3"].T + params["b3"]

    def slope(Z: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        if slip == "slope-of-H":
            return torch.sigmoid(H) * (1 - torch.sigmoid(H))
        return torch.ones_like(Z) if slip == "no-slope" else H * (1 - H)

    delta3 = torch.softmax(Z3, 1) - F.one_hot(y, Z3.shape[1]).to(Z3.dtype)
    if slip != "sum":
        delta3 = delta3 / X.shape[0]
    delta2 = (delta3 @ params["W3"]) * slope(Z2, H2)
    delta1 = (delta2 @ params["W2"]) * slope(Z1, H1)
    return {"W3": delta3.T @ H2, "b3": delta3.sum(0), "W2": delta2.T @ H1, "b2": delta2.sum(0),
            "W1": delta1.T @ X, "b1": delta1.sum(0)}


def _autograd_two_layer(params: dict[str, torch.Tensor], X: torch.Tensor,
                        y: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    H1 = torch.sigmoid(X @ leaves["W1"].T + leaves["b1"])
    H2 = torch.sigmoid(H1 @ leaves["W2"].T + leaves["b2"])
    F.cross_entropy(H2 @ leaves["W3"].T + leaves["b3"], y).backward()
    return {k: v.grad for k, v in leaves.items()}


_TWO_LAYER_SLIPS = {
    "sum": "the loss is a *mean* over the batch: divide delta3 by the batch size.",
    "slope-of-H": ("σ'(Z) = σ(Z)(1 - σ(Z)) = H (1 - H): you applied sigmoid_grad to H, which "
                   "takes the derivative at σ(Z) instead of at Z."),
    "no-slope": ("each delta needs the sigmoid's slope at its own layer: "
                 "delta2 = (delta3 @ W3) * σ'(Z2), delta1 = (delta2 @ W2) * σ'(Z1)."),
}


@grader
def check_two_layer_grads(fn: Callable[..., dict]) -> bool:
    """Ch. 3, exercise 4: ``fn(params, X, y)`` returns the gradients of a two-hidden-layer MLP.

    The network is ``Z1 = X W1ᵀ + b1, H1 = σ(Z1), Z2 = H1 W2ᵀ + b2, H2 = σ(Z2),
    Z3 = H2 W3ᵀ + b3`` with the mean cross-entropy of ``Z3`` against ``y``. The answer is a
    dict with the keys W1, b1, W2, b2, W3, b3, each of its parameter's shape. Checked
    against autograd on several widths (equal and unequal) and batch sizes, in float64.
    Autograd itself is not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    sizes = [(3, 4, 5, 2, 6), (5, 7, 3, 4, 1), (4, 6, 6, 3, 8),
             (rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 6),
              rng.randint(1, 16))]
    for d_in, h1, h2, classes, batch in sizes:
        shapes = {"W1": (h1, d_in), "b1": (h1,), "W2": (h2, h1), "b2": (h2,),
                  "W3": (classes, h2), "b3": (classes,)}
        params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
        X = torch.randn(batch, d_in, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (batch,), generator=g)
        where = f"the {d_in}-{h1}-{h2}-{classes} network on a batch of {batch}"
        got = call(fn, {k: v.clone() for k, v in params.items()}, X.clone(), y.clone(),
                   library=_AUTOGRAD_TWO,
                   hint="run it on a small network and print each intermediate's shape.")
        if not isinstance(got, dict) or any(k not in got for k in _TWO_LAYER_KEYS):
            found = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise NotYet(f"{where}: expected a dict with the keys {list(_TWO_LAYER_KEYS)}, "
                         f"got {found}.", "return one gradient per parameter, keyed by its name.")
        expected = _autograd_two_layer(params, X, y)
        for key in ("W3", "b3", "W2", "b2", "W1", "b1"):  # from the top, as the errors flow
            value = _expect_tensor(got[key], shapes[key], f"{where}, gradient {key}",
                                   "a parameter's gradient has the parameter's shape: "
                                   "grad W = delta.T @ (the layer's input).")
            if _close(value, expected[key], 1e-10, 1e-8):
                continue
            if value.dtype != torch.float64 and _close(value.double(), expected[key], 1e-4, 1e-4):
                raise NotYet(f"{where}: gradient {key} is {value.dtype}, not float64.",
                             "the inputs are float64: keep every intermediate in their dtype "
                             "(no torch.tensor(...) or .float() on the way).")
            for slip, hint in _TWO_LAYER_SLIPS.items():
                if _close(value, _two_layer_reference(params, X, y, slip)[key], 1e-10, 1e-8):
                    raise NotYet(f"{where}: gradient {key} is wrong.", hint)
            if key in ("W1", "b1", "W2", "b2"):
                above = {"W2": "W3", "b2": "W3", "W1": "W2", "b1": "W2"}[key]
                hint = (f"the layers above are right; the delta of this layer is the delta "
                        f"above times {above}, times σ'(Z) of this layer: "
                        "delta_l = (delta_(l+1) @ W_(l+1)) * H_l * (1 - H_l).")
            else:
                hint = ("the output delta is (softmax(Z3) - onehot(y)) / batch; "
                        "grad W3 = delta3.T @ H2 and grad b3 = delta3.sum(0).")
            raise NotYet(f"{where}: gradient {key} is wrong.", hint)
    return _report(True, "all six gradients match autograd for every network and batch.")


# --------------------------------------------------------------------------- He init
@grader
def check_he_std(answer: object) -> bool:
    """Ch. 3, exercise 5: the standard deviation of He (Kaiming) normal initialisation for
    the weight of ``nn.Linear(512, 128)`` followed by ReLU."""
    fan_in, fan_out = 512, 128
    return _grade_number(
        "He std", answer, math.sqrt(2 / fan_in),
        {2 / fan_in: "that is the variance 2 / fan_in; the standard deviation is its square root.",
         math.sqrt(1 / fan_in): "ReLU zeroes half of its inputs: the variance is 2 / fan_in, "
                                "not 1 / fan_in.",
         math.sqrt(2 / fan_out): "kaiming_normal_ uses fan_in by default: the weight of "
                                 "nn.Linear(512, 128) has 512 inputs.",
         math.sqrt(2 / (fan_in + fan_out)): "that is Xavier's normal std, "
                                            "sqrt(2 / (fan_in + fan_out)); He uses fan_in only.",
         math.sqrt(6 / fan_in): "that is the bound of He *uniform*, sqrt(6 / fan_in); the normal "
                                "version's standard deviation is sqrt(2 / fan_in).",
         math.sqrt(6 / (fan_in + fan_out)): "that is Xavier's uniform bound; He normal has "
                                            "std sqrt(2 / fan_in)."},
    )


# --------------------------------------------------------------------------- inverted dropout
def _dropout_slips(x: torch.Tensor, keep: torch.Tensor, p: float,
                   training: bool) -> dict[str, torch.Tensor]:
    kept = keep.to(x.dtype)
    if not training:
        return {"in eval mode dropout is the identity: return x unchanged (inverted dropout "
                "already did its scaling during training).": x / (1 - p),
                "in eval mode nothing is dropped: return x itself, without the mask.":
                x * kept / (1 - p)}
    return {"scale the kept elements by 1 / (1 - p), so that the expected output equals x.":
            x * kept,
            "p is the probability of *dropping*: divide by the keeping probability 1 - p, "
            "not by p.": x * kept / p,
            "multiplying by (1 - p) is the old convention of scaling at test time; inverted "
            "dropout divides by (1 - p) during training.": x * kept * (1 - p),
            "keep marks the elements that *survive*: multiply by keep, not by its opposite.":
            x * (1 - kept) / (1 - p)}


@grader
def check_inverted_dropout(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 3, exercise 6: ``fn(x, keep, p, training)`` applies inverted dropout with a given mask.

    ``keep`` is a boolean tensor of x's shape, True where the element survives. In
    training the answer is ``x * keep / (1 - p)``; in eval mode it is ``x``. Checked for
    several p, shapes and dtypes; ``x`` must not be modified in place.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    cases = [(0.5, (4, 6), torch.float64, True), (0.2, (3, 5), torch.float32, True),
             (0.8, (10,), torch.float64, True), (0.5, (4, 6), torch.float64, False),
             (0.3, (2, 3, 4), torch.float32, False), (0.0, (5,), torch.float64, True),
             (rng.choice([0.1, 0.25, 0.4, 0.6]), (rng.randint(1, 8), rng.randint(1, 8)),
              torch.float64, rng.random() < 0.7)]
    for p, shape, dtype, training in cases:
        x = torch.randn(shape, generator=g, dtype=dtype) + 2.0  # no zeros, mostly positive
        keep = torch.rand(shape, generator=g) >= p
        where = f"p = {p}, training = {training}, x of shape {shape} ({dtype})"
        before = x.clone()
        got = call(fn, x, keep.clone(), p, training,
                   hint="x * keep works directly: True counts as 1 and False as 0.")
        if not torch.equal(x, before):
            raise NotYet(f"{where}: your function changed x in place.",
                         "compute a new tensor (x * keep / (1 - p)) instead of writing into x.")
        got = _expect_tensor(got, shape, where, "return a tensor of x's shape.")
        expected = x * keep.to(dtype) / (1 - p) if training else x
        if got.dtype != dtype and _close(got, expected, 1e-5, 1e-5):
            raise NotYet(f"{where}: got a {got.dtype} tensor.", f"keep x's dtype ({dtype}).")
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        if _close(got, expected, tol, tol):
            continue
        for hint, value in _dropout_slips(x, keep, p, training).items():
            if _close(got, value, tol, tol):
                raise NotYet(f"{where}: wrong output.", hint)
        raise NotYet(f"{where}: wrong output.",
                     "in training return x * keep / (1 - p); in eval mode return x.")
    return _report(True, "inverted dropout: kept values scaled by 1/(1 - p), identity in eval, "
                         "so the expected output is x.")
