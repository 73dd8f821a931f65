"""Two ways to ask a classifier "which inputs mattered?" (Chapter 15).

- **Input-gradient saliency** (Simonyan et al., 2014): the gradient of the class score
  (the logit, before the softmax) with respect to the input, :math:`\\partial f_c / \\partial x`.
  It says how the score would change for a tiny change of each pixel: a *local* answer.
- **Integrated gradients** (Sundararajan et al., 2017): the gradient averaged along the
  straight path from a baseline :math:`x'` (here an all-zero, blank image: 0 means no ink
  in the digits of chapter 15) to the input, times :math:`x - x'`:

  .. math:: \\mathrm{IG}_i(x) = (x_i - x'_i) \\int_0^1
            \\frac{\\partial f_c\\big(x' + \\alpha (x - x')\\big)}{\\partial x_i}\\, d\\alpha .

  By the fundamental theorem of calculus for path integrals the attributions add up to
  :math:`f_c(x) - f_c(x')` (*completeness*). The integral is computed with the trapezoid
  rule on ``steps`` intervals, so completeness holds up to the quadrature error, which
  :func:`completeness_gap` measures.

Both need the model in ``eval()`` mode (dropout or batch statistics would make the score
random) and give one attribution per input element.
"""

from __future__ import annotations

import torch
from torch import nn


def _check(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating-point batch [n, ...], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if model.training:
        raise ValueError("call model.eval() first: in training mode dropout and batch "
                         "statistics make the class score random")
    target = torch.as_tensor(target, dtype=torch.long)
    if target.dim() == 0:
        target = target.expand(x.shape[0])
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must be an int or one class index per input, i.e. shape "
                         f"({x.shape[0]},), got shape {tuple(target.shape)}")
    return target


def class_scores(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
    """The logit of class ``target[i]`` for every input ``x[i]``: shape ``[n]``."""
    target = _check(model, x, target)
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return logits of shape [n, classes], got "
                         f"{tuple(logits.shape)}")
    return logits.gather(1, target.to(logits.device)[:, None]).squeeze(1)


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
             absolute: bool = True) -> torch.Tensor:
    """Input-gradient saliency :math:`|\\partial f_c / \\partial x|` (Simonyan et al., 2014).

    Returns a tensor shaped like ``x``; ``absolute=False`` keeps the sign of the gradient.
    Each input's gradient is that of its own class score: the scores of different inputs
    do not depend on each other, so one backward pass of their sum gives all of them.
    """
    target = _check(model, x, target)
    x = x.detach().requires_grad_(True)
    scores = class_scores(model, x, target)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad.abs() if absolute else grad


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
                         baseline: torch.Tensor | None = None, steps: int = 64) -> torch.Tensor:
    """Integrated gradients of the class score (Sundararajan et al., 2017), shaped like ``x``.

    The path integral is approximated by the trapezoid rule on ``steps`` equal intervals:
    the model runs once on all ``(steps + 1) x n`` points of the paths. ``baseline``
    defaults to zeros (an all-zero, blank image); it must broadcast to ``x``.
    """
    target = _check(model, x, target)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got steps={steps!r}")
    x = x.detach()
    baseline = torch.zeros_like(x) if baseline is None else baseline.detach().expand_as(x)
    alphas = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype, device=x.device)
    shape = (steps + 1,) + (1,) * x.dim()
    path = (baseline + alphas.view(shape) * (x - baseline)).reshape(-1, *x.shape[1:])
    path.requires_grad_(True)
    scores = class_scores(model, path, target.repeat(steps + 1))
    (grads,) = torch.autograd.grad(scores.sum(), path)
    grads = grads.reshape(steps + 1, *x.shape)
    weights = torch.full((steps + 1,), 1.0 / steps, dtype=x.dtype, device=x.device)
    weights[0] = weights[-1] = 0.5 / steps
    mean_grad = (weights.view(shape) * grads).sum(0)
    return (x - baseline) * mean_grad


def completeness_gap(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
                     attributions: torch.Tensor,
                     baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Per input, sum of attributions minus :math:`f_c(x) - f_c(x')`: zero for exact IG."""
    baseline = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
    with torch.no_grad():
        change = class_scores(model, x, target) - class_scores(model, baseline, target)
    return attributions.flatten(1).sum(1) - change
