r"""Tensor parallelism (Chapter 10): a Megatron-style MLP from scratch, then with DTensor.

**The idea** (Shoeybi et al. 2019, "Megatron-LM", arXiv 1909.08053, section 3). A
transformer MLP computes :math:`Z = \mathrm{GeLU}(X A)\, B` with :math:`A` of shape
``[h, 4h]`` and :math:`B` of shape ``[4h, h]``. Split :math:`A` by *columns*,
:math:`A = [A_1, A_2]`: each device computes :math:`Y_i = \mathrm{GeLU}(X A_i)` with no
communication, because GeLU acts element by element (splitting :math:`A` by rows instead
would need a sum before the GeLU). Split :math:`B` by *rows* to match: device :math:`i`
computes :math:`Y_i B_i`, and :math:`Z = \sum_i Y_i B_i` needs one all-reduce. Each
device stores :math:`1/N` of both weight matrices.

Megatron writes the communication as two conjugate operators (its Figure 3a):

* :math:`f`, before the column-parallel layer: identity in forward (every device already
  has the whole :math:`X`), all-reduce in backward (each device's
  :math:`\partial L / \partial X = \sum_j (\partial L/\partial Y_j) A_j^\top` is only its
  part of the sum);
* :math:`g`, after the row-parallel layer: all-reduce in forward (sum the partial
  products), identity in backward (the gradient of a sum reaches each term unchanged).

In ``torch.nn.Linear`` terms (``weight`` is ``[out, in]``): :class:`ColumnParallelLinear`
holds rows ``rank*out/N ... (rank+1)*out/N`` of the first layer's weight and the same
slice of its bias; :class:`RowParallelLinear` holds the matching *columns* of the second
layer's weight and the whole bias, added once after the all-reduce (adding it on every
device before the sum would count it :math:`N` times). :func:`megatron_mlp_from` cuts a
full Linear-activation-Linear into these pieces.

**Traffic.** One MLP moves one ``[tokens, h]`` activation through an all-reduce in the
forward pass (:math:`g`) and one in the backward pass (:math:`f`); with attention, which
is split the same way (by heads), a transformer layer needs "only two all-reduces in the
forward path and two in the backward path" (Megatron, section 3).
:func:`tensor_parallel_comm_bytes` counts them; a ring all-reduce sends
:math:`2(N-1)/N` times the message from each device. Unlike data parallelism, this
traffic grows with the batch, and it sits on the critical path between layers, which
is why Megatron keeps tensor parallelism inside one server.

**In PyTorch.** ``torch.distributed.tensor.parallel.parallelize_module`` with
``ColwiseParallel`` on the first Linear and ``RowwiseParallel`` on the second does the
same with DTensors on ``init_device_mesh("cpu", (N,))`` (:func:`dtensor_mlp_step`).
:func:`tensor_parallel_check` runs the reference, the scratch version and the DTensor one
on the same input; :func:`run_tensor_parallel_check` launches it.

=================================== ==========================================================
name                                what it does
=================================== ==========================================================
:class:`CopyToTensorParallel`       Megatron's :math:`f`: identity forward, all-reduce backward
:class:`ReduceFromTensorParallel`   Megatron's :math:`g`: all-reduce forward, identity backward
:class:`ColumnParallelLinear`       a slice of the output features of a Linear
:class:`RowParallelLinear`          a slice of the input features, summed across ranks
:class:`MegatronMLP`                column-parallel, activation, row-parallel
:func:`megatron_mlp_from`           this rank's :class:`MegatronMLP` cut from a full MLP
:func:`transformer_mlp`             a full Linear-GELU-Linear block to cut
:func:`reference_mlp_step`          single-process output and gradients
:func:`megatron_mlp_step`           in-group: the scratch version's output and gradients
:func:`dtensor_mlp_step`            in-group: the same with ``parallelize_module``
:func:`tensor_parallel_comm_bytes`  all-reduce count and bytes of one tensor-parallel MLP
:func:`tensor_parallel_check`       in-group: all three on one input
:func:`run_tensor_parallel_check`   launch :func:`tensor_parallel_check`, return plain tensors
=================================== ==========================================================
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from aimodels.distributed.launch import launch, rank_and_world

__all__ = ["CopyToTensorParallel", "ReduceFromTensorParallel", "ColumnParallelLinear",
           "RowParallelLinear", "MegatronMLP", "megatron_mlp_from", "transformer_mlp",
           "reference_mlp_step", "megatron_mlp_step", "dtensor_mlp_step",
           "tensor_parallel_comm_bytes", "tensor_parallel_check", "run_tensor_parallel_check"]


def _log(log: list | None, phase: str, t: Tensor) -> None:
    if log is not None:
        log.append((phase, "all-reduce", t.numel() * t.element_size()))


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's ``f``: identity in forward, all-reduce (sum) of the gradient in backward.

    ``log``, if a list, gets ``("backward", "all-reduce", bytes)`` for each all-reduce.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None = None,
                log: list | None = None) -> Tensor:
        ctx.group, ctx.log = group, log
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        grad = grad.contiguous().clone()
        if rank_and_world(ctx.group)[1] > 1:
            _log(ctx.log, "backward", grad)
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's ``g``: all-reduce (sum) in forward, identity for the gradient in backward.

    ``log``, if a list, gets ``("forward", "all-reduce", bytes)`` for each all-reduce.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None = None,
                log: list | None = None) -> Tensor:
        x = x.contiguous().clone()
        if rank_and_world(group)[1] > 1:
            _log(log, "forward", x)
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def _split(features: int, world: int, what: str) -> int:
    if features % world:
        raise ValueError(f"{what} ({features}) must be divisible by the tensor-parallel world "
                         f"size {world}")
    return features // world


def _check_rank(rank: int, world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")


def _setup(layer: nn.Module, in_features: int, out_features: int, rank: int, world: int,
           group: dist.ProcessGroup | None, split: str) -> int:
    """Check and store what both parallel layers keep; return the local size of `split`."""
    _check_rank(rank, world)
    layer.in_features, layer.out_features = in_features, out_features
    layer.rank, layer.world, layer.group = rank, world, group
    layer.comm_log = None  # a list to record the all-reduces in, or None
    return _split(in_features if split == "in_features" else out_features, world, split)


class ColumnParallelLinear(nn.Module):
    """This rank's slice of the output features of ``Linear(in_features, out_features)``.

    ``weight`` is ``[out_features/world, in_features]``, ``bias`` ``[out_features/world]``.
    The input must be the same on every rank; the output is this rank's slice of the
    features. The input passes through :class:`CopyToTensorParallel` so that its
    gradient is summed over ranks.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, world: int,
                 bias: bool = True, group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        local = _setup(self, in_features, out_features, rank, world, group, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = CopyToTensorParallel.apply(x, self.group, self.comm_log)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), rank={self.rank}, world={self.world}")


