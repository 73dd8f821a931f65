"""A multilayer perceptron by hand: activations, losses, forward and backward (Chapter 3).

Everything here is written with plain tensor operations and no autograd, so that each
gradient formula is visible. ``tests/test_mlp.py`` checks every one against autograd
and against finite differences (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- activations
def relu(z: Tensor) -> Tensor:
    r"""Rectified linear unit, :math:`\max(0, z)`."""
    return z.clamp_min(0)


def relu_grad(z: Tensor) -> Tensor:
    """Derivative of ReLU: 1 where z > 0, else 0 (we take 0 at z = 0, as PyTorch does)."""
    return (z > 0).to(z.dtype)


def sigmoid(z: Tensor) -> Tensor:
    r"""Logistic sigmoid :math:`\sigma(z) = 1 / (1 + e^{-z})`."""
    return 1 / (1 + torch.exp(-z))


def sigmoid_grad(z: Tensor) -> Tensor:
    r""":math:`\sigma'(z) = \sigma(z)\,(1 - \sigma(z))`, at most 1/4."""
    s = sigmoid(z)
    return s * (1 - s)


def tanh(z: Tensor) -> Tensor:
    r"""Hyperbolic tangent :math:`(e^z - e^{-z}) / (e^z + e^{-z})`."""
    return torch.tanh(z)


def tanh_grad(z: Tensor) -> Tensor:
    r""":math:`\tanh'(z) = 1 - \tanh^2(z)`."""
    return 1 - torch.tanh(z) ** 2


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "relu": (relu, relu_grad),
    "sigmoid": (sigmoid, sigmoid_grad),
    "tanh": (tanh, tanh_grad),
}


def logsumexp(z: Tensor, dim: int = -1) -> Tensor:
    r"""Numerically stable :math:`\log \sum_j e^{z_j}`.

    Subtracting the maximum :math:`m` first changes nothing mathematically,
    :math:`\log \sum_j e^{z_j} = m + \log \sum_j e^{z_j - m}`, but keeps every
    exponent at most 0, so nothing overflows.
    """
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(z - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def softmax(z: Tensor, dim: int = -1) -> Tensor:
    r"""Softmax :math:`p_j = e^{z_j} / \sum_k e^{z_k}`, computed stably via :func:`logsumexp`."""
    return torch.exp(z - logsumexp(z, dim=dim).unsqueeze(dim))


def naive_softmax(z: Tensor, dim: int = -1) -> Tensor:
    """Softmax straight from the definition. It overflows for large logits: do not use it."""
    e = torch.exp(z)
    return e / e.sum(dim=dim, keepdim=True)


# --------------------------------------------------------------------------- losses
def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    r"""Mean squared error :math:`\frac1n \sum_i (\hat y_i - y_i)^2`. Shapes must match."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"mse_loss expects prediction and target of the same shape, got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    return ((prediction - target) ** 2).mean()


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Cross-entropy of softmax(logits) against class indices, averaged over the batch.

    :math:`\ell = -\log p_y = \operatorname{logsumexp}(z) - z_y`. Working from the logits
    with log-sum-exp never forms a probability that could round to 0.
    """
    _check_logits_and_targets(logits, targets)
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (logsumexp(logits, dim=1) - picked).mean()


def _check_logits_and_targets(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"expected integer class indices of shape [{logits.shape[0]}], got "
            f"{targets.dtype} of shape {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(
            f"class indices must lie in [0, {logits.shape[1] - 1}], got "
            f"{int(targets.min())}..{int(targets.max())}"
        )


# --------------------------------------------------------------------------- the network
def init_params(
    sizes: tuple[int, int, int] = (3, 4, 2), seed: int = 0, dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """Weights and biases of a one-hidden-layer MLP, ``sizes = (inputs, hidden, outputs)``.

    Weights are drawn uniformly from :math:`\\pm 1/\\sqrt{\\text{fan-in}}`, the same range
    as ``nn.Linear``; the names and shapes match ``nn.Linear`` (``W1`` is ``[hidden, inputs]``).
    """
    d_in, d_hidden, d_out = sizes
    g = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = fan_in**-0.5
        return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound

    return {
        "W1": uniform((d_hidden, d_in), d_in),
        "b1": uniform((d_hidden,), d_in),
        "W2": uniform((d_out, d_hidden), d_hidden),
        "b2": uniform((d_out,), d_hidden),
    }


def forward(
    params: dict[str, Tensor], X: Tensor, y: Tensor, activation: str = "sigmoid"
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Forward pass of the MLP and its cross-entropy loss, in matrix form.

    .. math::
        Z_1 = X W_1^\top + b_1,\quad H = f(Z_1),\quad Z_2 = H W_2^\top + b_2,\quad
        L = \tfrac1B \textstyle\sum_i \operatorname{CE}(Z_{2,i}, y_i)

    Returns the loss and a cache of the intermediate values that :func:`backward` needs.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    d_in = params["W1"].shape[1]
    if X.ndim != 2 or X.shape[1] != d_in:
        raise ValueError(f"expected X of shape [batch, {d_in}], got {tuple(X.shape)}")
    f, _ = ACTIVATIONS[activation]
    Z1 = X @ params["W1"].T + params["b1"]
    H = f(Z1)
    Z2 = H @ params["W2"].T + params["b2"]
    loss = cross_entropy(Z2, y)
    return loss, {"X": X, "y": y, "Z1": Z1, "H": H, "Z2": Z2}


def backward(
    params: dict[str, Tensor], cache: dict[str, Tensor], activation: str = "sigmoid"
) -> dict[str, Tensor]:
    r"""Gradients of the loss with respect to every parameter and the input, by hand.

    Back-propagation applies the chain rule from the loss backwards:

    .. math::
        \delta_2 = \tfrac1B (\operatorname{softmax}(Z_2) - Y), \quad
        \nabla W_2 = \delta_2^\top H, \quad \nabla b_2 = \textstyle\sum_i \delta_{2,i},

        \delta_1 = (\delta_2 W_2) \odot f'(Z_1), \quad
        \nabla W_1 = \delta_1^\top X, \quad \nabla b_1 = \textstyle\sum_i \delta_{1,i}, \quad
        \nabla X = \delta_1 W_1,

    where :math:`Y` is the one-hot matrix of the targets.
    """
    _, f_grad = ACTIVATIONS[activation]
    X, y, Z1, H, Z2 = (cache[k] for k in ("X", "y", "Z1", "H", "Z2"))
    batch = X.shape[0]
    Y = torch.nn.functional.one_hot(y, Z2.shape[1]).to(Z2.dtype)
    delta2 = (softmax(Z2, dim=1) - Y) / batch
    delta1 = (delta2 @ params["W2"]) * f_grad(Z1)
    return {
        "W2": delta2.T @ H,
        "b2": delta2.sum(0),
        "W1": delta1.T @ X,
        "b1": delta1.sum(0),
        "X": delta1 @ params["W1"],
    }


class ManualMLPLoss(torch.autograd.Function):
    """The MLP loss as an autograd function whose backward is our :func:`backward`.

    Wrapping the hand-written gradients this way lets ``torch.autograd.gradcheck``
    compare them with finite differences.
    """

    @staticmethod
    def forward(ctx, X, W1, b1, W2, b2, y, activation="sigmoid"):  # type: ignore[override]
        params = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
        loss, cache = forward(params, X, y, activation)
        ctx.params, ctx.cache, ctx.activation = params, cache, activation
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        g = backward(ctx.params, ctx.cache, ctx.activation)
        return (grad_loss * g["X"], grad_loss * g["W1"], grad_loss * g["b1"],
                grad_loss * g["W2"], grad_loss * g["b2"], None, None)


def train_manual(
    params: dict[str, Tensor],
    X: Tensor,
    y: Tensor,
    lr: float,
    epochs: int,
    batch_size: int,
    activation: str = "sigmoid",
    seed: int = 0,
) -> list[float]:
    """Train the hand-written MLP with minibatch SGD and our own gradients; no autograd.

    Updates ``params`` in place and returns the mean training loss of each epoch.
    """
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=g)
        total = 0.0
        for start in range(0, X.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss, cache = forward(params, X[idx], y[idx], activation)
            grads = backward(params, cache, activation)
            for name in params:
                params[name] -= lr * grads[name]
            total += loss.item() * len(idx)
        history.append(total / X.shape[0])
    return history


def predict(params: dict[str, Tensor], X: Tensor, activation: str = "sigmoid") -> Tensor:
    """Class predictions of the hand-written MLP: the index of the largest logit."""
    f, _ = ACTIVATIONS[activation]
    return (f(X @ params["W1"].T + params["b1"]) @ params["W2"].T + params["b2"]).argmax(1)


# --------------------------------------------------------------------------- dropout
def dropout(
    x: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    r"""Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1 - p).

    .. math:: y = x \odot m / (1 - p), \qquad m_i \sim \operatorname{Bernoulli}(1 - p)

    so that :math:`\mathbb{E}[y] = x` and nothing needs rescaling at test time: in eval
    mode (``training=False``) dropout is the identity, as ``nn.Dropout`` documents
    (Srivastava et al., 2014). The mask is drawn with ``bernoulli_``, the sampler
    ``torch.nn.functional.dropout`` uses on the CPU, so the same seed gives the same mask.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0  # every element dropped; nothing to rescale
    keep = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    return x * (keep / (1 - p))


