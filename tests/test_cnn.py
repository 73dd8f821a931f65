"""Chapter 4: convolution and pooling from scratch against PyTorch, LeNet-5, and data loaders."""

import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aimodels import cnn, data, scaling

CASES = [
    # (batch, in_ch, out_ch, height, width, kernel, stride, padding)
    (1, 1, 1, 5, 5, 3, 1, 0),
    (2, 3, 4, 9, 8, (3, 2), 1, 0),
    (2, 3, 4, 9, 8, 3, 2, 1),
    (3, 2, 5, 7, 11, (2, 3), (2, 1), (0, 2)),
    (1, 4, 2, 6, 6, 6, 1, 0),
    (2, 1, 6, 32, 32, 5, 1, 2),
    (2, 6, 16, 14, 14, 5, 3, 2),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_pytorch(case, bias):
    n, c, o, h, w, k, s, p = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    expected = F.conv2d(x, weight, b, stride=s, padding=p)
    torch.testing.assert_close(cnn.conv2d(x, weight, b, stride=s, padding=p), expected)
    torch.testing.assert_close(cnn.conv2d_loops(x, weight, b, stride=s, padding=p), expected)
    torch.testing.assert_close(cnn.im2col(x, (kh, kw), s, p), F.unfold(x, (kh, kw), padding=p, stride=s))


def test_conv2d_over_many_random_shapes():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        n, c, o = (int(v) for v in torch.randint(1, 4, (3,), generator=g))
        kh, kw = (int(v) for v in torch.randint(1, 5, (2,), generator=g))
        sh, sw = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
        ph, pw = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
        h = kh + int(torch.randint(0, 8, (1,), generator=g))
        w = kw + int(torch.randint(0, 8, (1,), generator=g))
        x = torch.randn(n, c, h, w, generator=g)
        weight = torch.randn(o, c, kh, kw, generator=g)
        bias = torch.randn(o, generator=g)
        torch.testing.assert_close(
            cnn.conv2d(x, weight, bias, (sh, sw), (ph, pw)),
            F.conv2d(x, weight, bias, stride=(sh, sw), padding=(ph, pw)),
            rtol=1e-4, atol=1e-4,
        )


def test_conv2d_gradients_flow_like_pytorch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    (ours_x, ours_w) = torch.autograd.grad(cnn.conv2d(x, weight, stride=2, padding=1).square().sum(), (x, weight))
    (ref_x, ref_w) = torch.autograd.grad(F.conv2d(x, weight, stride=2, padding=1).square().sum(), (x, weight))
    torch.testing.assert_close(ours_x, ref_x)
    torch.testing.assert_close(ours_w, ref_w)


def test_conv2d_errors_say_what_was_expected():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="weight expects 2 input channels, but the input has 3"):
        cnn.conv2d(x, torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, channels, height, width\], got \(3, 8, 8\)"):
        cnn.conv2d(x[0], torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="kernel 9 does not fit an input of size 8 with padding 0"):
        cnn.conv2d(x, torch.zeros(4, 3, 9, 9))
    with pytest.raises(ValueError, match=r"expected bias of shape \[4\], got \(3,\)"):
        cnn.conv2d(x, torch.zeros(4, 3, 3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        cnn.conv2d(x, torch.zeros(4, 3, 3, 3), stride=0)


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 1), ((3, 2), (2, 1)), (2, 3)])
def test_pooling_matches_pytorch(kernel, stride):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(cnn.max_pool2d(x, kernel, stride), F.max_pool2d(x, kernel, stride))
    torch.testing.assert_close(cnn.avg_pool2d(x, kernel, stride), F.avg_pool2d(x, kernel, stride))


def test_output_size_and_receptive_field():
    assert cnn.output_size(32, 5) == 28
    assert cnn.output_size(28, 2, 2) == 14
    assert cnn.output_size(7, 3, 2, 1) == 4
    # LeNet-5: C1 sees 5 pixels, S2 6, C3 14, S4 16.
    assert [cnn.receptive_field([(5, 1), (2, 2), (5, 1), (2, 2)][:i]) for i in range(1, 5)] == [5, 6, 14, 16]
    assert cnn.receptive_field([(3, 1)] * 3) == 7