class RowParallelLinear(nn.Module):
    """This rank's slice of the input features of ``Linear(in_features, out_features)``.

    ``weight`` is ``[out_features, in_features/world]``; ``bias`` is the whole
    ``[out_features]``. The input is this rank's slice of the features (the output of a
    :class:`ColumnParallelLinear`); the partial products are summed over ranks by
    :class:`ReduceFromTensorParallel`, and then the bias is added, once.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, world: int,
                 bias: bool = True, group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        local = _setup(self, in_features, out_features, rank, world, group, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)
        out = ReduceFromTensorParallel.apply(partial, self.group, self.comm_log)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), "
                f"out_features={self.out_features}, rank={self.rank}, world={self.world}")


class MegatronMLP(nn.Module):
    """``RowParallelLinear(act(ColumnParallelLinear(x)))``: one all-reduce forward, one backward."""

    def __init__(self, fc1: ColumnParallelLinear, act: nn.Module, fc2: RowParallelLinear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def record_comm(self, log: list | None) -> None:
        """Append ``(phase, "all-reduce", bytes)`` to ``log`` for every all-reduce (None: stop)."""
        self.fc1.comm_log = self.fc2.comm_log = log


def megatron_mlp_from(full_mlp: nn.Module, rank: int, world: int,
                      group: dist.ProcessGroup | None = None) -> MegatronMLP:
    """Cut rank ``rank``'s :class:`MegatronMLP` out of a full ``Sequential(Linear, act, Linear)``.

    The first Linear's weight rows (output features) and bias entries
    ``rank*H/world ... (rank+1)*H/world`` go to the column-parallel layer, the same
    columns (input features) of the second Linear's weight to the row-parallel one,
    whose bias is copied whole. The activation must act element by element (GELU, ReLU).
    Needs no process group: the pieces only communicate when run.
    """
    _check_rank(rank, world)
    children = list(full_mlp.children())
    if (len(children) != 3 or not isinstance(children[0], nn.Linear)
            or isinstance(children[1], nn.Linear) or not isinstance(children[2], nn.Linear)):
        kinds = [type(c).__name__ for c in children]
        raise ValueError(f"full_mlp must be Sequential(Linear, activation, Linear), got {kinds}")
    lin1, act, lin2 = children
    if lin2.in_features != lin1.out_features:
        raise ValueError(f"the second Linear takes {lin2.in_features} features but the first "
                         f"gives {lin1.out_features}")
    hidden = lin1.out_features
    local = _split(hidden, world, "the hidden width (first Linear's out_features)")
    cols = slice(rank * local, (rank + 1) * local)
    dtype = lin1.weight.dtype
    fc1 = ColumnParallelLinear(lin1.in_features, hidden, rank, world,
                               bias=lin1.bias is not None, group=group, dtype=dtype)
    fc2 = RowParallelLinear(hidden, lin2.out_features, rank, world,
                            bias=lin2.bias is not None, group=group, dtype=dtype)
    with torch.no_grad():
        fc1.weight.copy_(lin1.weight[cols])
        if lin1.bias is not None:
            fc1.bias.copy_(lin1.bias[cols])
        fc2.weight.copy_(lin2.weight[:, cols])
        if lin2.bias is not None:
            fc2.bias.copy_(lin2.bias)
    return MegatronMLP(fc1, copy.deepcopy(act), fc2)


def transformer_mlp(d_model: int = 16, d_ff: int = 64, activation: str = "gelu", seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """``Sequential(Linear(d_model, d_ff), GELU or ReLU, Linear(d_ff, d_model))`` from ``seed``."""
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if activation not in acts:
        raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(d_model, d_ff, dtype=dtype), acts[activation](),
                             nn.Linear(d_ff, d_model, dtype=dtype))
    finally:
        torch.random.set_rng_state(state)


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


def reference_mlp_step(full_mlp: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Single process: output, input gradient and full weight gradients for the MSE loss.

    Keys: ``out``, ``x_grad``, ``w1_grad``, ``b1_grad``, ``w2_grad``, ``b2_grad``.
    """
    model = copy.deepcopy(full_mlp)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    _loss(out, target).backward()
    lin1, _, lin2 = model.children()
    return {"out": out.detach(), "x_grad": x.grad, "w1_grad": lin1.weight.grad,
            "b1_grad": lin1.bias.grad, "w2_grad": lin2.weight.grad, "b2_grad": lin2.bias.grad}