class Dropout(torch.nn.Module):
    """:func:`dropout` as a layer: active after ``model.train()``, the identity after ``eval()``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------- initialisation
def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape ``[out, in, *kernel]``, as torch.nn.init counts.

    For ``nn.Linear`` (``[out, in]``) they are the numbers of inputs and outputs; a
    convolution multiplies both by the kernel's size.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"fan-in and fan-out need a weight with >= 2 dimensions, got {shape}")
    receptive_field = 1
    for size in shape[2:]:
        receptive_field *= size
    return shape[1] * receptive_field, shape[0] * receptive_field


def xavier_uniform_bound(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    r"""Glorot and Bengio's (2010) bound :math:`a = g\sqrt{6 / (n_\text{in} + n_\text{out})}`.

    :math:`U(-a, a)` has variance :math:`a^2/3 = 2 g^2/(n_\text{in} + n_\text{out})`, where
    :math:`g` is the ``gain``: a compromise between keeping the forward variance
    (:math:`n_\text{in}\operatorname{Var}w = 1`) and the backward variance
    (:math:`n_\text{out}\operatorname{Var}w = 1`) constant. It is computed as
    ``torch.nn.init.xavier_uniform_`` does, :math:`\sqrt3 \cdot g \sqrt{2/(n_\text{in} +
    n_\text{out})}`, so that the two agree to the last bit.
    """
    if fan_in < 1 or fan_out < 1:
        raise ValueError(f"fans must be positive, got fan_in={fan_in}, fan_out={fan_out}")
    return math.sqrt(3.0) * gain * math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_normal_std(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
    r"""He et al.'s (2015) standard deviation :math:`\text{gain}/\sqrt{n_\text{in}}`.

    With ReLU (gain :math:`\sqrt 2`), :math:`\operatorname{Var}w = 2/n_\text{in}` makes up for
    ReLU zeroing half of its inputs, so the pre-activations keep their variance layer
    after layer. These are the defaults of ``torch.nn.init.kaiming_normal_``.
    """
    if fan_in < 1:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    return gain / math.sqrt(fan_in)


def xavier_uniform(
    shape: tuple[int, ...], gain: float = 1.0, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A weight drawn from :math:`U(-a, a)` with :func:`xavier_uniform_bound` (Glorot init)."""
    bound = xavier_uniform_bound(*fans(shape), gain=gain)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)


