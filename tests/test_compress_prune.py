"""Tests of aimodels.compress.prune (Chapter 11): magnitude masks against
torch.nn.utils.prune, masks kept during fine-tuning, and structured pruning whose smaller
layers compute what the original computes with the dropped units zeroed."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn import functional as F

from aimodels.cnn import LeNet5
from aimodels.compress.prune import (
    apply_masks,
    count_nonzero_params,
    magnitude_prune,
    prune_conv_channels,
    prune_linear_neurons,
    shrink_gpt_mlp,
    shrink_lenet,
    shrink_mlp,
    sparsity,
)
from aimodels.gpt import GPT, GPTConfig
from aimodels.scaling import count_parameters

AMOUNTS = [0.0, 0.3, 0.5, 0.9]


def small_mlp(seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 16), act1=act(), fc2=nn.Linear(16, 12), act2=act(),
        fc3=nn.Linear(12, 4),
    ))


def lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5().eval()


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=37, context_length=16, d_model=32, n_heads=4, n_layers=2))
    with torch.no_grad():  # GPT-2's init zeroes biases; random ones test that they are kept
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


MODELS = {"mlp": small_mlp, "lenet": lenet}


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def torch_masks(model: nn.Module, amount: float, scope: str) -> tuple[dict, nn.Module]:
    """Masks of torch.nn.utils.prune on a copy of ``model``, and the pruned copy."""
    reference = copy.deepcopy(model)
    layers = prunable(reference)
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for _, m in layers],
                                        pruning_method=torch_prune.L1Unstructured, amount=amount)
    else:
        for _, module in layers:
            torch_prune.l1_unstructured(module, "weight", amount)
    return {f"{n}.weight" if n else "weight": m.weight_mask.bool()
            for n, m in layers}, reference


# --------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("which", sorted(MODELS))
def test_masks_equal_torch_prune(which, scope, amount):
    model = MODELS[which]()
    original = copy.deepcopy(model)
    expected, reference = torch_masks(model, amount, scope)
    masks = magnitude_prune(model, amount, scope=scope)
    assert masks.keys() == expected.keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, expected[name]), name
    for (name, layer), (_, ref) in zip(prunable(model), prunable(reference), strict=True):
        assert torch.equal(layer.weight, ref.weight), name  # torch's weight = orig * mask
        assert torch.equal(layer.bias, dict(original.named_modules())[name].bias)  # untouched


@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_reached_is_the_amount_up_to_rounding(scope, amount):
    model = lenet()
    sizes = [m.weight.numel() for _, m in prunable(model)]
    magnitude_prune(model, amount, scope=scope)
    total = sum(sizes)
    if scope == "global":
        assert sparsity(model) == round(amount * total) / total
    else:
        assert sparsity(model) == sum(round(amount * n) for n in sizes) / total
    assert abs(sparsity(model) - amount) <= len(sizes) / (2 * total)


def test_number_pruned_is_python_round_like_torch():
    # round() sends halves to the even number: 2.5 -> 2, 3.5 -> 4; 0.3 * 10 = 3.0000000000000004.
    for width, amount, pruned in [(5, 0.5, 2), (7, 0.5, 4), (10, 0.3, 3), (3, 0.1, 0)]:
        torch.manual_seed(width)
        layer = nn.Linear(width, 1, bias=False)
        expected, _ = torch_masks(layer, amount, "layer")
        mask = magnitude_prune(layer, amount, scope="layer")["weight"]
        assert int((~mask).sum()) == pruned
        assert torch.equal(mask, expected["weight"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_ties_are_broken_as_torch_topk_breaks_them(scope):
    # Weights in {-2, ..., 2}: thousands of equal magnitudes. We call the same topk on the
    # same vector as torch, so we pick the same weights among equals, and the exact count.
    model = lenet()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randint(-2, 3, param.shape))
    expected, _ = torch_masks(model, 0.5, scope)
    masks = magnitude_prune(model, 0.5, scope=scope)
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name


def test_modules_restricts_pruning_to_the_named_layers():
    model = small_mlp()
    before = copy.deepcopy(model)
    masks = magnitude_prune(model, 0.5, scope="global", modules=["fc2"])
    assert list(masks) == ["fc2.weight"]
    reference = copy.deepcopy(before)
    torch_prune.l1_unstructured(reference.fc2, "weight", 0.5)
    assert torch.equal(masks["fc2.weight"], reference.fc2.weight_mask.bool())
    assert torch.equal(model.fc1.weight, before.fc1.weight)
    assert torch.equal(model.fc3.weight, before.fc3.weight)
    assert sparsity(model, modules=["fc2"]) == 0.5
    assert sparsity(model) == 96 / (8 * 16 + 16 * 12 + 12 * 4)


def test_amount_counts_all_weights_so_pruning_again_reaches_the_new_amount():
    model = small_mlp()
    first = magnitude_prune(model, 0.5)
    second = magnitude_prune(model, 0.7)
    assert sparsity(model) == round(0.7 * 368) / 368
    for name, mask in first.items():
        assert not (second[name] & ~mask).any(), "a pruned weight came back"


def test_apply_masks_keeps_pruned_weights_at_zero_during_fine_tuning():
    model = small_mlp()
    masks = magnitude_prune(model, 0.6, scope="layer")
    reached = sparsity(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert sparsity(model) < reached  # the step revived pruned weights...
        apply_masks(model, masks)
        assert sparsity(model) == reached  # ...and the masks zero them again
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any()
    # Float masks of zeros and ones work the same.
    model.fc1.weight.data.fill_(1.0)
    apply_masks(model, {"fc1.weight": masks["fc1.weight"].float()})
    assert torch.equal(model.fc1.weight, masks["fc1.weight"].float())


def test_count_nonzero_params_counts_every_parameter():
    model = small_mlp()
    total = count_parameters(model)
    assert count_nonzero_params(model) == total
    masks = magnitude_prune(model, 0.5)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert count_nonzero_params(model) == total - pruned
    assert pruned == round(0.5 * 368)


# --------------------------------------------------------------------------- structured
def strongest(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.argsort(descending=True)[:count].sort().values


def zero_units(layer: nn.Module, kept: torch.Tensor) -> None:
    """Zero the weights (rows or filters) and biases of the units not in ``kept``."""
    dropped = torch.ones(layer.weight.shape[0], dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        layer.weight[dropped] = 0.0
        if layer.bias is not None:
            layer.bias[dropped] = 0.0


def row_norms(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().norm(dim=1)


def filter_l1(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh])
@pytest.mark.parametrize("keep", [7, 0.35, 20, 1])
def test_prune_linear_neurons_equals_the_original_with_units_zeroed(act, keep):
    torch.manual_seed(0)
    first, second = nn.Linear(10, 20), nn.Linear(20, 6)
    count = keep if isinstance(keep, int) else round(keep * 20)
    new_first, new_second = prune_linear_neurons(first, second, keep)
    assert (new_first.in_features, new_first.out_features) == (10, count)
    assert (new_second.in_features, new_second.out_features) == (count, 6)
    kept = strongest(row_norms(first), count)
    reference = copy.deepcopy(first)
    zero_units(reference, kept)
    x = torch.randn(5, 10)
    torch.testing.assert_close(new_second(act()(new_first(x))), second(act()(reference(x))))
    assert count_parameters(new_first) + count_parameters(new_second) == (
        10 * count + count + count * 6 + 6)


def test_prune_linear_neurons_ranks_like_torch_ln_structured_and_leaves_inputs_alone():
    torch.manual_seed(1)
    first, second = nn.Linear(12, 30), nn.Linear(30, 3)
    before = copy.deepcopy((first, second))
    new_first, _ = prune_linear_neurons(first, second, 11)
    reference = copy.deepcopy(first)
    torch_prune.ln_structured(reference, "weight", amount=30 - 11, n=2, dim=0)
    torch_kept = reference.weight_mask[:, 0].nonzero().squeeze(1)
    torch.testing.assert_close(new_first.weight, first.weight[torch_kept], rtol=0, atol=0)
    for old, now in zip(before, (first, second), strict=True):
        assert torch.equal(old.weight, now.weight) and torch.equal(old.bias, now.bias)


def test_prune_linear_neurons_with_sigmoid_equals_zeroed_outgoing_columns():
    # sigmoid(0) = 0.5, so zeroing incoming rows is not enough; outgoing columns are.
    torch.manual_seed(2)
    first, second = nn.Linear(6, 9), nn.Linear(9, 2)
    new_first, new_second = prune_linear_neurons(first, second, 4)
    kept = strongest(row_norms(first), 4)
    reference = copy.deepcopy(second)
    with torch.no_grad():
        reference.weight[:, [i for i in range(9) if i not in kept.tolist()]] = 0.0
    x = torch.randn(4, 6)
    torch.testing.assert_close(new_second(torch.sigmoid(new_first(x))),
                               reference(torch.sigmoid(first(x))))


def test_prune_conv_channels_before_a_conv():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    after = nn.Conv2d(8, 5, 3, stride=2, padding=1)
    new_conv, new_after = prune_conv_channels(conv, after, 3)
    assert (new_conv.in_channels, new_conv.out_channels) == (3, 3)
    assert (new_after.in_channels, new_after.out_channels) == (3, 5)
    assert (new_after.stride, new_after.padding) == ((2, 2), (1, 1))
    kept = strongest(filter_l1(conv), 3)
    reference = copy.deepcopy(conv)
    torch_prune.ln_structured(reference, "weight", amount=8 - 3, n=1, dim=0)
    assert torch.equal(reference.weight_mask[:, 0, 0, 0].nonzero().squeeze(1), kept)
    reference = copy.deepcopy(conv)
    zero_units(reference, kept)
    x = torch.randn(2, 3, 9, 9)
    expected = after(F.max_pool2d(F.relu(reference(x)), 2))
    torch.testing.assert_close(new_after(F.max_pool2d(F.relu(new_conv(x)), 2)), expected)


def test_prune_conv_channels_before_a_flatten_and_linear():
    torch.manual_seed(4)
    conv, fc = nn.Conv2d(2, 6, 3), nn.Linear(6 * 5 * 5, 4)  # 7x7 input -> 5x5 maps
    new_conv, new_fc = prune_conv_channels(conv, fc, 0.5, spatial=25)
    assert new_conv.out_channels == 3 and new_fc.in_features == 3 * 25
    reference = copy.deepcopy(conv)
    zero_units(reference, strongest(filter_l1(conv), 3))
    x = torch.randn(3, 2, 7, 7)
    torch.testing.assert_close(new_fc(F.relu(new_conv(x)).flatten(1)),
                               fc(F.relu(reference(x)).flatten(1)))


@pytest.mark.parametrize("keep", [0.5, 5])
def test_shrink_mlp_equals_the_original_with_units_zeroed(keep):
    model = small_mlp(act=nn.GELU)
    new = shrink_mlp(model, keep)
    h1, h2 = (8, 6) if keep == 0.5 else (5, 5)
    assert [m.out_features for m in new if isinstance(m, nn.Linear)] == [h1, h2, 4]
    assert list(dict(new.named_children())) == ["fc1", "act1", "fc2", "act2", "fc3"]
    reference = copy.deepcopy(model)
    zero_units(reference.fc1, strongest(row_norms(model.fc1), h1))  # ranked on the
    zero_units(reference.fc2, strongest(row_norms(model.fc2), h2))  # original weights
    x = torch.randn(6, 8)
    torch.testing.assert_close(new(x), reference(x))
    assert count_parameters(new) == 8 * h1 + h1 + h1 * h2 + h2 + h2 * 4 + 4
    assert count_parameters(model) == 8 * 16 + 16 + 16 * 12 + 12 + 12 * 4 + 4  # untouched


def test_shrink_lenet_equals_the_original_with_units_zeroed():
    model = lenet()
    new = shrink_lenet(model, 0.5)
    assert isinstance(new, LeNet5)
    c1, c3, c5, f6 = 3, 8, 60, 42
    reference = copy.deepcopy(model)
    zero_units(reference.features[0], strongest(filter_l1(model.features[0]), c1))
    zero_units(reference.features[3], strongest(filter_l1(model.features[3]), c3))
    zero_units(reference.classifier[1], strongest(row_norms(model.classifier[1]), c5))
    zero_units(reference.classifier[3], strongest(row_norms(model.classifier[3]), f6))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x), reference(x))
    expected = (c1 * (25 + 1) + c3 * (c1 * 25 + 1) + c5 * (c3 * 25 + 1) + f6 * (c5 + 1)
                + 10 * (f6 + 1))
    assert count_parameters(new) == expected < count_parameters(model) == 61_706


def test_shrink_lenet_per_layer_keep():
    model = lenet()
    new = shrink_lenet(model, {"C3": 4})
    assert [new.features[0].out_channels, new.features[3].out_channels] == [6, 4]
    assert [new.classifier[1].in_features, new.classifier[1].out_features] == [100, 120]
    reference = copy.deepcopy(model)
    zero_units(reference.features[3], strongest(filter_l1(model.features[3]), 4))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x), reference(x))


@pytest.mark.parametrize("keep", [0.5, 40])
def test_shrink_gpt_mlp_equals_the_original_with_hidden_units_zeroed(keep):
    model = small_gpt()
    before = copy.deepcopy(model.state_dict())
    new = shrink_gpt_mlp(model, keep)
    width = 64 if keep == 0.5 else 40
    assert new.config.d_ff == width and model.config.d_ff is None
    reference = copy.deepcopy(model)
    for block, ref in zip(model.blocks, reference.blocks, strict=True):
        zero_units(ref.mlp.fc, strongest(row_norms(block.mlp.fc), width))
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(new(idx), reference(idx))
    d, layers = 32, 2
    assert count_parameters(new) == count_parameters(model) - layers * (128 - width) * (2 * d + 1)
    assert count_parameters(GPT(new.config)) == count_parameters(new)  # config is consistent
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), "the original changed"


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, 3, float("nan")])
def test_magnitude_prune_refuses_an_amount_out_of_range(amount):
    with pytest.raises(ValueError, match=r"amount is the fraction of weights to prune, a float in \[0, 1\)"):
        magnitude_prune(small_mlp(), amount)


@pytest.mark.parametrize("amount", ["0.5", True, None])
def test_magnitude_prune_refuses_an_amount_that_is_not_a_number(amount):
    with pytest.raises(TypeError, match=r"amount must be a float in \[0, 1\)"):
        magnitude_prune(small_mlp(), amount)


def test_magnitude_prune_refuses_bad_scope_modules_and_models():
    with pytest.raises(ValueError, match=r"scope must be one of \('global', 'layer'\), got 'local'"):
        magnitude_prune(small_mlp(), 0.5, scope="local")
    with pytest.raises(ValueError, match="model has no module named 'fc9'; its nn.Linear and nn.Conv2d layers are: fc1, fc2, fc3"):
        magnitude_prune(small_mlp(), 0.5, modules=["fc9"])
    with pytest.raises(ValueError, match="module 'act1' is a ReLU; expected an nn.Linear or nn.Conv2d"):
        magnitude_prune(small_mlp(), 0.5, modules=["act1"])
    with pytest.raises(TypeError, match="modules must be a list of module names"):
        magnitude_prune(small_mlp(), 0.5, modules="fc1")
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d layer to prune in ReLU"):
        magnitude_prune(nn.ReLU(), 0.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        sparsity({})
    model = small_mlp()
    torch_prune.l1_unstructured(model.fc1, "weight", 0.5)
    with pytest.raises(TypeError, match="call torch.nn.utils.prune.remove"):
        magnitude_prune(model, 0.5)


def test_apply_masks_refuses_bad_masks():
    model = small_mlp()
    with pytest.raises(ValueError, match="model has no parameter named 'fc9.weight'"):
        apply_masks(model, {"fc9.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"the mask of 'fc1.weight' has shape \(8, 16\), the parameter \(16, 8\)"):
        apply_masks(model, {"fc1.weight": torch.ones(8, 16)})
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        apply_masks(model, {"fc1.weight": torch.full((16, 8), 0.5)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        apply_masks(model, [torch.ones(16, 8)])


@pytest.mark.parametrize("keep, error, message", [
    (0, ValueError, r"keep=0 units for .*, which has 20; expected an int from 1 to 20"),
    (21, ValueError, r"keep=21 units for .*, which has 20; expected an int from 1 to 20"),
    (1.5, ValueError, r"keep=1.5 for .*: a float keep is a fraction in \(0, 1\]"),
    (0.0, ValueError, r"keep=0.0 for .*: a float keep is a fraction in \(0, 1\]"),
    (0.01, ValueError, r"keep=0.01 of the 20 units of .* rounds to 0"),
    ("half", TypeError, r"keep must be an int \(a count\) or a float \(a fraction\)"),
])
def test_structured_pruning_refuses_a_bad_keep(keep, error, message):
    with pytest.raises(error, match=message):
        prune_linear_neurons(nn.Linear(4, 20), nn.Linear(20, 3), keep)


def test_structured_pruning_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="first has 20 outputs but second has 10 inputs"):
        prune_linear_neurons(nn.Linear(4, 20), nn.Linear(10, 3), 5)
    with pytest.raises(TypeError, match="second must be an nn.Linear, got Conv2d"):
        prune_linear_neurons(nn.Linear(4, 20), nn.Conv2d(20, 3, 1), 5)
    with pytest.raises(ValueError, match="conv has 6 output channels but next_layer has 4 input channels"):
        prune_conv_channels(nn.Conv2d(1, 6, 3), nn.Conv2d(4, 2, 3), 2)
    with pytest.raises(ValueError, match=r"next_layer has 100 inputs, but conv's 6 channels times spatial=16 give 96"):
        prune_conv_channels(nn.Conv2d(1, 6, 3), nn.Linear(100, 2), 2, spatial=16)
    with pytest.raises(ValueError, match="spatial=4 applies only when next_layer is an nn.Linear"):
        prune_conv_channels(nn.Conv2d(1, 6, 3), nn.Conv2d(6, 2, 3), 2, spatial=4)
    with pytest.raises(TypeError, match="next_layer must be an nn.Conv2d or nn.Linear, got ReLU"):
        prune_conv_channels(nn.Conv2d(1, 6, 3), nn.ReLU(), 2)
    with pytest.raises(ValueError, match="conv is a grouped convolution"):
        prune_conv_channels(nn.Conv2d(2, 6, 3, groups=2), nn.Conv2d(6, 2, 3), 2)
    with pytest.raises(ValueError, match="keep=7 units for the output channels of conv, which has 6"):
        prune_conv_channels(nn.Conv2d(1, 6, 3), nn.Conv2d(6, 2, 3), 7)


def test_whole_model_shrinkers_refuse_bad_input():
    with pytest.raises(ValueError, match=r"at least one \(nn.Linear, activation, nn.Linear\) run, got \[Linear, Softmax, Linear\]"):
        shrink_mlp(nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1), nn.Linear(4, 2)), 2)
    with pytest.raises(TypeError, match="model must be an nn.Sequential, got LeNet5"):
        shrink_mlp(lenet(), 0.5)
    with pytest.raises(ValueError, match="keep=10 units for LeNet5 layer C1, which has 6"):
        shrink_lenet(lenet(), 10)
    with pytest.raises(ValueError, match=r"keep names unknown LeNet5 layers \['C7'\]"):
        shrink_lenet(lenet(), {"C7": 0.5})
    with pytest.raises(TypeError, match="model must be an aimodels.cnn.LeNet5, got Sequential"):
        shrink_lenet(small_mlp(), 0.5)
    with pytest.raises(ValueError, match="keep=200 units for the feed-forward network of block 0, which has 128"):
        shrink_gpt_mlp(small_gpt(), 200)
    with pytest.raises(TypeError, match="model must be an aimodels.gpt.GPT, got LeNet5"):
        shrink_gpt_mlp(lenet(), 0.5)
