r"""Sharded data parallelism (Chapter 10): ZeRO's memory and traffic arithmetic, and FSDP2 on CPU.

**What is redundant in data parallelism.** Plain data parallelism (DP, PyTorch's DDP)
keeps a full copy of the *model states* on every device: the parameters, their
gradients and the optimizer state. Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models" (arXiv 1910.02054), count them for
mixed-precision Adam with :math:`\Psi` parameters: 2 bytes per fp16 parameter, 2 per fp16
gradient and :math:`K = 12` bytes of optimizer state (an fp32 master copy, momentum and
variance), :math:`(2 + 2 + K)\Psi = 16\Psi` bytes per device whatever the number of
devices :math:`N_d`. ZeRO-DP *partitions* these states instead, in three cumulative
stages (section 5, Figure 1):

======= ================== ======================================= =====================
stage   paper's name       bytes per device                        traffic per step
======= ================== ======================================= =====================
0       baseline DP        :math:`(2 + 2 + K)\Psi`                 :math:`2\Psi`
1       :math:`P_{os}`     :math:`2\Psi + 2\Psi + K\Psi/N_d`       :math:`2\Psi`
2       :math:`P_{os+g}`   :math:`2\Psi + (2 + K)\Psi/N_d`         :math:`2\Psi`
3       :math:`P_{os+g+p}` :math:`(2 + 2 + K)\Psi/N_d`             :math:`3\Psi`
======= ================== ======================================= =====================

The paper's worked example (Figure 1; sections 5.1-5.3 quote the same numbers) is
:math:`\Psi = 7.5` B, :math:`N_d = 64`, :math:`K = 12`: 120 GB, 31.4 GB, 16.6 GB and
1.9 GB per device (:func:`zero_memory_bytes`; GB = :math:`10^9` bytes).

**Traffic** (section 7). An all-reduce of :math:`\Psi` elements is a reduce-scatter
followed by an all-gather, and each moves :math:`\Psi` elements per device, so DP moves
:math:`2\Psi` per step (7.1). With :math:`P_{os+g}` the gradients are reduce-scattered
(:math:`\Psi`) and the updated parameter shards all-gathered (:math:`\Psi`): the same
:math:`2\Psi` as DP (7.2.1). With :math:`P_{os+g+p}` the parameters are all-gathered
layer by layer in the forward pass and again, in reverse order, in the backward pass, plus
the gradient reduce-scatter: :math:`3\Psi`, "1.5x compared to the baseline" (7.2.2).
:func:`zero_communication_bytes`  returns these; with ``n_devices`` it returns the exact
ring figure, :math:`(N_d - 1)/N_d` of each :math:`\Psi`, that the paper rounds to 1.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) is ZeRO stage 3 in PyTorch: each
parameter becomes a DTensor sharded along dimension 0 over a 1-D device mesh, so a rank
holds :math:`1/N` of every parameter, gradient and (since the optimizer sees the
shards) optimizer state. :func:`train_fsdp` shards each ``nn.Linear`` and then the root,
so that each Linear is one communication group: before a Linear runs forward its
parameters are all-gathered, after it they are freed ("resharded"); in backward they
are all-gathered again and the full gradient is reduce-scattered so that each rank keeps
the sum for its shard. The optimizer step is local. :func:`train_fsdp` records this
schedule by installing counting wrappers through FSDP2's public
``set_custom_all_gather`` / ``set_custom_reduce_scatter`` hooks (:class:`CommEvent`).
:func:`train_ddp` is the baseline (``DistributedDataParallel``), and :func:`fsdp_vs_ddp`
runs both next to the single-process reference; with even shards, each FSDP rank holds
exactly :math:`1/N` of DDP's bytes.

================================= ==============================================================
name                              what it does
================================= ==============================================================
:func:`zero_memory_bytes`         per-device bytes of model states for ZeRO stage 0-3
:func:`zero_communication_bytes`  per-device traffic of one step for ZeRO stage 0-3
:func:`model_state_bytes`         measured bytes of parameters, gradients and optimizer state
:func:`train_ddp`                 in-group DDP training on this rank's rows of each batch
:func:`train_fsdp`                in-group FSDP2 training, plus the recorded comm schedule
:func:`fsdp_vs_ddp`               in-group: single reference, DDP and FSDP2 on one problem
:func:`run_fsdp_vs_ddp`           launch :func:`fsdp_vs_ddp` on N ranks, return plain results
================================= ==============================================================
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aimodels.distributed.common import (
    flat_state,
    make_optimizer,
    mlp,
    rank_rows,
    regression_batches,
    tensor_bytes,
    train_single,
)
from aimodels.distributed.data_parallel import fit_ddp
from aimodels.distributed.launch import launch, rank_and_world

__all__ = ["ZERO_STAGES", "zero_memory_bytes", "zero_communication_bytes", "CommEvent",
           "model_state_bytes", "train_ddp", "train_fsdp", "fsdp_vs_ddp", "run_fsdp_vs_ddp"]

ZERO_STAGES = {0: "DP (nothing partitioned)", 1: "P_os (optimizer states)",
               2: "P_os+g (+ gradients)", 3: "P_os+g+p (+ parameters)"}


def _check_stage(stage: int) -> None:
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of 0, 1, 2, 3 (0 = plain data parallelism), "
                         f"got {stage!r}")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def _check_devices(n_devices: int) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be an int >= 1, got {n_devices!r}")


def zero_memory_bytes(n_params: float, n_devices: int, stage: int,
                      optimizer_bytes_per_param: float = 12, param_bytes: float = 2,
                      grad_bytes: float = 2) -> float:
    r"""Bytes of model states per device under ZeRO-DP ``stage`` (Rajbhandari et al. 2020, Fig 1).

    Stage 0 is plain DP, :math:`(2+2+K)\Psi`; stage 1 partitions the optimizer state,
    :math:`2\Psi + 2\Psi + K\Psi/N_d`; stage 2 also the gradients,
    :math:`2\Psi + (2+K)\Psi/N_d`; stage 3 also the parameters, :math:`(2+2+K)\Psi/N_d`
    (section 5.1-5.3). The defaults are the paper's mixed-precision Adam: 2-byte
    parameters and gradients, :math:`K = 12`. Activations and buffers are not counted.
    """
    _check_positive("n_params", n_params)
    _check_devices(n_devices)
    _check_stage(stage)
    _check_non_negative("optimizer_bytes_per_param", optimizer_bytes_per_param)
    _check_non_negative("param_bytes", param_bytes)
    _check_non_negative("grad_bytes", grad_bytes)
    psi, n = float(n_params), n_devices
    params = param_bytes * psi / (n if stage >= 3 else 1)
    grads = grad_bytes * psi / (n if stage >= 2 else 1)
    optimizer = optimizer_bytes_per_param * psi / (n if stage >= 1 else 1)
    return params + grads + optimizer


def zero_communication_bytes(n_params: float, stage: int, bytes_per_element: float = 2,
                             *, n_devices: int | None = None) -> float:
    r"""Bytes one device sends per step under ZeRO-DP ``stage`` (Rajbhandari et al. 2020, §7).

    Stages 0-2: :math:`2\Psi` elements, an all-reduce of the gradients or its equal, a
    reduce-scatter of the gradients (:math:`\Psi`) plus an all-gather of the updated
    parameters (:math:`\Psi`) (sections 7.1, 7.2.1). Stage 3: :math:`3\Psi`, the
    parameter all-gather is needed in the forward and again in the backward pass
    (section 7.2.2, "1.5x compared to the baseline"). The paper counts :math:`\Psi` per
    collective; a ring reduce-scatter or all-gather really sends :math:`(N-1)/N \cdot \Psi`
    per device, which is what you get by passing ``n_devices``.
    """
    _check_positive("n_params", n_params)
    _check_stage(stage)
    _check_positive("bytes_per_element", bytes_per_element)
    collectives = 3 if stage == 3 else 2  # each moves Psi elements
    volume = collectives * float(n_params) * bytes_per_element
    if n_devices is not None:
        _check_devices(n_devices)
        volume *= (n_devices - 1) / n_devices
    return volume


class CommEvent(NamedTuple):
    """One collective that FSDP2 issued: when, which, for which module, and how big.

    ``full_bytes`` is the unsharded buffer (the all-gather's output, the reduce-scatter's
    input); ``shard_bytes`` is this rank's piece of it.
    """

    phase: str  # "forward", "backward" or "optimizer"
    op: str  # "all-gather" or "reduce-scatter"
    module: str  # the module's name in the model ("0", "2", ...), "" for the root
    full_bytes: int
    shard_bytes: int


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _Schedule:
    """Shared by the recorders: the current training phase and the events seen so far."""

    def __init__(self) -> None:
        self.phase = "forward"
        self.recording = False
        self.events: list[CommEvent] = []


# FSDP2 in torch 2.15 calls dist.all_gather_single / dist.reduce_scatter_single; older
# releases have only all_gather_into_tensor / reduce_scatter_tensor, which do the same.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _Recorder:
    """What both recording collectives share: where to log, and FSDP2's buffer allocation."""

    def __init__(self, schedule: _Schedule, module: str) -> None:
        self.schedule, self.module = schedule, module

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _RecordingAllGather(_Recorder):
    """FSDP2 custom all-gather (``FSDPModule.set_custom_all_gather``) that logs, then gathers."""

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> Any:
        if self.schedule.recording:
            self.schedule.events.append(CommEvent(self.schedule.phase, "all-gather", self.module,
                                                  _nbytes(output_tensor), _nbytes(input_tensor)))
        return _all_gather(output_tensor, input_tensor, group=group, async_op=async_op)


