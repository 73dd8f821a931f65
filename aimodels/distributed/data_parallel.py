r"""Data parallelism from scratch, the same with ``DistributedDataParallel``, and what a step costs.

**The idea.** Every rank keeps a full copy of the model. Each step, rank :math:`r` of
:math:`N` takes its own :math:`1/N` of the batch (:func:`~aimodels.distributed.common.rank_rows`),
computes the loss and gradients on it, and then all ranks *average their gradients* with
an all-reduce. With a loss that is a mean over equal shards, the mean of the shard
gradients is exactly the gradient of the whole batch, so every rank applies the same
update to the same weights and the replicas never drift apart: :math:`N` ranks train
exactly like one process on the whole batch (Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB 13(12)). Three
things make it work:

1. the replicas start equal: :func:`broadcast_parameters` copies rank 0's weights;
2. after ``backward``, :func:`average_gradients` all-reduces (sums) every gradient and
   divides it by :math:`N`;
3. every rank runs the same optimizer on the same gradients.

:func:`train_data_parallel` does this by hand; :func:`train_ddp` lets
``torch.nn.parallel.DistributedDataParallel`` do it, and
:func:`run_data_parallel_equivalence` checks both against the single-process reference
:func:`~aimodels.distributed.common.train_single` (float64, ``assert_close``).

**Buckets.** One all-reduce per parameter pays the latency :math:`\alpha` once per
parameter; one all-reduce of everything must wait until the last gradient exists. DDP
packs gradients into *buckets* of about ``bucket_cap_mb`` MiB (default 25; the first
bucket is 1 MiB when the default is used) in reverse order of the parameters, roughly
the order in which backward produces them, and launches each bucket's all-reduce as
soon as its gradients are ready, so communication overlaps the rest of the backward
pass (Li et al. 2020, on gradient bucketing and overlap). :func:`ddp_bucket_sizes` records the
buckets through a communication hook (``register_comm_hook``; "DDP Communication Hooks"
in the PyTorch docs) that counts them and then does the default averaging all-reduce.
Buckets are rebuilt after the first iteration, in the order gradients actually arrived,
so the sizes are read on a later step.

**What a step costs.** With the alpha-beta model of
:mod:`aimodels.distributed.collectives`, a step of :math:`k` buckets holding :math:`G`
gradient bytes costs, if nothing overlaps,

.. math::

    t_\text{step} \approx t_\text{compute} + t_\text{DDP} + k\,\alpha + \beta\, G
    \qquad (:func:`predict_ddp_step_time`),

where :math:`t_\text{DDP}` is DDP's own bookkeeping (autograd hooks, copying the
gradients into the flat buckets and back), measured with a comm hook that skips the
communication. :func:`measure_step_times` measures every term on one model (an MLP with
2.1M float32 parameters, 8.4 MB of gradients, by default) and the full DDP step, so
prediction and measurement can be compared. What we saw in 15 runs on a shared 2-core
machine, two ranks with one thread each: compute 8-17 ms, DDP bookkeeping 1-5 ms, the
bucketed all-reduce 6.5-10 ms, the DDP step 18-30 ms; prediction / measurement had a
median of 0.88 without the bookkeeping term and 0.98 with it, 13 of 15 runs within 20%
either way (the worst, 0.51 and 0.64, while other jobs loaded the machine). The
prediction mostly errs low: the ranks finish backward at different times, and DDP's early
all-reduces run on gloo threads that compete with the backward pass for the same two
cores, so overlapping communication with computation buys nothing here and costs a
little. With fast interconnects and spare compute, overlap hides much of the
communication instead, which is what DDP's design aims at (Li et al. 2020).

====================================== ==========================================================
name                                   what it does
====================================== ==========================================================
:func:`broadcast_parameters`           copy parameters and buffers from one rank to all
:func:`average_gradients`              all-reduce and divide every gradient (optionally bucketed)
:func:`bucket_assignment`              which gradients share a bucket, by DDP's packing rule
:func:`train_data_parallel`            the from-scratch training loop; (losses, state_dict)
:func:`train_ddp`                      the same with ``DistributedDataParallel``
:func:`equivalence_worker`             worker: single, scratch and DDP runs of the same problem
:func:`run_data_parallel_equivalence`  ``launch`` it; the three results, ready to compare
:func:`ddp_bucket_sizes`               bytes of each bucket DDP all-reduces, via a comm hook
:func:`bucket_worker`                  worker: bucket sizes for several ``bucket_cap_mb``
:func:`run_bucket_demo`                ``launch`` it
:func:`measure_step_times`             compute, all-reduce and DDP step times, alpha and beta
:func:`predict_ddp_step_time`          compute + k alpha + beta G
:func:`step_time_worker`               worker: :func:`measure_step_times`
:func:`run_step_time_model`            ``launch`` it
:func:`demo_worker`                    worker: everything above in one process group
====================================== ==========================================================
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from aimodels.distributed.collectives import (
    _global,
    _group_rank_world,
    fit_alpha_beta,
    predict_all_reduce_time,
    ring_all_reduce,
)
from aimodels.distributed.common import (
    make_optimizer,
    mlp,
    rank_rows,
    regression_batches,
    train_single,
)
from aimodels.distributed.launch import launch

__all__ = [
    "average_gradients",
    "broadcast_parameters",
    "bucket_assignment",
    "bucket_worker",
    "ddp_bucket_sizes",
    "demo_worker",
    "equivalence_worker",
    "measure_step_times",
    "predict_ddp_step_time",
    "run_bucket_demo",
    "run_data_parallel_equivalence",
    "run_step_time_model",
    "step_time_worker",
    "train_data_parallel",
    "train_ddp",
]

AllReduce = Callable[..., Any]


def _resolve_all_reduce(all_reduce: str | AllReduce) -> AllReduce:
    if callable(all_reduce):
        return all_reduce
    if all_reduce == "torch":
        return dist.all_reduce
    if all_reduce == "ring":
        return ring_all_reduce
    raise ValueError(f"all_reduce must be 'torch', 'ring' or a function f(tensor, group=...), "
                     f"got {all_reduce!r}")


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mean_over_ranks(value: Tensor, group: dist.ProcessGroup | None, world: int) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value.item() / world


# --------------------------------------------------------------------------- from scratch
@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0,
                         group: dist.ProcessGroup | None = None) -> None:
    """Overwrite every parameter and buffer with rank `src`'s (a rank of `group`), in place."""
    _, world = _group_rank_world(group)
    if not 0 <= src < world:
        raise ValueError(f"src must be a rank in [0, {world}), got {src}")
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=_global(group, src), group=group)