def kaiming_normal(
    shape: tuple[int, ...], gain: float = math.sqrt(2.0), generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""A weight drawn from :math:`N(0, \sigma^2)` with :func:`kaiming_normal_std` (He init)."""
    std = kaiming_normal_std(fans(shape)[0], gain=gain)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def activation_variances(
    init: str, activation: str, depth: int = 20, width: int = 256, batch: int = 512, seed: int = 0
) -> list[float]:
    """Variance of each layer's output in a deep, bias-free MLP at initialisation.

    ``init`` is ``"small"`` (N(0, 0.01²), a common naive choice), ``"xavier"`` or
    ``"he"``; ``activation`` is ``"tanh"`` or ``"relu"``. The input is standard normal.
    Returns ``depth`` variances, one per layer, measured over the batch and the units
    (in float64). The weights are random, so the variance takes a random walk around
    what the derivation predicts; the narrower the layers, the larger its steps.
    """
    f64 = torch.float64  # float32 would underflow to 0 for the vanishing cases
    inits = {
        "small": lambda shape, g: torch.randn(shape, generator=g, dtype=f64) * 0.01,
        "xavier": lambda shape, g: xavier_uniform(shape, generator=g, dtype=f64),
        "he": lambda shape, g: kaiming_normal(shape, generator=g, dtype=f64),
    }
    if init not in inits:
        raise ValueError(f"init must be one of {sorted(inits)}, got {init!r}")
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    f = ACTIVATIONS[activation][0]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, width, generator=g, dtype=f64)
    variances = []
    for _ in range(depth):
        h = f(h @ inits[init]((width, width), g).T)
        variances.append(float(h.var()))
    return variances