class _RecordingReduceScatter(_Recorder):
    """FSDP2 custom reduce-scatter (``set_custom_reduce_scatter``) that logs, then reduces."""

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> Any:
        if self.schedule.recording:
            self.schedule.events.append(CommEvent(self.schedule.phase, "reduce-scatter",
                                                  self.module, _nbytes(input_tensor),
                                                  _nbytes(output_tensor)))
        return _reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards only).

    Optimizer state counts the tensors with as many elements as their parameter (AdamW's
    ``exp_avg`` and ``exp_avg_sq``, SGD's momentum), not scalar step counters.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for p in params for v in optimizer.state.get(p, {}).values()
              if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0]
    out = {"params": tensor_bytes(params), "grads": tensor_bytes(grads),
           "optimizer": tensor_bytes(states)}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _check_batches(x: Tensor, y: Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x and y must be [steps, batch, features] with the same steps and "
                         f"batch, got {tuple(x.shape)} and {tuple(y.shape)}")


def _mean_over_ranks(losses: list[float], dtype: torch.dtype) -> list[float]:
    """Each rank's loss on its rows, averaged over ranks: the whole batch's MSE (equal shares)."""
    _, world = rank_and_world()
    t = torch.tensor(losses, dtype=dtype)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def train_ddp(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "adamw",
              lr: float = 0.01) -> dict[str, Any]:
    """In-group: :func:`~aimodels.distributed.data_parallel.fit_ddp` on a copy of ``model``,
    with this rank's memory measured.

    Every rank must pass an identical ``model``. Returns ``losses`` (whole-batch MSE per
    step, the mean of the ranks' losses), ``state`` (the final state_dict as plain tensors)
    and ``memory`` (:func:`model_state_bytes` of this rank: full parameters, full
    gradients, full optimizer state).
    """
    _check_batches(x, y)
    ddp, opt, losses = fit_ddp(copy.deepcopy(model), x, y, optimizer, lr)
    return {"losses": losses, "state": flat_state(ddp.module.state_dict()),
            "memory": model_state_bytes(ddp.module, opt)}