def bucket_assignment(sizes_bytes: Sequence[int], bucket_cap_bytes: int | Sequence[int]
                      ) -> list[list[int]]:
    """Pack tensors of these byte sizes into buckets the way DDP does; return their indices.

    Tensors are taken in reverse order (backward produces the last layer's gradients
    first; Li et al. 2020) and a bucket is closed as soon as it holds at
    least its cap, so a tensor larger than the cap gets a bucket of its own (the rule of
    ``compute_bucket_assignment_by_size`` in torch/csrc/distributed/c10d/reducer.cpp,
    which DDP calls; it also keeps dtypes and devices apart, ignored here). A list of caps
    gives the caps of the first buckets, its last entry those of the rest: DDP's default
    is ``[2**20, 25 * 2**20]`` (1 MiB, then 25 MiB), one given ``bucket_cap_mb`` is
    ``[int(bucket_cap_mb * 2**20)]``.
    """
    caps = [bucket_cap_bytes] if isinstance(bucket_cap_bytes, int) else list(bucket_cap_bytes)
    if not caps or any(int(c) < 1 for c in caps):
        raise ValueError(f"bucket_cap_bytes must be a positive int or a list of them, "
                         f"got {bucket_cap_bytes!r}")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in reversed(range(len(sizes_bytes))):
        current.append(index)
        filled += sizes_bytes[index]
        if filled >= caps[min(len(buckets), len(caps) - 1)]:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def average_gradients(model: nn.Module, group: dist.ProcessGroup | None = None,
                      all_reduce: str | AllReduce = "torch",
                      bucket_cap_bytes: int | Sequence[int] | None = None) -> int:
    """Replace every ``p.grad`` by its mean over the ranks of `group`; return the all-reduce count.

    `all_reduce` is ``"torch"`` (``dist.all_reduce``), ``"ring"``
    (:func:`~aimodels.distributed.collectives.ring_all_reduce`) or any
    ``f(tensor, group=group)`` that sums in place. Without `bucket_cap_bytes` there is one
    call per gradient; with it, the gradients are packed into flat buckets as DDP packs
    them (:func:`bucket_assignment`) and each bucket is one call. Parameters without a
    gradient are skipped, so every rank must have gradients for the same ones.
    """
    _, world = _group_rank_world(group)
    reduce = _resolve_all_reduce(all_reduce)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if bucket_cap_bytes is None:
        buckets = [[g] for g in grads]
    else:
        layout = bucket_assignment([g.numel() * g.element_size() for g in grads],
                                   bucket_cap_bytes)
        buckets = [[grads[i] for i in indices] for indices in layout]
    for bucket in buckets:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            reduce(bucket[0], group=group)
            bucket[0].div_(world)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])
        reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(buckets)


