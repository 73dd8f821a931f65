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
