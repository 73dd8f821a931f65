r"""Pruning from scratch (Chapter 11): magnitude masks, and layers that really shrink.

**Magnitude pruning.** A trained network has many weights close to zero. Setting the
smallest ones to exactly zero changes the function a little, and a short fine-tuning
repairs most of the damage (Han et al., 2015, "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS). :func:`magnitude_prune` zeroes the fraction
``amount`` of the weights with the smallest :math:`|w|` in every ``nn.Linear`` and
``nn.Conv2d`` (weights only: biases are few and cheap). Two ways to rank:

* ``scope="global"`` ranks all those weights together. Layers with many redundant
  weights lose more than the others, which usually costs less accuracy for the same
  sparsity. A small layer can lose most of its weights, though.
* ``scope="layer"`` prunes every layer by the same ``amount``.

The result is a *mask* per weight: ``True`` keeps a weight, ``False`` zeroes it.
Fine-tuning must keep the zeros: an optimizer step moves them away from zero, so call
:func:`apply_masks` after every step. :func:`sparsity` and :func:`count_nonzero_params`
measure the result.

The masks are those of ``torch.nn.utils.prune`` (``global_unstructured`` with
``L1Unstructured``, and ``l1_unstructured``), which ``tests/test_compress_prune.py``
checks, with the same details: the number of pruned weights is ``round(amount * n)``
(Python's ``round``, so halves go to the even number: 2.5 gives 2, 3.5 gives 4), and
the weights to prune are ``torch.topk(|w|, k, largest=False)``. Among equal magnitudes
``topk`` picks in an order that PyTorch does not document; we call it on the same
vector, so we pick the same weights.

**Zeros do not make a dense matrix product faster.** A matrix with 90% zeros takes as
long to multiply as a full one, unless sparse kernels or sparse hardware skip them.
*Structured* pruning removes whole units instead, so the matrices get smaller:

* :func:`prune_linear_neurons` removes hidden units between two ``nn.Linear`` layers: the
  rows of the first weight and the columns of the second. A unit is ranked by the L2
  norm of its incoming weights, the row ``first.weight[i]`` (the criterion of
  ``torch.nn.utils.prune.ln_structured(..., n=2, dim=0)``): a unit whose weights are all
  small gives small pre-activations for any input of the usual size.
* :func:`prune_conv_channels` removes output channels of a convolution: its filters, and
  the matching input channels (or flattened input features) of the next layer. A
  channel is ranked by the L1 norm of its filter, the sum of :math:`|w|` over input
  channels and kernel positions (Li et al., 2017, "Pruning Filters for Efficient
  ConvNets", ICLR).
* :func:`shrink_mlp`, :func:`shrink_lenet` and :func:`shrink_gpt_mlp` apply them to a
  whole ``nn.Sequential`` MLP, to :class:`~aimodels.cnn.LeNet5` and to the feed-forward
  networks of :class:`~aimodels.gpt.GPT`.

The smaller network computes exactly what the original computes when the dropped
units output zero. After an activation with :math:`f(0) = 0` (ReLU, GELU, tanh) that is
the original with the dropped units' incoming rows and biases set to zero; the tests
check it with ``assert_close``. Max pooling keeps a zero channel zero; a normalisation
layer between the two pruned layers (batch norm, layer norm) would not, so these
functions do not look through one.

============================ ===============================================================
name                         what it does
============================ ===============================================================
:func:`magnitude_prune`      zero the smallest weights (global or per layer), return masks
:func:`apply_masks`          re-zero pruned weights, e.g. after an optimizer step
:func:`sparsity`             fraction of zero weights in the prunable layers
:func:`count_nonzero_params` nonzero entries in all parameters
:func:`prune_linear_neurons` two smaller ``nn.Linear`` without the weakest hidden units
:func:`prune_conv_channels`  a smaller ``nn.Conv2d`` and next layer without the weakest filters
:func:`shrink_mlp`           structured pruning of every hidden layer of an ``nn.Sequential``
:func:`shrink_lenet`         structured pruning of LeNet-5's C1, C3, C5 and F6
:func:`shrink_gpt_mlp`       structured pruning of the FFN hidden width of every GPT block
============================ ===============================================================
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from aimodels.cnn import LeNet5
from aimodels.gpt import GPT

__all__ = [
    "apply_masks",
    "count_nonzero_params",
    "magnitude_prune",
    "prune_conv_channels",
    "prune_linear_neurons",
    "shrink_gpt_mlp",
    "shrink_lenet",
    "shrink_mlp",
    "sparsity",
]

Tensor = torch.Tensor
Keep = int | float
PRUNABLE = (nn.Linear, nn.Conv2d)
SCOPES = ("global", "layer")
LENET_LAYERS = ("C1", "C3", "C5", "F6")

# Element-wise modules without parameters: dropping a unit before one of them drops
# the same unit after it. (Softmax mixes units; normalisation layers have per-unit
# parameters. Neither qualifies.)
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout,
)


# --------------------------------------------------------------------------- validation
def _check_module(name: str, value: object) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def _check_amount(amount: object) -> float:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be a float in [0, 1), got {type(amount).__name__} "
                        f"{amount!r}")
    value = float(amount)
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"amount is the fraction of weights to prune, a float in [0, 1), got "
                         f"{amount!r} (torch.nn.utils.prune reads an int as a count; this "
                         "function does not)")
    return value


def _n_keep(keep: object, width: int, what: str) -> int:
    """How many of ``width`` units to keep: an int is a count, a float a fraction."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int (a count) or a float (a fraction) for {what}, "
                        f"got {type(keep).__name__} {keep!r}")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= width:
            raise ValueError(f"keep={keep} units for {what}, which has {width}; expected an "
                             f"int from 1 to {width}")
        return int(keep)
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep={keep!r} for {what}: a float keep is a fraction in (0, 1]")
    count = round(float(keep) * width)
    if count < 1:
        raise ValueError(f"keep={keep!r} of the {width} units of {what} rounds to 0; "
                         "at least one unit must stay")
    return count