def train_fsdp(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "adamw",
               lr: float = 0.01, record_step: int = -1) -> dict[str, Any]:
    """In-group: FSDP2 (``fully_shard``) training on this rank's rows of each batch.

    ``model`` is copied; each ``nn.Linear`` in it is sharded as its own group, then the
    root, on ``init_device_mesh("cpu", (world,))``. Returns what :func:`train_ddp`
    returns (``memory`` now counts local shards) plus ``events``: the
    :class:`CommEvent` list of step ``record_step`` (default: the last), in the order
    FSDP2 issued the collectives.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _check_batches(x, y)
    steps = x.shape[0]
    if not -steps <= record_step < steps:
        raise ValueError(f"record_step must index one of the {steps} steps, got {record_step}")
    record_step %= steps
    rank, world = rank_and_world()
    mesh = init_device_mesh("cpu", (world,))
    model = copy.deepcopy(model)
    schedule = _Schedule()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("train_fsdp shards each nn.Linear of the model; this model has none")
    for _, module in linears:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, module in [*linears, ("", model)]:
        module.set_custom_all_gather(_RecordingAllGather(schedule, name))
        module.set_custom_reduce_scatter(_RecordingReduceScatter(schedule, name))
    opt = make_optimizer(model.parameters(), optimizer, lr)
    losses = []
    for step, (xb, yb) in enumerate(zip(x, y, strict=True)):
        schedule.recording = step == record_step
        schedule.phase = "optimizer"
        opt.zero_grad()
        schedule.phase = "forward"
        loss = nn.functional.mse_loss(model(rank_rows(xb, rank, world)),
                                      rank_rows(yb, rank, world))
        schedule.phase = "backward"
        loss.backward()
        schedule.phase = "optimizer"
        opt.step()
        losses.append(loss.item())
    schedule.recording = False
    return {"losses": _mean_over_ranks(losses, x.dtype),
            "state": flat_state(model.state_dict()),  # full_tensor() all-gathers each entry
            "memory": model_state_bytes(model, opt),
            "events": list(schedule.events)}


def fsdp_vs_ddp(steps: int = 4, batch_size: int = 8, optimizer: str = "adamw", lr: float = 0.01,
                sizes: Sequence[int] = (32, 64, 64, 8)) -> dict[str, Any]:
    """In-group (also the worker of :func:`run_fsdp_vs_ddp`): one problem, three trainers.

    Builds ``mlp(sizes)`` in float64 and ``regression_batches(steps, batch_size)``, and
    returns this rank's ``{"single": ..., "ddp": ..., "fsdp": ..., "n_params": ...}``:
    the single-process reference (computed locally, no communication), :func:`train_ddp`
    and :func:`train_fsdp`.
    """
    _, world = rank_and_world()
    if batch_size % world:
        raise ValueError(f"batch_size must be divisible by the world size {world}, "
                         f"got {batch_size}")
    model = mlp(sizes)
    x, y = regression_batches(steps, batch_size, in_features=sizes[0], out_features=sizes[-1])
    single_losses, single_state = train_single(copy.deepcopy(model), x, y, optimizer, lr)
    return {"single": {"losses": single_losses, "state": single_state},
            "ddp": train_ddp(model, x, y, optimizer, lr),
            "fsdp": train_fsdp(model, x, y, optimizer, lr),
            "n_params": sum(p.numel() for p in model.parameters())}


def run_fsdp_vs_ddp(world_size: int = 2, steps: int = 4, batch_size: int = 8,
                    optimizer: str = "adamw", lr: float = 0.01,
                    sizes: Sequence[int] = (32, 64, 64, 8), timeout: float = 60.0
                    ) -> dict[str, Any]:
    """Launch :func:`fsdp_vs_ddp` on ``world_size`` gloo ranks and collect plain results.

    Returns ``single`` (losses, state), ``ddp`` and ``fsdp`` (losses and state from rank 0,
    which all ranks share, and ``memory``: one :func:`model_state_bytes` dict per rank),
    ``fsdp["events"]`` (rank 0's recorded schedule) and ``n_params``.
    """
    results = launch(fsdp_vs_ddp, world_size, steps, batch_size, optimizer, lr, tuple(sizes),
                     timeout=timeout)
    first = results[0]
    out: dict[str, Any] = {"single": first["single"], "n_params": first["n_params"]}
    for kind in ("ddp", "fsdp"):
        out[kind] = {"losses": first[kind]["losses"], "state": first[kind]["state"],
                     "memory": [r[kind]["memory"] for r in results]}
    out["fsdp"]["events"] = first["fsdp"]["events"]
    return out