def test_lenet_layer_table_agrees_with_the_flop_counter_and_parameter_count():
    model = cnn.LeNet5()
    rows = cnn.layer_table(model, (1, 32, 32))
    assert [r["output"] for r in rows if r["type"] == "Conv2d"] == [(6, 28, 28), (16, 10, 10)]
    assert sum(r["parameters"] for r in rows) == scaling.count_parameters(model) == 61_706
    assert sum(r["flops"] for r in rows) == scaling.measure_flops(model, torch.zeros(1, 1, 32, 32))


# --------------------------------------------------------------------------- data loaders
def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for dim in array.shape:
            f.write(struct.pack(">I", dim))
        f.write(array.astype(np.uint8).tobytes())


def _tiny_mnist(root, n=6):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)


def test_mnist_loads_tiny_files_written_here(tmp_path):
    _tiny_mnist(tmp_path)
    train = data.mnist(tmp_path, train=True)
    image, label = train[3]
    assert len(train) == 6 and image.shape == (1, 28, 28) and label == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert len(data.mnist(tmp_path, train=False)) == 6


def test_mnist_missing_gives_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download=True" in message
    assert "aimodels.data.digits" in message


def test_mnist_download_without_network_gives_the_same_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.MNIST, "download", no_network)
    with pytest.raises(data.DatasetNotFoundError, match="Error downloading"):
        data.mnist(tmp_path, download=True)


def _tiny_cifar(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in data.CIFAR10_FILES[:-1]:
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_cifar10_loads_tiny_files_written_here(tmp_path):
    _tiny_cifar(tmp_path)
    train = data.cifar10(tmp_path, train=True, verify_checksums=False)
    image, label = train[2]
    assert len(train) == 5 * 4 and image.shape == (3, 32, 32) and label == 2
    assert train.classes[0] == "class0"
    assert len(data.cifar10(tmp_path, train=False, verify_checksums=False)) == 4


def test_cifar10_checksums_reject_files_that_are_not_the_real_ones(tmp_path):
    _tiny_cifar(tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="MD5 checksum"):
        data.cifar10(tmp_path)


def test_cifar10_missing_gives_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match=r"7 file\(s\) missing from .*cifar-10-batches-py"):
        data.cifar10(tmp_path)