def train_data_parallel(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "sgd",
                        lr: float = 0.05, all_reduce: str | AllReduce = "torch",
                        group: dist.ProcessGroup | None = None,
                        bucket_cap_bytes: int | Sequence[int] | None = None
                        ) -> tuple[list[float], dict[str, Tensor]]:
    """Train `model` in place on this rank's rows of every batch, averaging gradients by hand.

    `x` [steps, batch, in] and `y` [steps, batch, out] are the *whole* batches, the same on
    every rank. The model is first overwritten with rank 0's weights. Returns (the loss of
    each step averaged over ranks = the whole-batch loss, the final state_dict).
    """
    rank, world = _group_rank_world(group)
    broadcast_parameters(model, 0, group)
    opt = make_optimizer(model.parameters(), optimizer, lr)
    losses = []
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(rank_rows(xb, rank, world)),
                                      rank_rows(yb, rank, world))
        loss.backward()
        average_gradients(model, group, all_reduce, bucket_cap_bytes)
        opt.step()
        losses.append(_mean_over_ranks(loss, group, world))
    return losses, _state(model)


def fit_ddp(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "sgd", lr: float = 0.05,
            bucket_cap_mb: float | None = None, group: dist.ProcessGroup | None = None
            ) -> tuple[DistributedDataParallel, torch.optim.Optimizer, list[float]]:
    """Train `model` (wrapped, not copied) with DDP on this rank's rows of each batch.

    Returns the DDP wrapper, the optimizer (so a caller can measure its state) and the
    whole-batch loss per step (the mean of the ranks' losses).
    """
    rank, world = _group_rank_world(group)
    ddp = DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_cap_mb)
    opt = make_optimizer(ddp.parameters(), optimizer, lr)
    losses = []
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(rank_rows(xb, rank, world)), rank_rows(yb, rank, world))
        loss.backward()  # DDP all-reduces (averages) the gradients in buckets during backward
        opt.step()
        losses.append(_mean_over_ranks(loss, group, world))
    return ddp, opt, losses


def train_ddp(model: nn.Module, x: Tensor, y: Tensor, optimizer: str = "sgd", lr: float = 0.05,
              bucket_cap_mb: float | None = None, group: dist.ProcessGroup | None = None
              ) -> tuple[list[float], dict[str, Tensor]]:
    """:func:`train_data_parallel` with ``DistributedDataParallel`` doing the synchronisation.

    DDP broadcasts rank 0's weights when it wraps the model and averages gradients during
    backward. Returns (whole-batch loss per step, final state_dict of the wrapped module).
    """
    ddp, _, losses = fit_ddp(model, x, y, optimizer, lr, bucket_cap_mb, group)
    return losses, _state(ddp.module)


