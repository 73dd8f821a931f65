"""Convolutional networks from scratch (Chapter 4): convolution, pooling, LeNet-5, and
the pieces of modern CNNs.

Two convolutions: :func:`conv2d_loops`, which walks over output positions with
explicit loops, and :func:`conv2d`, which turns the input into a matrix of patches
(:func:`im2col`) and does one matrix product. ``tests/test_cnn.py`` checks both
against ``torch.nn.functional.conv2d`` for many shapes, strides and paddings. After
LeNet-5 come the convolution's backward pass, batch normalisation, residual blocks,
depthwise-separable convolution and shift augmentation, each checked against PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IntPair = int | tuple[int, int]


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    r"""Output length of a convolution or pooling along one axis.

    :math:`\lfloor (n + 2p - k) / s \rfloor + 1` for input length n, kernel k, stride s
    and padding p (Dumoulin and Visin, 2016).
    """
    if size + 2 * padding < kernel:
        raise ValueError(
            f"kernel {kernel} does not fit an input of size {size} with padding {padding}"
        )
    return (size + 2 * padding - kernel) // stride + 1


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"expected input of shape [batch, channels, height, width], got {tuple(x.shape)}"
        )


def _check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 4:
        raise ValueError("expected weight of shape [out_channels, in_channels, kh, kw], "
                         f"got {tuple(weight.shape)}")


def _check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_images(x)
    _check_weight(weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight expects {weight.shape[1]} input channels, but the input has {x.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias of shape [{weight.shape[0]}], got {tuple(bias.shape)}")


def conv2d_loops(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    r"""2-D convolution (cross-correlation, as in PyTorch) with explicit loops.

    .. math:: y_{n,o,i,j} = b_o + \sum_{c,u,v} w_{o,c,u,v}\, x_{n,c,\,i s + u,\, j s + v}

    on the zero-padded input. The two loops run over output rows and columns; at each
    position one patch of every image meets every filter. Slow, but the formula is in
    plain sight.
    """
    _check_conv_args(x, weight, bias)
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    out_channels, _, kh, kw = weight.shape
    oh = output_size(x.shape[2], kh, sh, ph)
    ow = output_size(x.shape[3], kw, sw, pw)
    padded = F.pad(x, (pw, pw, ph, ph))
    out = x.new_zeros(x.shape[0], out_channels, oh, ow)
    for i in range(oh):
        for j in range(ow):
            # one patch per image: [N, C, kh, kw]
            patch = padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            out[:, :, i, j] = torch.einsum("nchw,ochw->no", patch, weight)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def im2col(
    x: torch.Tensor, kernel: IntPair, stride: IntPair = 1, padding: IntPair = 0
) -> torch.Tensor:
    """Unfold every kernel-sized patch of ``x`` into a column: ``[N, C·kh·kw, oh·ow]``.

    The same layout as ``torch.nn.functional.unfold`` (Chellapilla et al., 2006). It uses
    ``Tensor.unfold``, which makes sliding windows as a view without copying, then one
    reshape that does copy.
    """
    (kh, kw), (sh, sw) = _pair("kernel", kernel, 1), _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    _check_images(x)
    output_size(x.shape[2], kh, sh, ph), output_size(x.shape[3], kw, sw, pw)  # validate
    # sliding windows as a view: [N, C, oh, ow, kh, kw]
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)
    n, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    """2-D convolution as one matrix product: filters ``[O, C·kh·kw]`` times patches.

    Same semantics as ``torch.nn.functional.conv2d`` (no dilation, no groups).
    """
    _check_conv_args(x, weight, bias)
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    oh = output_size(x.shape[2], kh, sh, ph)
    ow = output_size(x.shape[3], kw, sw, pw)
    columns = im2col(x, (kh, kw), (sh, sw), (ph, pw))  # [N, C*kh*kw, oh*ow]
    out = weight.reshape(out_channels, -1) @ columns  # [N, O, oh*ow]
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(x.shape[0], out_channels, oh, ow)


def max_pool2d(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None) -> torch.Tensor:
    """Max pooling from scratch: the largest value of each window, channel by channel.

    ``stride`` defaults to the kernel size, as in PyTorch, so windows do not overlap.
    """
    return _pool(x, kernel, stride, "max")


def avg_pool2d(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None) -> torch.Tensor:
    """Average pooling from scratch: the mean of each window, channel by channel."""
    return _pool(x, kernel, stride, "mean")


def _pool(x: torch.Tensor, kernel: IntPair, stride: IntPair | None, how: str) -> torch.Tensor:
    _check_images(x)
    kh, kw = _pair("kernel", kernel, 1)
    sh, sw = (kh, kw) if stride is None else _pair("stride", stride, 1)
    n, c, h, w = x.shape
    columns = im2col(x.reshape(n * c, 1, h, w), (kh, kw), (sh, sw))  # [N*C, kh*kw, oh*ow]
    pooled = columns.amax(dim=1) if how == "max" else columns.mean(dim=1)
    return pooled.view(n, c, output_size(h, kh, sh), output_size(w, kw, sw))


def receptive_field(layers: list[tuple[int, int]]) -> int:
    r"""Side of the input region that one output unit of a stack of layers can see.

    ``layers`` lists ``(kernel, stride)`` from the input upwards. Each layer widens the
    field by :math:`(k - 1)` times the product of the strides below it.
    """
    field, jump = 1, 1
    for kernel, stride in layers:
        if kernel < 1 or stride < 1:
            raise ValueError(f"kernel and stride must be >= 1, got ({kernel}, {stride})")
        field += (kernel - 1) * jump
        jump *= stride
    return field


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """One row per leaf layer: name, type, output shape, parameters and FLOPs for one input.

    FLOPs count multiply-adds of convolutions and linear layers as 2 each, as
    ``torch.utils.flop_counter`` does; activations and pooling count as 0.
    """
    rows: list[dict] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        flops = 0
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops = 2 * module.in_channels // module.groups * kh * kw * output[0].numel()
        elif isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
        rows.append({
            "name": names[module],
            "type": type(module).__name__,
            "output": tuple(output.shape[1:]),
            "parameters": sum(p.numel() for p in module.parameters()),
            "flops": flops,
        })

    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return rows


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with today's usual choices: ReLU and max pooling.

    Layers, for a ``[N, in_channels, 32, 32]`` input:

    ======  ===========================  ==============================
    layer   what                         parameters (1 input channel)
    ======  ===========================  ==============================
    C1      6 filters 5×5                6·(1·25 + 1) = 156
    S2      2×2 max pooling              0
    C3      16 filters 5×5 over 6 maps   16·(6·25 + 1) = 2,416
    S4      2×2 max pooling              0
    C5      400 → 120 fully connected    120·(400 + 1) = 48,120
    F6      120 → 84                     84·(120 + 1) = 10,164
    output  84 → ``num_classes``         10·(84 + 1) = 850
    ======  ===========================  ==============================

    Total 61,706 for one channel and 10 classes. The 1998 paper reports about 60,000
    because its C3 connects each map to only some of S2's maps, and its output layer
    is a radial-basis layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (32, 32):
            raise ValueError(
                f"LeNet5 expects images of shape [batch, {self.in_channels}, 32, 32], "
                f"got {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- backward pass
def _check_grad_out(grad_out: torch.Tensor, weight: torch.Tensor) -> None:
    _check_images(grad_out)
    _check_weight(weight)
    if grad_out.shape[1] != weight.shape[0]:
        raise ValueError(
            f"grad_out has {grad_out.shape[1]} channels, but the weight has "
            f"{weight.shape[0]} output channels"
        )


def conv2d_input_grad(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    input_size: tuple[int, int],
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    r"""Gradient of the loss with respect to a convolution's input, from scratch.

    With stride 1, :math:`\partial L/\partial \tilde x_{n,c,r,t} = \sum_{o,u,v}
    g_{n,o,r-u,t-v}\, w_{o,c,u,v}` on the padded input :math:`\tilde x`: a *full*
    convolution of the output gradient ``g`` with the kernel, that is a correlation of
    ``g`` padded by k - 1 with the kernel flipped in both axes and its channel axes
    swapped. With stride s, ``g`` first gets s - 1 zeros between its entries. Rows and
    columns that no window reached get zero gradient; the padding is then cut off.
    """
    _check_grad_out(grad_out, weight)
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    height, width = _pair("input_size", input_size, 1)
    out_channels, _, kh, kw = weight.shape
    oh, ow = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    if tuple(grad_out.shape[2:]) != (oh, ow):
        raise ValueError(
            f"an input of size {(height, width)} gives outputs of size {(oh, ow)}, "
            f"but grad_out has size {tuple(grad_out.shape[2:])}"
        )
    # 1. spread the output gradient out to the input's grid: s - 1 zeros between entries
    spread = grad_out.new_zeros(grad_out.shape[0], out_channels, (oh - 1) * sh + 1,
                                (ow - 1) * sw + 1)
    spread[:, :, ::sh, ::sw] = grad_out
    # 2. full correlation with the flipped kernel, channels swapped: [C, O, kh, kw]
    flipped = weight.flip(2, 3).transpose(0, 1)
    full = conv2d(spread, flipped, padding=(kh - 1, kw - 1))
    # 3. rows and columns of the padded input that no window reached: zero gradient
    full = F.pad(full, (0, width + 2 * pw - full.shape[3], 0, height + 2 * ph - full.shape[2]))
    # 4. the padding is not part of the input
    return full[:, :, ph : ph + height, pw : pw + width]


def conv2d_weight_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    r"""Gradient of the loss with respect to a convolution's weight, from scratch.

    .. math:: \partial L/\partial w_{o,c,u,v} = \sum_{n,i,j} g_{n,o,i,j}\,
              \tilde x_{n,c,\,i s + u,\, j s + v}

    a correlation of the (padded) input with the output gradient. With :func:`im2col`
    it is one matrix product per image: ``g`` ``[O, oh·ow]`` times the patches
    ``[C·kh·kw, oh·ow]`` transposed, summed over the batch.
    """
    _check_images(x)
    _check_images(grad_out)
    kh, kw = _pair("kernel", kernel, 1)
    columns = im2col(x, (kh, kw), stride, padding)  # [N, C*kh*kw, oh*ow]
    if grad_out.shape[0] != x.shape[0] or grad_out.shape[2] * grad_out.shape[3] != columns.shape[2]:
        raise ValueError(
            f"grad_out of shape {tuple(grad_out.shape)} does not match the output of a "
            f"{kh}x{kw} convolution of an input of shape {tuple(x.shape)}"
        )
    g = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)  # [N, O, oh*ow]
    return torch.einsum("nol,nkl->ok", g, columns).reshape(-1, x.shape[1], kh, kw)


def conv2d_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`conv2d` with respect to input, weight and bias, from scratch.

    The bias gradient is the output gradient summed over batch and positions.
    """
    _check_conv_args(x, weight, None)
    _check_grad_out(grad_out, weight)
    grad_x = conv2d_input_grad(grad_out, weight, tuple(x.shape[2:]), stride, padding)
    grad_w = conv2d_weight_grad(x, grad_out, tuple(weight.shape[2:]), stride, padding)
    return grad_x, grad_w, grad_out.sum(dim=(0, 2, 3))