# --------------------------------------------------------------------------- backward pass
BACKWARD_CASES = [
    # (batch, in_ch, out_ch, height, width, kernel, stride, padding)
    (2, 3, 4, 7, 7, 3, 1, 0),
    (2, 3, 4, 7, 6, 3, 1, 1),
    (1, 2, 3, 6, 8, (2, 3), 1, (2, 1)),
    (2, 1, 2, 5, 5, 5, 1, 2),
    (2, 3, 2, 8, 8, 3, 2, 1),  # stride 2, every row reached
    (2, 2, 3, 9, 8, 3, 2, 0),  # stride 2, the last column is never reached
    (1, 2, 2, 10, 7, (3, 2), (3, 2), (1, 0)),
]


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_conv2d_backward_matches_autograd(case):
    n, c, o, h, w, k, s, p = case
    g = torch.Generator().manual_seed(7)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, kh, kw, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, generator=g, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, weight, bias, stride=s, padding=p)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(out, (x, weight, bias), grad_out)
    ours = cnn.conv2d_backward(x.detach(), weight.detach(), grad_out, stride=s, padding=p)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_backward_in_stride_one_is_a_full_convolution_and_a_correlation():
    """dL/dx: g padded by k - 1, correlated with the flipped kernel (channels swapped);
    dL/dw: the input correlated with g, batch and channel axes swapped."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for padding in (0, 1):
        out = F.conv2d(x, weight, padding=padding)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        dx, dw = torch.autograd.grad(out, (x, weight), grad_out)
        full = cnn.conv2d(grad_out, weight.detach().flip(2, 3).transpose(0, 1), padding=(2, 1))
        torch.testing.assert_close(full[:, :, padding:padding + 6, padding:padding + 7], dx)
        correlation = cnn.conv2d(x.detach().transpose(0, 1), grad_out.transpose(0, 1),
                                 padding=padding).transpose(0, 1)
        torch.testing.assert_close(correlation, dw)


def test_conv2d_backward_errors_say_what_was_expected():
    x, weight = torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match="grad_out has 5 channels, but the weight has 4 output"):
        cnn.conv2d_backward(x, weight, torch.zeros(1, 5, 6, 6))
    with pytest.raises(ValueError, match=r"gives outputs of size \(6, 6\), but grad_out has size \(7, 7\)"):
        cnn.conv2d_input_grad(torch.zeros(1, 4, 7, 7), weight, (8, 8))
    with pytest.raises(ValueError, match="does not match the output of a 3x3 convolution"):
        cnn.conv2d_weight_grad(x, torch.zeros(1, 4, 5, 5), 3)


# --------------------------------------------------------------------------- batch norm
def _twin_batchnorms(channels, momentum=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = cnn.BatchNorm2d(channels, momentum=momentum).double()
    ref = torch.nn.BatchNorm2d(channels, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(channels, generator=g))
        ours.bias.copy_(torch.randn(channels, generator=g))
    ref.load_state_dict(ours.state_dict())
    return ours, ref, g


def _forward_backward(module, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = module(x)
    grads = torch.autograd.grad(out, (x, module.weight, module.bias), grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_batchnorm_matches_pytorch_in_training_and_eval(momentum):
    ours, ref, g = _twin_batchnorms(3, momentum)
    shapes = [(4, 3, 5, 5), (2, 3, 4, 6), (8, 3, 1, 1), (3, 3, 2, 2)]
    for step, shape in enumerate(shapes, start=1):  # training: batch statistics
        x = 2.0 + 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
        (out, grads), (ref_out, ref_grads) = (_forward_backward(m, x, grad_out) for m in (ours, ref))
        torch.testing.assert_close(out, ref_out)
        for got, want in zip(grads, ref_grads, strict=True):  # input, gamma, beta
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step
    # the running variance uses the unbiased batch variance: check the last update by hand
    before = ours.running_var.clone()
    x = torch.randn(2, 3, 3, 1, generator=g, dtype=torch.float64)
    ours(x)
    unbiased = x.transpose(0, 1).reshape(3, -1).var(dim=1, correction=1)
    torch.testing.assert_close(ours.running_var, (1 - momentum) * before + momentum * unbiased)
    ref(x)
    ours.eval()
    ref.eval()
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (out, grads), (ref_out, ref_grads) = (_forward_backward(m, x, grad_out) for m in (ours, ref))
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    # eval mode uses the running statistics and leaves them alone; one image works alone
    frozen = ours.running_mean.clone()
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1])
    torch.testing.assert_close(ours.running_mean, frozen)


def test_batchnorm_state_dicts_load_both_ways_and_errors_are_clear():
    ours, ref, _ = _twin_batchnorms(4)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match=r"expects 4 channels, got input of shape \(2, 3, 5, 5\)"):
        ours(torch.zeros(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than one value per channel"):
        ours(torch.zeros(1, 4, 1, 1, dtype=torch.float64))
    ours.eval()
    assert ours(torch.zeros(1, 4, 1, 1, dtype=torch.float64)).shape == (1, 4, 1, 1)
    with pytest.raises(ValueError, match=r"momentum must be a number in \(0, 1\]"):
        cnn.BatchNorm2d(4, momentum=0.0)
    with pytest.raises(ValueError, match="momentum=None\\) is not supported"):
        cnn.BatchNorm2d(4, momentum=None)


# --------------------------------------------------------------------------- residual blocks
def test_residual_block_shapes_and_shortcuts():
    x = torch.randn(2, 8, 8, 8)
    same = cnn.ResidualBlock(8, 8)
    assert isinstance(same.shortcut, torch.nn.Identity) and same(x).shape == (2, 8, 8, 8)
    down = cnn.ResidualBlock(8, 16, stride=2)
    conv, norm = down.shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.out_channels == 16
    assert isinstance(norm, cnn.BatchNorm2d) and down(x).shape == (2, 16, 4, 4)
    wider = cnn.ResidualBlock(8, 12)  # only the channels change: a projection too
    assert wider.shortcut[0].stride == (1, 1) and wider(x).shape == (2, 12, 8, 8)
    plain = cnn.ResidualBlock(8, 16, stride=2, residual=False)
    assert plain.shortcut is None and plain(x).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"expects 8 channels, got input of shape \(2, 3, 8, 8\)"):
        same(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("training", [True, False])
def test_a_block_with_a_zeroed_residual_branch_is_relu_of_the_shortcut(training):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    block = cnn.ResidualBlock(8, 8, zero_init=True).train(training)
    torch.nn.init.zeros_(block.bn2.bias)  # with beta = 0 too, F(x) = 0 exactly
    torch.testing.assert_close(block(x), torch.relu(x))
    torch.testing.assert_close(block(x.relu()), x.relu())  # identity on non-negative inputs
    down = cnn.ResidualBlock(8, 16, stride=2, zero_init=True).train(training)
    torch.nn.init.zeros_(down.bn2.bias)
    torch.testing.assert_close(down(x), torch.relu(down.shortcut(x)))
    branch = cnn.ResidualBlock(8, 8).train(training)  # without zeroing, F(x) is not 0
    assert not torch.allclose(branch(x), torch.relu(x))


@pytest.mark.parametrize("in_ch,out_ch,stride", [(6, 6, 1), (6, 10, 2)])
def test_residual_block_matches_torchvision_basic_block(in_ch, out_ch, stride):
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(1)
    ours = cnn.ResidualBlock(in_ch, out_ch, stride).double()
    downsample = None
    if ours.shortcut is not None and not isinstance(ours.shortcut, torch.nn.Identity):
        downsample = torch.nn.Sequential(
            torch.nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), torch.nn.BatchNorm2d(out_ch))
    ref = BasicBlock(in_ch, out_ch, stride, downsample).double()
    with torch.no_grad():  # random gammas and betas, so that every parameter matters
        for name, p in ours.named_parameters():
            if name.endswith(("bn1.weight", "bn2.weight", "shortcut.1.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_()
    ref.load_state_dict({k.replace("shortcut.", "downsample."): v
                         for k, v in ours.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(3, in_ch, 7, 7, generator=g, dtype=torch.float64)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        outs = [ours(xs[0]), ref(xs[1])]
        torch.testing.assert_close(outs[0], outs[1])
        grad_out = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
        grads = [torch.autograd.grad(o, (xi, *m.parameters()), grad_out)
                 for o, xi, m in zip(outs, xs, (ours, ref), strict=True)]
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.bn1.running_var, ref.bn1.running_var)


def test_small_resnet_depth_shapes_and_the_plain_twin():
    resnet, plain = cnn.SmallResNet(), cnn.SmallResNet(residual=False)
    x = torch.randn(5, 1, 8, 8)
    assert resnet(x).shape == plain(x).shape == (5, 10)

    def weighted_layers(model):  # 3x3 convolutions and the linear layer, shortcuts left out
        return [m for m in model.modules()
                if isinstance(m, torch.nn.Linear)
                or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))]

    assert len(weighted_layers(resnet)) == len(weighted_layers(plain)) == 2 * 2 * 3 + 2
    # the only extra parameters: two projection shortcuts (8->16 and 16->32), conv + BN
    extra = (8 * 16 + 2 * 16) + (16 * 32 + 2 * 32)
    assert scaling.count_parameters(resnet) - scaling.count_parameters(plain) == extra
    assert resnet.features[3](torch.randn(2, 8, 8, 8)).shape == (2, 8, 8, 8)


# --------------------------------------------------------------------------- depthwise separable
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False), ((2, 1), (1, 2), True)])
def test_depthwise_conv2d_matches_grouped_conv(stride, padding, bias):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 1, 3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    torch.testing.assert_close(cnn.depthwise_conv2d(x, weight, b, stride, padding),
                               F.conv2d(x, weight, b, stride=stride, padding=padding, groups=5))
    with pytest.raises(ValueError, match=r"depthwise weight of shape \[5, 1, kh, kw\]"):
        cnn.depthwise_conv2d(x, torch.zeros(5, 5, 3, 3))


def test_separable_layer_is_depthwise_then_pointwise_and_its_costs_are_counted():
    torch.manual_seed(0)
    layer = cnn.DepthwiseSeparableConv2d(16, 32, kernel_size=3, stride=2, padding=1).double()
    x = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    depthwise = cnn.depthwise_conv2d(x, layer.depthwise.weight, stride=2, padding=1)
    torch.testing.assert_close(layer(x), cnn.conv2d(depthwise, layer.pointwise.weight))
    assert layer(x).shape == (2, 32, 5, 5)
    for c_in, c_out, k, size in [(16, 32, 3, 5), (32, 64, 5, 7), (3, 8, 3, 4)]:
        separable = cnn.DepthwiseSeparableConv2d(c_in, c_out, k, padding=k // 2)
        standard = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        image = torch.zeros(1, c_in, size, size)
        for model, is_separable in ((separable, True), (standard, False)):
            costs = cnn.conv_costs(c_in, c_out, k, size, size, separable=is_separable)
            assert costs["parameters"] == scaling.count_parameters(model)
            assert 2 * costs["mult_adds"] == scaling.measure_flops(model, image)
        ratio = (cnn.conv_costs(c_in, c_out, k, size, size, True)["mult_adds"]
                 / cnn.conv_costs(c_in, c_out, k, size, size)["mult_adds"])
        assert ratio == pytest.approx(1 / c_out + 1 / k**2, rel=1e-12)


# --------------------------------------------------------------------------- augmentation
def test_shift_images_matches_torchvision_translation():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 2, 8, 7, generator=g)
    dy, dx = torch.tensor([0, 1, -1, 2, -3, 1]), torch.tensor([0, -1, 2, 0, 1, 3])
    shifted = cnn.shift_images(x, dy, dx)
    for i in range(6):
        expected = TF.affine(x[i], angle=0.0, translate=[int(dx[i]), int(dy[i])], scale=1.0,
                             shear=[0.0, 0.0])
        torch.testing.assert_close(shifted[i], expected)
    assert shifted[1, :, 0].abs().sum() == 0 and shifted[1, :, :, -1].abs().sum() == 0
    torch.testing.assert_close(cnn.shift_images(x, torch.zeros(6, dtype=torch.long),
                                                torch.zeros(6, dtype=torch.long)), x)
    with pytest.raises(ValueError, match="integer tensors of shape"):
        cnn.shift_images(x, dy.float(), dx)


def test_random_shift_draws_each_offset_in_range():
    x = torch.zeros(400, 1, 5, 5)
    x[:, :, 2, 2] = 1.0  # one bright pixel in the middle: its new place is the shift
    out = cnn.random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    rows, cols = out[:, 0].flatten(1).argmax(1).div(5, rounding_mode="floor"), out[:, 0].flatten(1).argmax(1) % 5
    assert set((rows - 2).tolist()) == set((cols - 2).tolist()) == {-2, -1, 0, 1, 2}
    again = cnn.random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_separable_convolution_keeps_the_size_by_default(kernel):
    layer = cnn.DepthwiseSeparableConv2d(3, 8, kernel_size=kernel)
    assert layer(torch.zeros(2, 3, 9, 9)).shape == (2, 8, 9, 9)
    assert cnn.DepthwiseSeparableConv2d(3, 8, kernel, padding=0)(torch.zeros(1, 3, 9, 9)).shape \
        == (1, 8, 10 - kernel, 10 - kernel)