def equivalence_worker(steps: int = 20, batch_size: int = 16, optimizers: Sequence[str] = ("sgd",),
                       lr: float = 0.05, sizes: Sequence[int] = (32, 64, 64, 8),
                       all_reduce: str = "torch",
                       bucket_cap_bytes: int | Sequence[int] | None = None,
                       bucket_cap_mb: float | None = None) -> dict[str, dict[str, Any]]:
    """Worker: for each optimizer, the single-process reference (on rank 0 only), the scratch
    data-parallel run and the DDP run of the same float64 problem.

    Each rank builds its replica from a different seed (`seed=rank`), so the runs only
    match the reference (built from seed 0) if the broadcast from rank 0 works.
    Returns ``{optimizer: {"single": (losses, state) or None, "scratch": ..., "ddp": ...}}``.
    """
    rank, world = _group_rank_world(None)
    x, y = regression_batches(steps, batch_size, in_features=sizes[0], out_features=sizes[-1])
    out: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        out[name] = {
            "single": train_single(mlp(sizes, seed=0), x, y, name, lr) if rank == 0 else None,
            "scratch": train_data_parallel(mlp(sizes, seed=rank), x, y, name, lr, all_reduce,
                                           bucket_cap_bytes=bucket_cap_bytes),
            "ddp": train_ddp(mlp(sizes, seed=rank), x, y, name, lr, bucket_cap_mb=bucket_cap_mb),
        }
    return out


def run_data_parallel_equivalence(world_size: int = 2, steps: int = 20, batch_size: int = 16,
                                  optimizer: str = "sgd", lr: float = 0.05,
                                  all_reduce: str = "torch", timeout: float = 60.0
                                  ) -> dict[str, Any]:
    """Single process, scratch data parallelism and DDP on the same problem, to compare.

    Returns ``{"single": (losses, state), "scratch": ..., "ddp": ..., "scratch_by_rank":
    [state, ...], "ddp_by_rank": [state, ...]}`` (the last two show every replica agrees).
    """
    results = launch(equivalence_worker, world_size, steps, batch_size, (optimizer,), lr,
                     timeout=timeout, all_reduce=all_reduce)
    first = results[0][optimizer]
    return {"single": first["single"], "scratch": first["scratch"], "ddp": first["ddp"],
            "scratch_by_rank": [r[optimizer]["scratch"][1] for r in results],
            "ddp_by_rank": [r[optimizer]["ddp"][1] for r in results]}


# --------------------------------------------------------------------------- buckets
class _BucketRecorder:
    """Comm-hook state: remembers (bucket index, bytes) and then averages like DDP's default."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.buckets: list[tuple[int, int]] = []


def _recording_hook(state, bucket):  # no annotations: DDP rejects the string ones of
    # `from __future__ import annotations`. Gets (_BucketRecorder, dist.GradBucket) and
    # returns the Future[Tensor] of the averaged bucket.
    buffer = bucket.buffer()
    state.buckets.append((bucket.index(), buffer.numel() * buffer.element_size()))
    return default_hooks.allreduce_hook(state.group, bucket)


def _no_communication_hook(state, bucket):  # (None, dist.GradBucket) -> Future[Tensor]
    """Hand DDP its bucket back unchanged, at once: DDP's bookkeeping without communication."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def ddp_bucket_sizes(model: nn.Module, bucket_cap_mb: float | None, steps: int = 2,
                     batch_size: int = 8, group: dist.ProcessGroup | None = None) -> list[int]:
    """Bytes of each gradient bucket DDP all-reduces in one step, in bucket-index order.

    Wraps `model` in DDP with `bucket_cap_mb`, registers a hook that records each bucket and
    does the default averaging all-reduce, runs `steps` steps on random data (the buckets
    are rebuilt after the first) and returns the sizes seen on the last one. Its length is
    the number of all-reduce calls per step; the sizes add up to the gradient bytes.
    `model` must take inputs [batch, in_features] of its first ``nn.Linear`` (an MLP).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (DDP rebuilds its buckets after step 1), got {steps}")
    ddp = DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_cap_mb)
    recorder = _BucketRecorder(group)
    ddp.register_comm_hook(recorder, _recording_hook)
    first = next(model.parameters())
    in_features = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        recorder.buckets.clear()
        xb = torch.randn(batch_size, in_features, generator=generator, dtype=first.dtype)
        ddp.zero_grad()
        ddp(xb).square().mean().backward()
    return [size for _, size in sorted(recorder.buckets)]


def bucket_worker(caps_mb: Sequence[float | None] = (25.0, 1.0),
                  sizes: Sequence[int] = (512, 1024, 1024, 512)) -> dict[str, Any]:
    """Worker: DDP's bucket sizes for each cap on a float32 MLP, and its parameter sizes."""
    model = mlp(sizes, dtype=torch.float32)
    return {"parameter_bytes": [p.numel() * p.element_size() for p in model.parameters()],
            "buckets": {cap: ddp_bucket_sizes(mlp(sizes, dtype=torch.float32), cap)
                        for cap in caps_mb}}