def megatron_mlp_step(full_mlp: nn.Module, x: Tensor, target: Tensor,
                      group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """In-group: the scratch :class:`MegatronMLP` on this rank; every rank passes the same x.

    Returns the same keys as :func:`reference_mlp_step`, with this rank's *shards* of the
    weight gradients (``w1_grad`` rows, ``w2_grad`` columns, ``b1_grad`` slice; ``b2_grad``
    whole), and ``comm``: the list of ``(phase, "all-reduce", bytes)`` that ran.
    """
    rank, world = rank_and_world(group)
    model = megatron_mlp_from(full_mlp, rank, world, group)
    comm: list = []
    model.record_comm(comm)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    _loss(out, target).backward()
    model.record_comm(None)
    return {"out": out.detach(), "x_grad": x.grad, "w1_grad": model.fc1.weight.grad,
            "b1_grad": model.fc1.bias.grad, "w2_grad": model.fc2.weight.grad,
            "b2_grad": model.fc2.bias.grad, "comm": comm}


def dtensor_mlp_step(full_mlp: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    """In-group: ``parallelize_module`` with ColwiseParallel / RowwiseParallel on a CPU mesh.

    Returns the keys of :func:`reference_mlp_step`; the weight gradients are DTensors
    sharded like their weights and are gathered with ``full_tensor()``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _, world = rank_and_world()
    model = copy.deepcopy(full_mlp)
    names = [name for name, _ in model.named_children()]
    if len(names) != 3:
        raise ValueError(f"full_mlp must be Sequential(Linear, activation, Linear), got {names}")
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {names[0]: ColwiseParallel(), names[2]: RowwiseParallel()})
    x = x.detach().clone().requires_grad_(True)
    out = model(x)  # RowwiseParallel returns a plain (replicated) tensor by default
    _loss(out, target).backward()
    lin1, lin2 = getattr(model, names[0]), getattr(model, names[2])

    def full(t: Tensor) -> Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return {"out": full(out), "x_grad": full(x.grad), "w1_grad": full(lin1.weight.grad),
            "b1_grad": full(lin1.bias.grad), "w2_grad": full(lin2.weight.grad),
            "b2_grad": full(lin2.bias.grad)}


def tensor_parallel_comm_bytes(batch_tokens: int, hidden: int, bytes_per_element: int,
                               world: int) -> dict[str, float]:
    r"""Communication of one tensor-parallel MLP (Megatron, section 3) for one training step.

    The row-parallel output (:math:`g`) is all-reduced in the forward pass and the
    column-parallel input gradient (:math:`f`) in the backward pass, each a
    ``[batch_tokens, hidden]`` message. A ring all-reduce sends (and receives)
    :math:`2(N-1)/N` times the message per rank. A whole transformer layer doubles
    these: attention is split the same way, hence Megatron's "two all-reduces in the
    forward path and two in the backward path". With ``world == 1`` nothing is sent.
    """
    for name, value in (("batch_tokens", batch_tokens), ("hidden", hidden),
                        ("bytes_per_element", bytes_per_element), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    message = batch_tokens * hidden * bytes_per_element
    per_allreduce = 2 * (world - 1) / world * message
    n = 1 if world > 1 else 0
    return {"allreduces_forward": n, "allreduces_backward": n, "message_bytes": message,
            "ring_bytes_per_rank_per_allreduce": per_allreduce,
            "ring_bytes_per_rank_per_step": 2 * n * per_allreduce}


def tensor_parallel_check(d_model: int = 16, d_ff: int = 64, tokens: int = 6,
                          activation: str = "gelu", seed: int = 0, dtensor: bool = True
                          ) -> dict[str, Any]:
    """In-group (also the worker of :func:`run_tensor_parallel_check`): three runs, one input.

    Builds :func:`transformer_mlp` in float64 and a fixed input and target (the same on
    every rank), and returns this rank's ``{"reference", "megatron", "dtensor", "rank",
    "world"}`` result dicts (see :func:`reference_mlp_step`, :func:`megatron_mlp_step`,
    :func:`dtensor_mlp_step`), all plain tensors. ``dtensor=False`` skips the DTensor run
    (``None``), whose first call costs a few seconds of imports.
    """
    rank, world = rank_and_world()
    full = transformer_mlp(d_model, d_ff, activation, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_model, generator=generator, dtype=torch.float64)
    target = torch.randn(tokens, d_model, generator=generator, dtype=torch.float64)
    return {"reference": reference_mlp_step(full, x, target),
            "megatron": megatron_mlp_step(full, x, target),
            "dtensor": dtensor_mlp_step(full, x, target) if dtensor else None,
            "rank": rank, "world": world}


def run_tensor_parallel_check(world_size: int = 2, d_model: int = 16, d_ff: int = 64,
                              tokens: int = 6, activation: str = "gelu", seed: int = 0,
                              dtensor: bool = True, timeout: float = 60.0
                              ) -> list[dict[str, Any]]:
    """Launch :func:`tensor_parallel_check` on ``world_size`` gloo ranks; results by rank."""
    return launch(tensor_parallel_check, world_size, d_model, d_ff, tokens, activation, seed,
                  dtensor, timeout=timeout)