def _prunable_layers(model: nn.Module,
                     modules: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` (in ``named_modules`` order)."""
    _check_module("model", model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if modules is not None:
        if isinstance(modules, (str, bytes)) or not isinstance(modules, Iterable):
            raise TypeError(f"modules must be a list of module names such as ['fc1'], got "
                            f"{type(modules).__name__} {modules!r}")
        wanted = list(modules)
        everything = dict(model.named_modules())
        prunable = {name for name, _ in layers}
        for name in wanted:
            if not isinstance(name, str):
                raise TypeError(f"modules must hold module names (str), got {name!r}")
            if name not in everything:
                known = sorted(prunable)
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise ValueError(f"model has no module named {name!r}; its nn.Linear and "
                                 f"nn.Conv2d layers are: {shown}")
            if name not in prunable:
                raise ValueError(f"module {name!r} is a {type(everything[name]).__name__}; "
                                 "expected an nn.Linear or nn.Conv2d")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"modules lists a name more than once: {wanted}")
        chosen = set(wanted)
        layers = [(name, m) for name, m in layers if name in chosen]
    if not layers:
        raise ValueError(f"found no nn.Linear or nn.Conv2d layer to prune in "
                         f"{type(model).__name__}")
    for name, layer in layers:
        if not isinstance(layer.weight, nn.Parameter):
            raise TypeError(f"the weight of {name!r} is not a Parameter: the layer still "
                            "carries torch.nn.utils.prune's re-parametrisation; call "
                            f"torch.nn.utils.prune.remove(module, 'weight') first")
    return layers


# --------------------------------------------------------------------------- magnitude
def _keep_mask(scores: Tensor, amount: float) -> Tensor:
    """``False`` at the ``round(amount * n)`` smallest scores, as torch's L1Unstructured."""
    n_prune = round(amount * scores.numel())
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if n_prune:  # topk with k=0 is allowed, but torch skips it too
        mask[torch.topk(scores, n_prune, largest=False).indices] = False
    return mask


def magnitude_prune(model: nn.Module, amount: float, scope: str = "global",
                    modules: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Zero the fraction ``amount`` of smallest-magnitude weights; return the masks.

    Acts on the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (or of
    the layers named in ``modules``), never on biases. ``scope="global"`` ranks all
    those weights together, ``scope="layer"`` each layer's weight on its own.

    Returns ``{"<layer name>.weight": mask}`` with **bool** masks of the weight's shape
    (``True`` = kept), and multiplies the weights by them in place. The masks equal
    ``torch.nn.utils.prune``'s: ``round(amount * n)`` weights are pruned (n counted over
    all the layers for global, per layer otherwise), chosen by ``torch.topk(|w|, k,
    largest=False)``. For global pruning the weights are concatenated in
    ``model.named_modules()`` order, so ties go as in ``global_unstructured`` given the
    layers in that order.

    ``amount`` is always a fraction of *all* the weights, zeros included: pruning 50%,
    then 70%, leaves 70% zeros (torch's second call would prune 70% of the remaining
    weights instead). The weights already zero are the smallest, so a new amount at
    least as large as the old one keeps them in the new masks.
    """
    layers = _prunable_layers(model, modules)
    amount = _check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    names = [f"{name}.weight" if name else "weight" for name, _ in layers]
    weights = [layer.weight for _, layer in layers]
    if scope == "layer":
        masks = [_keep_mask(w.detach().abs().reshape(-1), amount).view_as(w) for w in weights]
    else:
        devices = {w.device for w in weights}
        if len(devices) > 1:
            raise ValueError(f"global pruning ranks all weights together; they must be on one "
                             f"device, got {sorted(map(str, devices))}")
        scores = torch.cat([w.detach().abs().reshape(-1) for w in weights])
        flat = _keep_mask(scores, amount)
        masks = [m.view_as(w) for m, w in zip(flat.split([w.numel() for w in weights]),
                                              weights, strict=True)]
    with torch.no_grad():
        for weight, mask in zip(weights, masks, strict=True):
            weight.mul_(mask)
    return dict(zip(names, masks, strict=True))


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Multiply each named parameter of ``model`` by its mask, in place, without autograd.

    The fine-tuning loop of a pruned model calls it after every ``optimizer.step()``:
    the step moves pruned weights away from zero (their gradient is not zero, and
    momentum or weight decay move them too), and this puts them back. ``masks`` is what
    :func:`magnitude_prune` returned: names like ``"fc1.weight"``, bool masks or float
    masks of zeros and ones.
    """
    _check_module("model", model)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict from parameter names to mask tensors, got "
                        f"{type(masks).__name__}")
    params = dict(model.named_parameters())
    checked = []
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"model has no parameter named {name!r}; masks must use names "
                             "from model.named_parameters(), e.g. 'fc1.weight'")
        if not isinstance(mask, Tensor):
            raise TypeError(f"the mask of {name!r} must be a tensor, got {type(mask).__name__}")
        if mask.shape != params[name].shape:
            raise ValueError(f"the mask of {name!r} has shape {tuple(mask.shape)}, the "
                             f"parameter {tuple(params[name].shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"the mask of {name!r} must hold only 0 and 1 (or be bool)")
        checked.append((params[name], mask))
    with torch.no_grad():
        for param, mask in checked:
            param.mul_(mask.to(param.device))


def sparsity(model: nn.Module, modules: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros among the weights :func:`magnitude_prune` would prune.

    Those are the weights of every ``nn.Linear`` and ``nn.Conv2d`` (or of the layers
    named in ``modules``); biases and other parameters are left out.
    """
    layers = _prunable_layers(model, modules)
    zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
    total = sum(layer.weight.numel() for _, layer in layers)
    return zeros / total


def count_nonzero_params(model: nn.Module) -> int:
    """Number of nonzero entries in all parameters of ``model`` (biases, embeddings too).

    A parameter shared between layers (tied weights) counts once, as in
    ``model.parameters()``.
    """
    _check_module("model", model)
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


# --------------------------------------------------------------------------- structured
def _strongest(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest scores, in increasing order (units keep their order)."""
    return torch.topk(scores, count, largest=True).indices.sort().values


def _same_flags(old: nn.Module, new: nn.Module) -> nn.Module:
    new.train(old.training)
    for name, param in new.named_parameters():
        param.requires_grad_(old.get_parameter(name).requires_grad)
    return new


def _sliced_linear(old: nn.Linear, rows: Tensor | None = None,
                   cols: Tensor | None = None) -> nn.Linear:
    weight = old.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = None if old.bias is None else old.bias.detach()
    bias = bias if bias is None or rows is None else bias[rows]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return _same_flags(old, new)  # type: ignore[return-value]


def _sliced_conv(old: nn.Conv2d, out_idx: Tensor | None = None,
                 in_idx: Tensor | None = None) -> nn.Conv2d:
    weight = old.weight.detach()  # [out, in, kh, kw]
    weight = weight if out_idx is None else weight[out_idx]
    weight = weight if in_idx is None else weight[:, in_idx]
    bias = None if old.bias is None else old.bias.detach()
    bias = bias if bias is None or out_idx is None else bias[out_idx]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, bias=bias is not None,
                    padding_mode=old.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return _same_flags(old, new)  # type: ignore[return-value]


def _check_layer(name: str, layer: object, kind: type | tuple[type, ...]) -> None:
    if not isinstance(layer, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(f"nn.{k.__name__}" if k.__module__.startswith("torch.")
                               else f"{k.__module__}.{k.__name__}" for k in kinds)
        raise TypeError(f"{name} must be an {expected}, got {type(layer).__name__}")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f"{name} is a grouped convolution (groups={layer.groups}); only "
                         "groups=1 is supported")


def prune_linear_neurons(first: nn.Linear, second: nn.Linear,
                         keep: Keep) -> tuple[nn.Linear, nn.Linear]:
    """Remove the weakest hidden units between two consecutive ``nn.Linear`` layers.

    Unit ``i`` (output ``i`` of ``first``, input ``i`` of ``second``) is ranked by the L2
    norm of its incoming weights ``first.weight[i]``; the bias is not part of the score.
    ``keep`` is how many units stay: an int is a count (1 to the width), a float a
    fraction in (0, 1], rounded with ``round(keep * width)``. The strongest units are
    ``torch.topk(scores, keep)``; equal scores go as ``topk`` orders them.

    Returns two **new** layers, the rows (and biases) of ``first`` and the columns of
    ``second`` that are kept, in their original order; ``second``'s bias is copied
    whole. The inputs are not modified. The new pair computes what the old pair computes
    when the dropped units output zero (with ReLU, GELU or tanh between them: when their
    incoming rows and biases are zero).
    """
    _check_layer("first", first, nn.Linear)
    _check_layer("second", second, nn.Linear)
    if first.out_features != second.in_features:
        raise ValueError(f"first has {first.out_features} outputs but second has "
                         f"{second.in_features} inputs; expected two consecutive layers")
    count = _n_keep(keep, first.out_features, "the hidden layer between first and second")
    kept = _strongest(torch.linalg.vector_norm(first.weight.detach(), ord=2, dim=1), count)
    return _sliced_linear(first, rows=kept), _sliced_linear(second, cols=kept.to(
        second.weight.device))


def prune_conv_channels(conv: nn.Conv2d, next_layer: nn.Conv2d | nn.Linear, keep: Keep,
                        spatial: int = 1) -> tuple[nn.Conv2d, nn.Conv2d | nn.Linear]:
    """Remove the weakest output channels of ``conv`` and the matching inputs of the next layer.

    Channel ``c`` is ranked by the L1 norm of its filter, the sum of ``|conv.weight[c]|``
    (Li et al., 2017, "Pruning Filters for Efficient ConvNets", ICLR); the bias is not
    part of the score. ``keep`` is a count (int) or a fraction (float), as in
    :func:`prune_linear_neurons`.

    ``next_layer`` is either the next ``nn.Conv2d`` (its input channels are dropped), or
    the ``nn.Linear`` after a flatten of the ``[N, C, H, W]`` feature map (``nn.Flatten``
    or ``x.flatten(1)``): channel ``c`` then feeds the ``spatial = H * W`` consecutive
    inputs ``c * spatial`` to ``(c + 1) * spatial - 1``, and those are dropped.
    ``spatial`` must stay 1 for a convolution.

    Returns two **new** layers (stride, padding, dilation and bias as before); the inputs
    are not modified. Between the two layers, ReLU, max or average pooling and dropout
    keep a zero channel zero, so the new pair computes what the old one computes with the
    dropped filters and their biases set to zero.
    """
    _check_layer("conv", conv, nn.Conv2d)
    _check_layer("next_layer", next_layer, (nn.Conv2d, nn.Linear))
    if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1:
        raise ValueError(f"spatial must be an int >= 1 (H * W at the flatten), got {spatial!r}")
    if isinstance(next_layer, nn.Conv2d):
        if spatial != 1:
            raise ValueError(f"spatial={spatial} applies only when next_layer is an nn.Linear "
                             "after a flatten; for an nn.Conv2d leave it at 1")
        if next_layer.in_channels != conv.out_channels:
            raise ValueError(f"conv has {conv.out_channels} output channels but next_layer has "
                             f"{next_layer.in_channels} input channels")
    elif next_layer.in_features != conv.out_channels * spatial:
        raise ValueError(f"next_layer has {next_layer.in_features} inputs, but conv's "
                         f"{conv.out_channels} channels times spatial={spatial} give "
                         f"{conv.out_channels * spatial}; spatial must be H * W of the "
                         "feature map at the flatten")
    count = _n_keep(keep, conv.out_channels, "the output channels of conv")
    kept = _strongest(conv.weight.detach().abs().sum(dim=(1, 2, 3)), count)
    new_conv = _sliced_conv(conv, out_idx=kept)
    kept = kept.to(next_layer.weight.device)
    if isinstance(next_layer, nn.Conv2d):
        return new_conv, _sliced_conv(next_layer, in_idx=kept)
    offsets = torch.arange(spatial, device=kept.device)
    features = (kept[:, None] * spatial + offsets).reshape(-1)  # channel-major, as flatten
    return new_conv, _sliced_linear(next_layer, cols=features)


def shrink_mlp(model: nn.Sequential, keep: Keep) -> nn.Sequential:
    """A new ``nn.Sequential`` with every hidden layer pruned by :func:`prune_linear_neurons`.

    A hidden layer is an ``nn.Linear`` followed by one or more element-wise modules
    (ReLU, GELU, tanh, sigmoid, dropout, ...) and another ``nn.Linear``; each one keeps
    ``keep`` units (a count or a fraction). The output layer keeps its width. Every
    layer is ranked on the **original** weights (the pairs are processed from the last
    one back, so no row is scored after its columns were cut). The model is copied; the
    original is not modified.

    With activations where :math:`f(0) = 0` the result equals the original with the
    dropped units' incoming rows and biases zeroed; with any of them it equals the
    original with the dropped units' outgoing columns zeroed.
    """
    _check_layer("model", model, nn.Sequential)
    layers = list(model)
    pairs = []
    for i, layer in enumerate(layers):
        j = i + 1
        while j < len(layers) and isinstance(layers[j], _ELEMENTWISE):
            j += 1
        if (isinstance(layer, nn.Linear) and i + 1 < j < len(layers)
                and isinstance(layers[j], nn.Linear)):
            pairs.append((i, j))
    if not pairs:
        found = ", ".join(type(m).__name__ for m in layers)
        raise ValueError("expected an nn.Sequential with at least one (nn.Linear, "
                         f"activation, nn.Linear) run, got [{found}]")
    for i, _ in pairs:  # validate every width before copying anything
        _n_keep(keep, layers[i].out_features, f"hidden layer {i} of the MLP")
    new = copy.deepcopy(model)
    for i, j in reversed(pairs):
        new[i], new[j] = prune_linear_neurons(new[i], new[j], keep)
    return new


def _lenet_keeps(keep: Keep | Mapping[str, Keep]) -> dict[str, Keep]:
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(LENET_LAYERS), key=str)
        if unknown:
            raise ValueError(f"keep names unknown LeNet5 layers {unknown}; expected some of "
                             f"{list(LENET_LAYERS)}")
        return {name: keep.get(name, 1.0) for name in LENET_LAYERS}
    return dict.fromkeys(LENET_LAYERS, keep)


def shrink_lenet(model: LeNet5, keep: Keep | Mapping[str, Keep]) -> LeNet5:
    """A smaller copy of :class:`~aimodels.cnn.LeNet5`: fewer channels in C1 and C3, fewer
    units in C5 and F6.

    ``keep`` is a count or a fraction for every one of those four layers, or a dict such
    as ``{"C3": 8, "C5": 0.5}`` (a missing layer keeps all its units). The output layer
    keeps ``num_classes`` outputs. Channels are ranked by the L1 norm of their filters,
    units by the L2 norm of their incoming rows, all on the original weights. C3's
    channels feed the flattened ``16 * 5 * 5`` input of C5, so each dropped channel
    removes 25 consecutive inputs of C5.

    Returns a new ``LeNet5`` whose layers are smaller; the original is not modified. Its
    forward equals the original's with the dropped filters, rows and biases zeroed
    (ReLU and max pooling map a zero channel to zero). Its ``state_dict`` no longer fits
    ``LeNet5()``: keep the model object, or rebuild the shapes before loading.
    """
    _check_layer("model", model, LeNet5)
    f, c = model.features, model.classifier
    layout = [(f, 0, nn.Conv2d), (f, 3, nn.Conv2d), (c, 1, nn.Linear), (c, 3, nn.Linear),
              (c, 5, nn.Linear)]
    for seq, index, kind in layout:
        if len(seq) <= index or not isinstance(seq[index], kind):
            raise ValueError(f"expected LeNet5's layout, with an nn.{kind.__name__} at index "
                             f"{index} of {'features' if seq is f else 'classifier'}; the "
                             "model was changed")
    c1, c3, c5, f6 = f[0], f[3], c[1], c[3]
    widths = {"C1": c1.out_channels, "C3": c3.out_channels, "C5": c5.out_features,
              "F6": f6.out_features}
    counts = {name: _n_keep(k, widths[name], f"LeNet5 layer {name}")
              for name, k in _lenet_keeps(keep).items()}
    if c5.in_features % c3.out_channels:
        raise ValueError(f"C5 has {c5.in_features} inputs, not a multiple of C3's "
                         f"{c3.out_channels} channels")
    spatial = c5.in_features // c3.out_channels  # 5 * 5 for a 32 x 32 input
    new = copy.deepcopy(model)
    f, c = new.features, new.classifier
    # From the output back: each layer is scored before its own inputs are cut.
    c[3], c[5] = prune_linear_neurons(c[3], c[5], counts["F6"])
    c[1], c[3] = prune_linear_neurons(c[1], c[3], counts["C5"])
    f[3], c[1] = prune_conv_channels(f[3], c[1], counts["C3"], spatial=spatial)
    f[0], f[3] = prune_conv_channels(f[0], f[3], counts["C1"])
    return new


def shrink_gpt_mlp(model: GPT, keep: Keep) -> GPT:
    """A copy of a :class:`~aimodels.gpt.GPT` with a narrower feed-forward network in every block.

    Each block's ``mlp.fc`` (``d_model -> d_ff``) and ``mlp.proj`` (``d_ff -> d_model``)
    go through :func:`prune_linear_neurons`: hidden units are ranked by the L2 norm of
    their incoming rows of ``mlp.fc.weight``, and ``keep`` of them stay in every block
    (``keep=0.5`` halves ``d_ff``). The copy's ``config.d_ff`` is the new width, so
    ``save_pretrained`` and ``from_pretrained`` still agree. The original is not
    modified.

    GELU(0) = 0, so the copy's logits equal the original's with the dropped units' rows
    of ``mlp.fc.weight`` and entries of ``mlp.fc.bias`` set to zero.
    """
    _check_layer("model", model, GPT)
    for i, block in enumerate(model.blocks):
        _n_keep(keep, block.mlp.fc.out_features, f"the feed-forward network of block {i}")
    new = copy.deepcopy(model)
    widths = set()
    for block in new.blocks:
        block.mlp.fc, block.mlp.proj = prune_linear_neurons(block.mlp.fc, block.mlp.proj, keep)
        widths.add(block.mlp.fc.out_features)
    if len(widths) == 1:  # always, unless the blocks had different widths already
        new.config = dataclasses.replace(new.config, d_ff=widths.pop())
    return new