def run_bucket_demo(caps_mb: Sequence[float | None] = (25.0, 1.0),
                    sizes: Sequence[int] = (512, 1024, 1024, 512), world_size: int = 2,
                    timeout: float = 60.0) -> dict[str, Any]:
    """``launch`` :func:`bucket_worker`: ``{"parameter_bytes": [...], "buckets": {cap: [...]}}``."""
    return launch(bucket_worker, world_size, tuple(caps_mb), tuple(sizes), timeout=timeout)[0]


# --------------------------------------------------------------------------- step time
def predict_ddp_step_time(compute_s: float, gradient_bytes: float, alpha: float, beta: float,
                          buckets: int = 1, overhead_s: float = 0.0) -> float:
    r"""Predicted DDP step, no overlap: :math:`t_\text{compute} + t_\text{DDP} + k\alpha + \beta G`.

    `overhead_s` is DDP's bookkeeping :math:`t_\text{DDP}` (``ddp_overhead_s`` of
    :func:`measure_step_times`), `buckets` the number :math:`k` of all-reduce calls.
    """
    if compute_s < 0 or overhead_s < 0:
        raise ValueError(f"compute_s and overhead_s must be >= 0, got {compute_s} and {overhead_s}")
    return compute_s + overhead_s + predict_all_reduce_time(gradient_bytes, alpha, beta,
                                                            calls=buckets)


