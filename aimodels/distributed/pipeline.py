r"""Pipeline parallelism (chapter 10): GPipe from scratch, its bubble, and torch's pipelining.

**The idea.** Cut a network into ``p`` consecutive *stages* and give each stage to one
rank. Rank ``r`` computes its layers and passes the activations to rank ``r+1``
(``dist.send`` / ``dist.recv``); in the backward pass the gradient of each stage's input
travels back the same way. Only the activations at the cuts cross between ranks, never
the weights, and each rank stores ``1/p`` of the parameters and optimizer state.

Run one whole batch like that and only one rank works at a time. GPipe (Huang et al.
2019, "GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism",
arXiv 1811.06965) splits the batch into ``m`` *micro-batches*: stage 0 starts micro-batch
1 while stage 1 works on micro-batch 0. The schedule here is GPipe's "fill and drain":
every stage runs all ``m`` forwards (F), then all ``m`` backwards (B) in reverse order,
accumulating the gradients, then one optimizer step. Because the mean-squared error of
the whole batch is the sum of each micro-batch's mean error times its share of the rows,
the accumulated gradient is exactly the whole batch's gradient, and training gives the
same losses and weights as one process (checked against
:func:`aimodels.distributed.common.train_single`).

**The bubble.** While the pipeline fills and drains, some ranks wait: with equal stages
that take ``t_f`` per forward and ``t_b`` per backward of one micro-batch, the step takes
``(m + p - 1)(t_f + t_b)`` and each rank is busy for ``m (t_f + t_b)`` of it, so a share
``(p - 1) / (m + p - 1)`` of the ranks' time is idle (:func:`pipeline_bubble_fraction`).
That holds whatever the ratio ``t_b / t_f``: the fill costs ``(p - 1) t_f`` and the drain
``(p - 1) t_b``. :func:`gpipe_train` records when each rank computes each F and B
(a *timeline*), :func:`measured_bubble_fraction` measures the idle share,
:func:`replayed_bubble_fraction` gives the share the same compute times would leave with
instant messages, and :func:`plot_pipeline_timeline` draws the Gantt chart.

**Timestamps across processes.** Each rank takes ``time.perf_counter()``. Python
documents only differences of two calls as meaningful, but on Linux CPython implements it
with ``clock_gettime(CLOCK_MONOTONIC)`` (``time.get_clock_info("perf_counter")`` says
so), and ``CLOCK_MONOTONIC`` is one system-wide clock (clock_gettime(2)), so readings taken
by different processes on the same machine are directly comparable (``time.monotonic()``
is the same clock; ``time.time()`` is ``CLOCK_REALTIME``, which NTP may step). Every step
starts with a barrier, after which the ranks agree on the earliest of their clock readings
(an all-reduce with ``MIN``) as time zero.

**The library version.** :func:`torch_gpipe_train` runs the same split through
``torch.distributed.pipelining``: one ``PipelineStage`` per rank, built by hand from the
stage's ``nn.Sequential``, driven by ``ScheduleGPipe`` (docs:
https://docs.pytorch.org/docs/stable/distributed.pipelining.html). Its loss function is
the per-micro-batch mean error and ``scale_grads=True`` (the default) divides the
accumulated gradients by ``m``, which again gives the whole-batch gradient.

=============================== ===============================================================
name                            what it does
=============================== ===============================================================
:func:`pipeline_bubble_fraction` idle share ``(p-1)/(m+p-1)`` of a GPipe step (and the other
                                convention, ``(p-1)/m``, in its docstring)
:func:`split_mlp`               cut an ``nn.Sequential`` MLP into contiguous stages
:func:`gpipe_train`             in-group: GPipe from scratch with send/recv, and its timeline
:func:`torch_gpipe_train`       in-group: the same with ``PipelineStage`` + ``ScheduleGPipe``
:func:`measured_bubble_fraction` ``1 - busy / (ranks x makespan)`` of one step's timeline
:func:`replayed_bubble_fraction` the same with the measured compute times but instant messages
:func:`plot_pipeline_timeline`  Gantt chart of one step: ranks down, time across
:func:`pipeline_worker`         what each launched rank runs
:func:`run_pipeline`            launch ranks, train, return plain merged results
:func:`run_pipeline_sweep`      the same for several micro-batch counts in one launch
=============================== ===============================================================
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from aimodels.distributed.common import make_optimizer, mlp, regression_batches
from aimodels.distributed.launch import launch, rank_and_world

__all__ = [
    "DEFAULT_SIZES",
    "TIMING_SIZES",
    "Event",
    "pipeline_bubble_fraction",
    "split_mlp",
    "gpipe_train",
    "torch_gpipe_train",
    "measured_bubble_fraction",
    "replayed_bubble_fraction",
    "plot_pipeline_timeline",
    "pipeline_worker",
    "run_pipeline",
    "run_pipeline_sweep",
    "merge_stages",
]

#: Four Linear layers (32 -> 64 -> 64 -> 64 -> 8): two per stage on two ranks, float64 checks.
DEFAULT_SIZES: tuple[int, ...] = (32, 64, 64, 64, 8)
#: Wide layers for timing runs: two equal stages whose matrix products dwarf the messages.
TIMING_SIZES: tuple[int, ...] = (256, 768, 768, 768, 256)

#: One timeline entry: (kind "F" or "B", micro-batch index, start, end), seconds from time zero.
Event = tuple[str, int, float, float]


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def pipeline_bubble_fraction(stages: int, microbatches: int) -> float:
    r"""Share of a GPipe step the ranks spend idle: :math:`(p - 1) / (m + p - 1)`.

    With ``p`` equal stages and ``m`` micro-batches, the step lasts ``m + p - 1`` slots of
    ``t_f + t_b`` and each rank works in ``m`` of them. GPipe (Huang et al. 2019) states
    the bubble overhead as :math:`O((K - 1)/(M + K - 1))` for ``K`` partitions and ``M``
    micro-batches and found it negligible for ``M >= 4K``.

    Two conventions are in use, and they differ only in the denominator:

    * idle / total time (this function): ``(p - 1) / (m + p - 1)``, a true fraction
      below 1; it is what :func:`measured_bubble_fraction` measures from a timeline;
    * bubble / *ideal* time: Narayanan et al. 2021 ("Efficient Large-Scale Language Model
      Training on GPU Clusters Using Megatron-LM", section 2.2.1) write the bubble as
      :math:`t_{pb} = (p - 1)(t_f + t_b)` and the ideal time as :math:`t_{id} = m (t_f + t_b)`
      and call :math:`t_{pb} / t_{id} = (p - 1)/m` the "bubble time fraction"; it can
      exceed 1 (``m < p - 1``).

    They convert as ``idle = ideal_ratio / (1 + ideal_ratio)``: for ``p = 2, m = 4`` the
    step is 20% idle, and the bubble is 25% of the ideal time. Both shrink as ``1/m`` for
    ``m >> p``.
    """
    p = _check_count("stages", stages)
    m = _check_count("microbatches", microbatches)
    return (p - 1) / (m + p - 1)


def split_mlp(model: nn.Sequential, stages: int) -> list[nn.Sequential]:
    """Cut `model` into `stages` contiguous pieces with (nearly) equal numbers of Linear layers.

    Each Linear keeps the activation that follows it; earlier stages get the extra layer
    when the count does not divide. The pieces share the model's modules and keep its
    state_dict keys (``"2.weight"``), so the stages' state_dicts merge back into the
    model's.
    """
    p = _check_count("stages", stages)
    starts_with_linear = isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(
        model[0], nn.Linear)
    if not starts_with_linear:
        raise ValueError("split_mlp needs an nn.Sequential that starts with an nn.Linear "
                         f"(as aimodels.distributed.mlp builds), got {type(model).__name__}")
    starts = [i for i, layer in enumerate(model) if isinstance(layer, nn.Linear)]
    if p > len(starts):
        raise ValueError(f"cannot cut a model with {len(starts)} Linear layers into {p} stages; "
                         f"use at most {len(starts)} stages or more layers")
    per_stage = [len(starts) // p + (1 if s < len(starts) % p else 0) for s in range(p)]
    bounds = [starts[sum(per_stage[:s])] for s in range(p)] + [len(model)]
    return [model[bounds[s]:bounds[s + 1]] for s in range(p)]


def _check_batches(x: Tensor, y: Tensor, microbatches: int) -> int:
    m = _check_count("microbatches", microbatches)
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError("x and y must be [steps, batch, features] with the same steps and batch, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    rows = x.shape[1]
    if rows % m:
        raise ValueError(f"a batch of {rows} rows does not split into {m} equal micro-batches; "
                         "use a batch size divisible by the number of micro-batches")
    return m


def _time_zero(group: dist.ProcessGroup | None, world: int) -> float:
    """Barrier, then the earliest perf_counter() reading of all ranks (one system-wide clock)."""
    if world == 1:
        return time.perf_counter()
    dist.barrier(group=group)
    now = torch.tensor([time.perf_counter()], dtype=torch.float64)
    dist.all_reduce(now, op=dist.ReduceOp.MIN, group=group)
    return now.item()


def _broadcast_losses(losses: list[float], steps: int, group: dist.ProcessGroup | None,
                      world: int) -> list[float]:
    """The last stage's `steps` losses, on every rank (the others pass an empty list)."""
    if world == 1:
        return losses
    values = torch.tensor(losses, dtype=torch.float64) if losses else torch.zeros(steps,
                                                                                 dtype=torch.float64)
    dist.broadcast(values, group=group, group_src=world - 1)
    return values.tolist()


def gpipe_train(model: nn.Sequential, x: Tensor, y: Tensor, microbatches: int,
                optimizer: str = "sgd", lr: float = 0.05,
                group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """In-group GPipe from scratch: this rank trains stage ``rank`` of `model` on every batch.

    `x` [steps, batch, in] and `y` [steps, batch, out] are the whole batches, the same on
    every rank (stage 0 reads `x`, the last stage `y`). Per step: all forwards (receive the
    input from rank - 1, send the output to rank + 1; the last stage computes the loss of
    each micro-batch times its share of the rows), then all backwards in reverse order
    (receive the output's gradient from rank + 1, ``torch.autograd.backward``, send the
    input's gradient to rank - 1), then one optimizer step on the accumulated gradients.
    Without a process group it runs both ends in one process (gradient accumulation).

    Returns ``losses`` (whole-batch loss per step, on every rank), this stage's ``state``
    and last step's ``grads`` (model's key names), and ``timelines``: per step, this
    rank's list of ``(kind, micro-batch, start, end)``. An F or B interval covers the
    computation only; waiting for and sending messages falls outside it. (With gloo a
    blocking ``dist.send`` returns only once the receiver has posted its ``recv``, so a
    rank that is ahead waits for its neighbour at each send; ``ScheduleGPipe`` posts its
    sends asynchronously instead.)
    """
    m = _check_batches(x, y, microbatches)
    rank, world = rank_and_world(group)
    stage = split_mlp(model, world)[rank]
    first, last = rank == 0, rank == world - 1
    in_features = stage[0].in_features
    dtype = stage[0].weight.dtype
    rows = x.shape[1] // m
    share = rows / x.shape[1]  # each micro-batch's weight in the whole batch's mean
    opt = make_optimizer(stage.parameters(), optimizer, lr)
    losses: list[float] = []
    timelines: list[list[Event]] = []
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        x_mbs, y_mbs = xb.split(rows), yb.split(rows)
        inputs: list[Tensor | None] = []
        outputs: list[Tensor | None] = []  # stage outputs; on the last stage, scaled losses
        events: list[Event] = []
        t0 = _time_zero(group, world)
        for i in range(m):
            if first:
                a = x_mbs[i]
            else:
                a = torch.empty(rows, in_features, dtype=dtype)
                dist.recv(a, group=group, group_src=rank - 1)
                a.requires_grad_(True)
            start = time.perf_counter()
            out = stage(a)
            if last:
                out = F.mse_loss(out, y_mbs[i]) * share
            end = time.perf_counter()
            events.append(("F", i, start - t0, end - t0))
            if not last:
                dist.send(out.detach(), group=group, group_dst=rank + 1)
            inputs.append(a)
            outputs.append(out)
        step_loss = 0.0
        for i in reversed(range(m)):
            out = outputs[i]
            grad = None
            if not last:
                grad = torch.empty_like(out)
                dist.recv(grad, group=group, group_src=rank + 1)
            else:
                step_loss += out.item()
            start = time.perf_counter()
            torch.autograd.backward(out, grad)
            end = time.perf_counter()
            events.append(("B", i, start - t0, end - t0))
            if not first:
                dist.send(inputs[i].grad, group=group, group_dst=rank - 1)
            inputs[i] = outputs[i] = None  # free the activations as soon as they are used
        opt.step()
        losses.append(step_loss)
        timelines.append(events)
    return {
        "losses": _broadcast_losses(losses, x.shape[0], group, world),
        "state": {k: v.detach().clone() for k, v in stage.state_dict().items()},
        "grads": {k: p.grad.detach().clone() for k, p in stage.named_parameters()
                  if p.grad is not None},
        "timelines": timelines,
    }


def torch_gpipe_train(model: nn.Sequential, x: Tensor, y: Tensor, microbatches: int,
                      optimizer: str = "sgd", lr: float = 0.05,
                      group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """In-group: the same training with ``torch.distributed.pipelining`` and ``ScheduleGPipe``.

    Each rank wraps its :func:`split_mlp` stage in a ``PipelineStage`` (shapes inferred
    from the first micro-batch); ``schedule.step(x)`` on the first stage and
    ``schedule.step(target=y, losses=...)`` on the last run the forwards and backwards,
    with ``F.mse_loss`` per micro-batch and the gradients divided by ``m``
    (``scale_grads=True``). Returns ``losses`` (mean of the micro-batch losses, on every
    rank), ``state`` and ``grads`` like :func:`gpipe_train`; if the library raises, returns
    ``{"error": traceback}`` instead, so the caller sees the exact message.
    """
    m = _check_batches(x, y, microbatches)
    try:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        rank, world = rank_and_world(group)
        submod = split_mlp(model, world)[rank]
        stage = PipelineStage(submod, rank, world, torch.device("cpu"), group=group)
        schedule = ScheduleGPipe(stage, n_microbatches=m, loss_fn=F.mse_loss, scale_grads=True)
        opt = make_optimizer(submod.parameters(), optimizer, lr)
        losses: list[float] = []
        for xb, yb in zip(x, y, strict=True):
            opt.zero_grad()
            args = (xb,) if stage.is_first else ()
            if stage.is_last:
                mb_losses: list[Tensor] = []
                schedule.step(*args, target=yb, losses=mb_losses)
                losses.append(torch.stack([loss.detach() for loss in mb_losses]).mean().item())
            else:
                schedule.step(*args)
            opt.step()
        return {
            "losses": _broadcast_losses(losses, x.shape[0], group, world),
            "state": {k: v.detach().clone() for k, v in submod.state_dict().items()},
            "grads": {k: p.grad.detach().clone() for k, p in submod.named_parameters()
                      if p.grad is not None},
        }
    except Exception:  # noqa: BLE001 - report the library's own message to the caller
        return {"error": traceback.format_exc()}


def _check_timelines(timelines: Sequence[Sequence[Event]]) -> None:
    if not timelines or any(len(events) == 0 for events in timelines):
        raise ValueError("timelines must hold, for each rank, a non-empty list of "
                         "(kind, microbatch, start, end) events of one step; got "
                         f"{[len(events) for events in timelines]} events per rank")
    for events in timelines:
        for event in events:
            if len(event) != 4 or event[0] not in ("F", "B") or event[3] < event[2]:
                raise ValueError(f"an event must be (\"F\" or \"B\", microbatch, start, end) with "
                                 f"end >= start, got {event!r}")


def measured_bubble_fraction(timelines: Sequence[Sequence[Event]]) -> float:
    """Idle share of one step: ``1 - busy / (ranks x makespan)``.

    `timelines` holds one list of ``(kind, microbatch, start, end)`` per rank, for one step
    (``result["timelines"][step]`` of :func:`run_pipeline`). Busy time is the sum of all F
    and B intervals; the makespan runs from the earliest start to the latest end over all
    ranks. Waiting, sending and receiving count as idle: the number is the measured
    counterpart of :func:`pipeline_bubble_fraction`.

    It differs from the formula for several reasons. A backward costs about twice a
    forward, but that alone does not move GPipe's bubble (fill ``(p-1) t_f`` plus drain
    ``(p-1) t_b`` against ``m (t_f + t_b)`` of work). What does: stages that are not
    equal (stage 0's backward skips the gradient of its input, the last stage's forward
    adds the loss); every message costs latency, and with gloo ``dist.send`` returns
    only once the receiver has posted its ``recv`` (a send to a rank that sleeps 0.5 s
    first takes 0.5 s), so a late rank holds up its neighbour; small micro-batches run
    their matrix products less efficiently; and other processes take the cores.
    :func:`replayed_bubble_fraction` keeps the measured compute times and drops the
    waiting, which separates the first reason from the others.
    """
    _check_timelines(timelines)
    starts = [e[2] for events in timelines for e in events]
    ends = [e[3] for events in timelines for e in events]
    makespan = max(ends) - min(starts)
    if makespan <= 0:
        raise ValueError(f"the timeline spans {makespan} s; need events with positive duration")
    busy = sum(e[3] - e[2] for events in timelines for e in events)
    return 1.0 - busy / (len(timelines) * makespan)


def replayed_bubble_fraction(timelines: Sequence[Sequence[Event]]) -> float:
    """Idle share of one step if messages were instant: replay the schedule with the measured
    compute times.

    Each rank runs its events in the recorded order; ``F`` of micro-batch ``i`` on rank
    ``r`` also waits for ``F`` of ``i`` on rank ``r - 1``, and ``B`` of ``i`` waits for ``B``
    of ``i`` on rank ``r + 1``. Each event starts as soon as both are done and lasts as
    long as it did. The result keeps unequal stages and F/B costs but none of the
    communication, rendezvous or scheduling delays, so it is at most
    :func:`measured_bubble_fraction` of the same timeline (the real run obeyed the same
    dependencies, and then waited some more). For equal stages it is
    :func:`pipeline_bubble_fraction`; for ``m = 1`` it is ``(p - 1) / p`` whatever the costs.
    """
    _check_timelines(timelines)
    p = len(timelines)
    ordered = [sorted(events, key=lambda e: e[2]) for events in timelines]
    keys = [(r, e[0], e[1]) for r, events in enumerate(ordered) for e in events]
    known = set(keys)
    if len(known) != len(keys):
        raise ValueError("each rank must have at most one F and one B per micro-batch")
    finish: dict[tuple[int, str, int], float] = {}
    position = [0] * p
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while position[r] < len(ordered[r]):
                kind, mb, start, end = ordered[r][position[r]]
                after = (r - 1, "F", mb) if kind == "F" else (r + 1, "B", mb)
                if 0 <= after[0] < p and after not in finish:
                    if after not in known:
                        raise ValueError(f"rank {r} has {kind} of micro-batch {mb} but rank "
                                         f"{after[0]} has no {after[1]} of it")
                    break  # wait for the neighbour
                ready = finish.get(after, 0.0)
                previous = finish[(r, *ordered[r][position[r] - 1][:2])] if position[r] else 0.0
                finish[(r, kind, mb)] = max(ready, previous) + (end - start)
                position[r] += 1
                progress = True
    if len(finish) != len(keys):
        raise ValueError("the timelines are not a pipeline schedule: some events wait for each "
                         "other in a cycle")
    makespan = max(finish.values())
    if makespan <= 0:
        raise ValueError(f"the replayed step spans {makespan} s; need events with positive "
                         "duration")
    busy = sum(e[3] - e[2] for events in timelines for e in events)
    return 1.0 - busy / (p * makespan)


def plot_pipeline_timeline(timelines: Sequence[Sequence[Event]], ax: Any = None,
                           title: str | None = None) -> Any:
    """Gantt chart of one step: one row per rank (stage), time in ms across, F and B boxes.

    Each box is labelled with its micro-batch number; time zero is the step's first event.
    Returns the matplotlib Axes (a new figure's when `ax` is None).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    _check_timelines(timelines)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.8 + 0.7 * len(timelines)))
    colours = {"F": "tab:blue", "B": "tab:orange"}
    origin = min(e[2] for events in timelines for e in events)
    end_ms = max(e[3] for events in timelines for e in events) - origin
    end_ms *= 1e3
    for rank, events in enumerate(timelines):
        for kind, mb, start, end in events:
            left, width = (start - origin) * 1e3, (end - start) * 1e3
            ax.broken_barh([(left, width)], (rank - 0.4, 0.8), facecolors=colours[kind],
                           edgecolor="black", linewidth=0.5)
            if width > 0.02 * end_ms:  # a label only where it fits
                ax.text(left + width / 2, rank, str(mb), ha="center", va="center",
                        color="white", fontsize=8)
    ax.set_yticks(range(len(timelines)), [f"stage {r}" for r in range(len(timelines))])
    ax.set_ylim(len(timelines) - 0.5, -0.5)  # stage 0 on top
    ax.set_xlim(0, end_ms * 1.01)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("rank (pipeline stage)")
    ax.legend(handles=[Patch(color=colours["F"], label="forward (F)"),
                       Patch(color=colours["B"], label="backward (B)")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: hides no box
    if title is not None:
        ax.set_title(title)
    return ax


def pipeline_worker(microbatch_counts: Sequence[int], steps: int = 3, batch_size: int = 16,
                    sizes: Sequence[int] = DEFAULT_SIZES, dtype: torch.dtype = torch.float64,
                    optimizer: str = "sgd", lr: float = 0.05, seed: int = 0,
                    torch_schedule: bool = False) -> dict[int, dict[str, Any]]:
    """Body of each launched rank: for every micro-batch count, train a fresh model with
    :func:`gpipe_train` (and :func:`torch_gpipe_train` when `torch_schedule`) on
    :func:`regression_batches`; returns ``{m: {"gpipe": ..., "torch": ...}}`` for this rank."""
    x, y = regression_batches(steps, batch_size, sizes[0], sizes[-1], dtype=dtype)
    out: dict[int, dict[str, Any]] = {}
    for m in microbatch_counts:
        out[m] = {"gpipe": gpipe_train(mlp(sizes, seed, dtype), x, y, m, optimizer, lr)}
        if torch_schedule:
            out[m]["torch"] = torch_gpipe_train(mlp(sizes, seed, dtype), x, y, m, optimizer, lr)
    return out


def merge_stages(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Ranks' results to one: full state and grads, timelines[step][rank], rank 0's losses."""
    errors = [r["error"] for r in per_rank if "error" in r]
    if errors:
        return {"error": errors[0]}
    merged: dict[str, Any] = {
        "losses": per_rank[0]["losses"],
        "state": {k: v for r in per_rank for k, v in r["state"].items()},
        "grads": {k: v for r in per_rank for k, v in r["grads"].items()},
    }
    if "timelines" in per_rank[0]:
        steps = len(per_rank[0]["timelines"])
        merged["timelines"] = [[r["timelines"][s] for r in per_rank] for s in range(steps)]
    return merged


def _check_run(world_size: int, counts: Sequence[int], steps: int, batch_size: int,
               sizes: Sequence[int]) -> None:
    _check_count("world_size", world_size)
    _check_count("steps", steps)
    _check_count("batch_size", batch_size)
    linears = len(sizes) - 1
    if world_size > linears:
        raise ValueError(f"{world_size} stages need at least {world_size} Linear layers, "
                         f"sizes {tuple(sizes)} give {linears}")
    for m in counts:
        _check_count("microbatches", m)
        if batch_size % m:
            raise ValueError(f"a batch of {batch_size} rows does not split into {m} equal "
                             "micro-batches; use a batch size divisible by the number of "
                             "micro-batches")


def run_pipeline_sweep(world_size: int = 2, microbatch_counts: Sequence[int] = (1, 2, 4, 8),
                       steps: int = 3, batch_size: int = 16, sizes: Sequence[int] = DEFAULT_SIZES,
                       dtype: torch.dtype = torch.float64, optimizer: str = "sgd",
                       lr: float = 0.05, torch_schedule: bool = False,
                       timeout: float = 60.0) -> dict[int, dict[str, Any]]:
    """One launch, several micro-batch counts: ``{m: result}`` with `result` as in
    :func:`run_pipeline` (one fresh model per ``m``, the same data)."""
    counts = list(microbatch_counts)
    _check_run(world_size, counts, steps, batch_size, sizes)
    per_rank = launch(pipeline_worker, world_size, counts, steps, batch_size, tuple(sizes), dtype,
                      optimizer, lr, timeout=timeout, torch_schedule=torch_schedule)
    out = {}
    for m in counts:
        out[m] = merge_stages([r[m]["gpipe"] for r in per_rank])
        if torch_schedule:
            out[m]["torch"] = merge_stages([r[m]["torch"] for r in per_rank])
    return out


def run_pipeline(world_size: int = 2, microbatches: int = 4, steps: int = 3, batch_size: int = 16,
                 sizes: Sequence[int] = DEFAULT_SIZES, dtype: torch.dtype = torch.float64,
                 optimizer: str = "sgd", lr: float = 0.05, torch_schedule: bool = False,
                 timeout: float = 60.0) -> dict[str, Any]:
    """Launch `world_size` ranks, train `steps` batches with GPipe, return plain results.

    ``losses`` (per step), ``state`` and ``grads`` (the whole model's, merged from the
    stages: compare with ``train_single``), ``timelines[step][rank]`` (lists of
    ``(kind, microbatch, start, end)``), and with `torch_schedule` also ``torch``: the
    ``ScheduleGPipe`` run's ``losses``, ``state`` and ``grads``, or ``{"error": text}``.
    """
    return run_pipeline_sweep(world_size, (microbatches,), steps, batch_size, sizes, dtype,
                              optimizer, lr, torch_schedule, timeout)[microbatches]