# --------------------------------------------------------------------------- batch norm
class BatchNorm2d(nn.Module):
    r"""Batch normalisation over ``[N, C, H, W]`` from scratch (Ioffe and Szegedy, 2015).

    Each channel is normalised with a mean and variance, then scaled and shifted:

    .. math:: y = \gamma\, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In training, :math:`\mu` and :math:`\sigma^2` are the batch's own, over the m = N·H·W
    values of the channel, and :math:`\sigma^2` is the biased variance (divide by m).
    The running estimates follow
    :math:`\hat\mu \leftarrow (1 - \text{momentum})\,\hat\mu + \text{momentum}\,\mu`, and
    the same for the variance, but with the *unbiased* batch variance
    :math:`\sigma^2 m/(m - 1)`, as ``torch.nn.BatchNorm2d`` does. In evaluation the
    running estimates replace the batch statistics, so each output depends on its own
    input only. Parameter and buffer names match ``nn.BatchNorm2d``, so state dicts load
    both ways.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be a number in (0, 1] (the cumulative average of "
                             f"nn.BatchNorm2d(momentum=None) is not supported), got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm2d expects {self.num_features} channels, got input of shape "
                f"{tuple(x.shape)}"
            )
        if self.training:
            count = x.numel() // x.shape[1]  # m = N * H * W values per channel
            if count < 2:
                raise ValueError(
                    "batch statistics need more than one value per channel in training, "
                    f"got input of shape {tuple(x.shape)}"
                )
            mean = x.mean(dim=(0, 2, 3))
            var = (x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))  # biased
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(
                    self.momentum * var * count / (count - 1)  # unbiased
                )
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + self.eps)
        return self.weight.view(1, -1, 1, 1) * x_hat + self.bias.view(1, -1, 1, 1)


# --------------------------------------------------------------------------- residual blocks
class ResidualBlock(nn.Module):
    r"""The basic residual block of He et al. (2016): :math:`y = \mathrm{ReLU}(F(x) + S(x))`.

    The residual branch is F(x) = BN(conv3x3(ReLU(BN(conv3x3(x))))), its first
    convolution carrying the stride. The shortcut S is the identity when the
    shapes agree, otherwise a 1×1 convolution with the same stride followed by batch norm
    (the paper's projection shortcut, option B). Set the last batch norm's
    :math:`\gamma` and :math:`\beta` to zero and F(x) = 0: the block then computes
    :math:`\mathrm{ReLU}(S(x))`, which with an identity shortcut is ReLU(x), the identity
    for the non-negative outputs of an earlier block. ``zero_init=True`` starts with
    :math:`\gamma = 0` (Goyal et al., 2017). ``residual=False`` drops the shortcut: the
    plain block of the same depth, for comparison. Layer names match torchvision's
    ``BasicBlock`` (whose shortcut is called ``downsample``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        residual: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("stride", stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
        self.shortcut: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                BatchNorm2d(out_channels),
            )
        elif residual:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResidualBlock expects {self.in_channels} channels, got input of shape "
                f"{tuple(x.shape)}"
            )
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return torch.relu(out)


class SmallResNet(nn.Module):
    """A small ResNet in the style of He et al.'s CIFAR-10 networks, for tiny images.

    A 3×3 stem convolution, then one stage of ``blocks_per_stage`` blocks per entry of
    ``widths``; every stage after the first halves height and width (stride 2 in its
    first block). Global average pooling and one linear layer classify. That is
    ``2 · blocks_per_stage · len(widths) + 2`` layers with weights. ``residual=False``
    builds the plain network of the same depth and width.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (8, 16, 32),
        blocks_per_stage: int = 2,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths!r}")
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be a positive int, got {blocks_per_stage!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ResidualBlock(channels, width, stride, residual))
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- depthwise separable
def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    r"""Depthwise convolution from scratch: channel c meets only its own filter.

    .. math:: y_{n,c,i,j} = b_c + \sum_{u,v} w_{c,0,u,v}\, x_{n,c,\,i s + u,\, j s + v}

    ``weight`` is ``[C, 1, kh, kw]``, as for ``F.conv2d(..., groups=C)``. With
    :func:`im2col`, each channel's patches meet one filter: no sum over channels.
    """
    _check_images(x)
    channels = x.shape[1]
    if weight.ndim != 4 or weight.shape[:2] != (channels, 1):
        raise ValueError(
            f"expected a depthwise weight of shape [{channels}, 1, kh, kw] for an input "
            f"with {channels} channels, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"expected bias of shape [{channels}], got {tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    oh, ow = output_size(x.shape[2], kh, sh, ph), output_size(x.shape[3], kw, sw, pw)
    columns = im2col(x, (kh, kw), (sh, sw), (ph, pw))  # [N, C*kh*kw, oh*ow]
    columns = columns.view(x.shape[0], channels, kh * kw, oh * ow)
    out = torch.einsum("nckl,ck->ncl", columns, weight.reshape(channels, kh * kw))
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(x.shape[0], channels, oh, ow)


class DepthwiseSeparableConv2d(nn.Module):
    """A k×k depthwise convolution (``groups=in_channels``) then a 1×1 pointwise one.

    The depthwise step filters each channel on its own (space); the pointwise step mixes
    channels at each position (depth). Chollet (2017) builds Xception from it, Howard et
    al. (2017) MobileNets. No biases by default: batch norm usually follows each step.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding  # "same" size for odd k
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding,
                                   groups=in_channels, bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def conv_costs(
    in_channels: int,
    out_channels: int,
    kernel: int,
    out_height: int,
    out_width: int,
    separable: bool = False,
) -> dict[str, int]:
    r"""Parameters (no biases) and multiply-adds for one image of a k×k convolution.

    Standard: :math:`C_{in} C_{out} k^2` parameters, each used once per output position.
    Depthwise separable: :math:`C_{in} k^2` depthwise plus :math:`C_{in} C_{out}`
    pointwise parameters, both also used once per output position, so the ratio of the
    two, for parameters and for multiply-adds alike, is
    :math:`1/C_{out} + 1/k^2` (Howard et al., 2017).
    """
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel", kernel), ("out_height", out_height), ("out_width", out_width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if separable:
        parameters = in_channels * kernel * kernel + in_channels * out_channels
    else:
        parameters = in_channels * out_channels * kernel * kernel
    return {"parameters": parameters, "mult_adds": parameters * out_height * out_width}


# --------------------------------------------------------------------------- augmentation
def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move image i by ``dy[i]`` pixels down and ``dx[i]`` right; uncovered pixels are 0.

    Negative shifts move up and left. Pixels pushed over the edge are lost. The image is
    padded with zeros, and each output reads the window that starts at the shifted
    corner, all images at once by indexing.
    """
    _check_images(x)
    n, c, h, w = x.shape
    if dy.shape != (n,) or dx.shape != (n,) or dy.is_floating_point() or dx.is_floating_point():
        raise ValueError(
            f"dy and dx must be integer tensors of shape [{n}], got {tuple(dy.shape)} "
            f"{dy.dtype} and {tuple(dx.shape)} {dx.dtype}"
        )
    m = int(max(dy.abs().max(), dx.abs().max(), 0)) if n else 0
    padded = F.pad(x, (m, m, m, m))
    rows = (m - dy).view(n, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)
    cols = (m - dx).view(n, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def random_shift(
    x: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad-and-crop augmentation: each image moves by a random whole number of pixels,
    drawn uniformly from ``[-max_shift, max_shift]`` on each axis independently."""
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    n = x.shape[0]
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    return shift_images(x, dy, dx)