def _slowest_rank(times: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """Each step's time on the slowest rank (every rank gets the same list)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def measure_step_times(sizes: Sequence[int] = (512, 1024, 1024, 512), batch_size: int = 64,
                       steps: int = 20, warmup: int = 2, bucket_cap_mb: float | None = None,
                       comm_sizes_bytes: Sequence[int] = (2**16, 2**19, 2**21, 2**23),
                       group: dist.ProcessGroup | None = None
                       ) -> dict[str, Any]:
    r"""Time one data-parallel step of a float32 MLP and its parts (in-group, same on all ranks).

    Every iteration times the following one after the other, each from a barrier, so that
    all of them see the same load on the machine:

    * ``compute_s``: forward + backward + SGD step of a plain copy of the model on this
      rank's ``batch_size / N`` rows, no communication (``forward_backward_s`` and
      ``optimizer_s`` are its parts);
    * ``ddp_step_s``: the same step through ``DistributedDataParallel(bucket_cap_mb=...)``;
    * ``ddp_no_comm_step_s``: the same through a DDP whose comm hook hands every bucket
      back untouched: DDP's own bookkeeping (hooks, copying gradients into the flat
      buckets and back) without communication. ``ddp_overhead_s`` = it - ``compute_s``;
    * ``scratch_step_s``: the step with :func:`average_gradients` after backward, in the
      same buckets (communication strictly after compute, no overlap);
    * ``allreduce_flat_s``: one ``dist.all_reduce`` of all gradient bytes in one tensor;
      ``allreduce_buckets_s``: one call per bucket, with the bucket sizes DDP uses;
    * ``comm_timings``: ``[(bytes, seconds)]``, one all-reduce of each of
      `comm_sizes_bytes`, to which :func:`~aimodels.distributed.collectives.fit_alpha_beta`
      fits ``alpha`` and ``beta``. They are timed in this loop rather than by
      :func:`~aimodels.distributed.collectives.time_all_reduce` on its own because the
      gradient all-reduce timed between training steps took 1.2-1.8 times what a line
      fitted to back-to-back timings predicted, and the prediction is for the former.

    Each number is the median over `steps` (after `warmup`) of the slowest rank's time;
    ``per_step_s`` holds the per-step times.

    Predictions of ``ddp_step_s``, all without overlap (:func:`predict_ddp_step_time`),
    with ``ratio_*`` = prediction / ``ddp_step_s``:

    * ``predicted_flat_s`` = compute + alpha + beta G (one all-reduce of G bytes);
    * ``predicted_buckets_s`` = compute + k alpha + beta G (one alpha per bucket);
    * ``predicted_overhead_s`` = that + ``ddp_overhead_s``;
    * ``predicted_measured_s`` = compute + the measured bucketed all-reduce;
    * ``ratio_scratch`` = ``predicted_buckets_s`` / ``scratch_step_s``.
    """
    rank, world = _group_rank_world(group)
    if batch_size % world:
        raise ValueError(f"batch_size must be divisible by the world size {world}, "
                         f"got {batch_size}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    x, y = regression_batches(steps + warmup, batch_size, in_features=sizes[0],
                              out_features=sizes[-1], dtype=torch.float32)
    x = torch.stack([rank_rows(b, rank, world) for b in x])
    y = torch.stack([rank_rows(b, rank, world) for b in y])

    def model() -> nn.Module:
        return mlp(sizes, dtype=torch.float32)

    bucket_bytes = ddp_bucket_sizes(model(), bucket_cap_mb, group=group)
    # DDP's caps: 1 MiB for the first bucket and 25 MiB after it, unless a cap is given.
    caps = [2**20, 25 * 2**20] if bucket_cap_mb is None else [int(bucket_cap_mb * 2**20)]
    plain, scratch = model(), model()
    ddp = DistributedDataParallel(model(), process_group=group, bucket_cap_mb=bucket_cap_mb)
    ddp_silent = DistributedDataParallel(model(), process_group=group,
                                         bucket_cap_mb=bucket_cap_mb)
    ddp_silent.register_comm_hook(None, _no_communication_hook)
    gradient_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    flat = torch.zeros(gradient_bytes // 4)
    buckets = [torch.zeros(b // 4) for b in bucket_bytes]
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
                  for name, m in (("plain", plain), ("ddp", ddp), ("ddp_silent", ddp_silent),
                                  ("scratch", scratch))}
    names = ("forward_backward", "compute", "ddp_step", "ddp_no_comm_step", "scratch_step",
             "allreduce_flat", "allreduce_buckets")
    times: dict[str, list[float]] = {name: [] for name in names}

    def step(name: str, m: nn.Module, xb: Tensor, yb: Tensor) -> tuple[float, float]:
        dist.barrier(group=group)
        start = time.perf_counter()
        optimizers[name].zero_grad()
        nn.functional.mse_loss(m(xb), yb).backward()
        if name == "scratch":
            average_gradients(m, group, bucket_cap_bytes=caps)
        middle = time.perf_counter()
        optimizers[name].step()
        return middle - start, time.perf_counter() - start

    def collective(tensors: list[Tensor]) -> float:
        dist.barrier(group=group)
        start = time.perf_counter()
        for t in tensors:
            dist.all_reduce(t, group=group)
        return time.perf_counter() - start

    probes = [torch.zeros(max(1, int(n) // 4)) for n in comm_sizes_bytes]
    probe_times: list[list[float]] = [[] for _ in probes]
    for i, (xb, yb) in enumerate(zip(x, y, strict=True)):
        measured = dict(zip(("forward_backward", "compute"), step("plain", plain, xb, yb),
                            strict=True))
        measured["ddp_step"] = step("ddp", ddp, xb, yb)[1]
        measured["ddp_no_comm_step"] = step("ddp_silent", ddp_silent, xb, yb)[1]
        measured["scratch_step"] = step("scratch", scratch, xb, yb)[1]
        measured["allreduce_flat"] = collective([flat])
        measured["allreduce_buckets"] = collective(buckets)
        probe = [collective([t]) for t in probes]
        if i >= warmup:
            for name in names:
                times[name].append(measured[name])
            for j, t in enumerate(probe):
                probe_times[j].append(t)
    per_step = {name: _slowest_rank(times[name], group) for name in names}
    medians = {f"{name}_s": statistics.median(per_step[name]) for name in names}

    pairs = [(t.numel() * 4, statistics.median(_slowest_rank(ts, group)))
             for t, ts in zip(probes, probe_times, strict=True)]
    alpha, beta = fit_alpha_beta([p[0] for p in pairs], [p[1] for p in pairs])
    k = len(bucket_bytes)
    compute = medians["compute_s"]
    predicted_flat = predict_ddp_step_time(compute, gradient_bytes, alpha, beta, buckets=1)
    predicted_buckets = predict_ddp_step_time(compute, gradient_bytes, alpha, beta, buckets=k)
    overhead = medians["ddp_no_comm_step_s"] - compute
    predicted_overhead = predict_ddp_step_time(compute, gradient_bytes, alpha, beta, buckets=k,
                                               overhead_s=max(overhead, 0.0))
    predicted_measured = compute + medians["allreduce_buckets_s"]
    ddp_step = medians["ddp_step_s"]
    return {
        "world_size": world, "parameters": gradient_bytes // 4, "gradient_bytes": gradient_bytes,
        "bucket_bytes": bucket_bytes, "buckets": k, **medians,
        "optimizer_s": compute - medians["forward_backward_s"], "ddp_overhead_s": overhead,
        "alpha": alpha, "beta": beta, "comm_timings": pairs, "per_step_s": per_step,
        "predicted_allreduce_s": predict_all_reduce_time(gradient_bytes, alpha, beta, calls=k),
        "predicted_flat_s": predicted_flat, "predicted_buckets_s": predicted_buckets,
        "predicted_overhead_s": predicted_overhead, "predicted_measured_s": predicted_measured,
        "ratio_flat": predicted_flat / ddp_step, "ratio_buckets": predicted_buckets / ddp_step,
        "ratio_overhead": predicted_overhead / ddp_step,
        "ratio_measured": predicted_measured / ddp_step,
        "ratio_scratch": predicted_buckets / medians["scratch_step_s"],
    }


def step_time_worker(**kwargs: Any) -> dict[str, Any]:
    """Worker: :func:`measure_step_times` with these keyword arguments."""
    return measure_step_times(**kwargs)


def run_step_time_model(world_size: int = 2, timeout: float = 60.0, **kwargs: Any
                        ) -> dict[str, Any]:
    """``launch`` :func:`step_time_worker`; returns rank 0's numbers (all ranks agree)."""
    return launch(step_time_worker, world_size, timeout=timeout, **kwargs)[0]


def demo_worker(equivalence: dict[str, Any] | None = None, buckets: dict[str, Any] | None = None,
                step_time: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker running several parts in one process group (one ``launch``, one start-up).

    Each process's first ``DistributedDataParallel`` costs 2-3.5 s here (it imports
    ``torch._dynamo``), one more reason to run the parts in one launch.

    Each argument is the keyword arguments of :func:`equivalence_worker`,
    :func:`bucket_worker` or :func:`measure_step_times`, or None to skip that part.
    """
    out: dict[str, Any] = {}
    if equivalence is not None:
        out["equivalence"] = equivalence_worker(**equivalence)
    if buckets is not None:
        out["buckets"] = bucket_worker(**buckets)
    if step_time is not None:
        out["step_time"] = measure_step_times(**step_time)
    return out
