r"""Ring all-reduce from point-to-point messages, and the alpha-beta model of its cost (chapter 10).

**All-reduce.** Every rank holds a tensor of :math:`n` bytes; afterwards every rank holds
the element-wise sum over ranks. Data parallelism calls it once per step (or once per
bucket) on the gradients.

**The ring algorithm.** The :math:`N` ranks stand in a ring: rank :math:`r` only ever
sends to :math:`r+1` and receives from :math:`r-1` (mod :math:`N`). The tensor is cut into
:math:`N` chunks (``torch.tensor_split``: when :math:`N` does not divide the element count,
the first chunks hold one element more).

1. *Reduce-scatter*, :math:`N-1` steps. At step :math:`s` rank :math:`r` sends chunk
   :math:`(r-s) \bmod N` to its right and adds the chunk :math:`(r-s-1) \bmod N` it receives
   from its left into its own copy. A chunk travels once around the ring picking up one
   term per hop, so after :math:`N-1` steps rank :math:`r` holds the full sum of chunk
   :math:`(r+1) \bmod N`.
2. *All-gather*, :math:`N-1` steps. At step :math:`s` rank :math:`r` sends chunk
   :math:`(r+1-s) \bmod N` and overwrites chunk :math:`(r-s) \bmod N` with what it
   receives: the finished chunks travel once more around the ring.

Each rank sends :math:`2(N-1)` messages of about :math:`n/N` bytes, that is

.. math::

    \text{bytes sent per rank} = \frac{2(N-1)}{N}\, n ,

which tends to :math:`2n` however large :math:`N` grows, every link carries the same load,
and no all-reduce algorithm can send less per rank: the ring is *bandwidth-optimal*
(Patarasuk and Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", J. Parallel Distrib. Comput. 69(2); Thakur, Rabenseifner and Gropp 2005,
"Optimization of collective communication operations in MPICH", Int. J. High Perform.
Comput. Appl. 19(1)). NVIDIA's nccl-tests use the same factor to turn an all-reduce's
"algorithm bandwidth" into its "bus bandwidth" (nccl-tests, doc/PERFORMANCE.md). With
uneven chunks the count is exact per rank from the chunk sizes
(:func:`ring_all_reduce_bytes`); summed over all ranks it is exactly :math:`2(N-1)\,n`.

**The alpha-beta model.** A message of :math:`m` bytes over one link costs
:math:`\alpha + m/B` (start-up latency :math:`\alpha`, bandwidth :math:`B`; Hockney 1994).
The ring makes :math:`2(N-1)` sequential steps of :math:`n/N` bytes, so

.. math::

    t_\text{ring}(n) = 2(N-1)\,\alpha_\text{link} + \frac{2(N-1)}{N}\,\frac{n}{B}
    \qquad (:func:`ring_all_reduce_time`).

For one fixed :math:`N` that is a straight line in the message size :math:`n` (the bytes
of the tensor each rank passes to all-reduce, *not* the bytes it sends):
:math:`t = \alpha + \beta n` with :math:`\alpha = 2(N-1)\alpha_\text{link}` and
:math:`\beta = 2(N-1)/(N B)`. :func:`fit_alpha_beta` fits that line to timings from
:func:`time_all_reduce` by least squares, and :func:`predict_all_reduce_time` uses it.
The *bus bandwidth* :math:`2(N-1)/(N\beta)` recovers :math:`B`.

**Interconnect figures** for back-of-the-envelope estimates with
:func:`ring_all_reduce_time` (per direction, because in a ring each rank sends and
receives at the same time):

* NVLink 4 on an H100 SXM: 900 GB/s bidirectional per GPU (NVIDIA, "Introducing NVIDIA
  HGX H100: An Accelerated Server Platform for AI and High-Performance Computing",
  developer blog 2022), so :data:`NVLINK4_H100_BYTES_PER_S` = 450 GB/s each way.
* InfiniBand NDR: 400 Gb/s per port (NVIDIA QM97xx "NDR 400Gbps InfiniBand Switch
  Systems" user manual; ConnectX-7 adapters), so :data:`INFINIBAND_NDR_BYTES_PER_S`
  = 50 GB/s each way.

These are link peaks; measured rates are lower (NVIDIA/nccl issue 1264: 376-380 GB/s
one way in NVIDIA's peer-to-peer bandwidth test on H100 NVLink). The localhost gloo group
of this book measures about 1-2 GB/s.

=================================== ===========================================================
name                                what it does
=================================== ===========================================================
:func:`ring_all_reduce`             in-place SUM all-reduce from ``isend``/``recv`` only
:func:`ring_all_reduce_bytes`       exact bytes one rank sends in :func:`ring_all_reduce`
:func:`all_reduce_bytes_per_rank`   the textbook :math:`2(N-1)/N \cdot n`
:func:`time_all_reduce`             median time of an all-reduce per message size (in-group)
:func:`fit_alpha_beta`              least-squares :math:`t = \alpha + \beta n`
:func:`predict_all_reduce_time`     :math:`k\alpha + \beta n` for :math:`k` calls
:func:`ring_all_reduce_time`        the ring model from link latency and bandwidth
:func:`time_all_reduce_worker`      worker: times ``dist.all_reduce`` and the ring
:func:`run_time_all_reduce`         ``launch`` that worker and return the timings
=================================== ===========================================================
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from aimodels.distributed.launch import launch

__all__ = [
    "INFINIBAND_NDR_BYTES_PER_S",
    "NVLINK4_H100_BYTES_PER_S",
    "all_reduce_bytes_per_rank",
    "fit_alpha_beta",
    "predict_all_reduce_time",
    "ring_all_reduce",
    "ring_all_reduce_bytes",
    "ring_all_reduce_time",
    "run_time_all_reduce",
    "time_all_reduce",
    "time_all_reduce_worker",
]

#: NVLink 4 (H100 SXM): 900 GB/s bidirectional per GPU, 450 GB/s in each direction.
NVLINK4_H100_BYTES_PER_S = 450e9
#: InfiniBand NDR: 400 Gb/s per port and direction = 50 GB/s.
INFINIBAND_NDR_BYTES_PER_S = 400e9 / 8


# --------------------------------------------------------------------------- helpers
def _group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("this function needs a process group: call it inside a worker "
                           "started by aimodels.distributed.launch (or after init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the "
                         "group it was given")
    return rank, world


def _global(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of `group_rank` in `group` (the identity for the default group)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _chunk_sizes(numel: int, world: int) -> list[int]:
    """Element counts of torch.tensor_split(x, world) for a 1-D x of `numel` elements."""
    base, extra = divmod(numel, world)
    return [base + 1 if i < extra else base for i in range(world)]


def _check_world(world: int) -> None:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world size must be an int >= 1, got {world!r}")


# --------------------------------------------------------------------------- the ring
@torch.no_grad()
def ring_all_reduce(tensor: Tensor, group: dist.ProcessGroup | None = None,
                    stats: dict[str, int] | None = None) -> Tensor:
    """Sum `tensor` over the ranks of `group`, in place, with a ring of point-to-point messages.

    The result equals ``dist.all_reduce(tensor, op=SUM, group=group)`` up to the order of
    the floating-point additions. Works for any shape (a non-contiguous tensor is reduced
    in a contiguous copy and copied back), any element count (chunks of unequal length,
    empty chunks are skipped on both sides) and any world size (1: nothing to do).
    Floating-point and integer dtypes are accepted; bool and complex raise ``TypeError``.

    Every rank posts a non-blocking ``isend`` to its right neighbour before the blocking
    ``recv`` from its left, so no rank waits on a send that nobody receives yet.

    If `stats` is given, ``bytes_sent``, ``bytes_received`` and ``messages_sent`` are
    *added* to it (one dict can count many calls). Returns `tensor`.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"ring_all_reduce needs a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"ring_all_reduce sums floating-point or integer tensors, got dtype "
                        f"{tensor.dtype}")
    rank, world = _group_rank_world(group)
    if stats is not None:
        for key in ("bytes_sent", "bytes_received", "messages_sent"):
            stats.setdefault(key, 0)
    if world == 1 or tensor.numel() == 0:
        return tensor

    contiguous = tensor.is_contiguous()
    flat = tensor.view(-1) if contiguous else tensor.contiguous().view(-1)
    chunks = torch.tensor_split(flat, world)
    right, left = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
    size = flat.element_size()

    def exchange(send_index: int, recv_index: int, reduce: bool) -> None:
        out, into = chunks[send_index], chunks[recv_index]
        work = None
        if out.numel():
            work = dist.isend(out, dst=right, group=group)
            if stats is not None:
                stats["bytes_sent"] += out.numel() * size
                stats["messages_sent"] += 1
        if into.numel():
            buffer = torch.empty_like(into)
            dist.recv(buffer, src=left, group=group)
            if reduce:
                into.add_(buffer)
            else:
                into.copy_(buffer)
            if stats is not None:
                stats["bytes_received"] += into.numel() * size
        if work is not None:
            work.wait()  # `out` must not change before it has left

    for step in range(world - 1):  # reduce-scatter
        exchange((rank - step) % world, (rank - step - 1) % world, reduce=True)
    for step in range(world - 1):  # all-gather
        exchange((rank + 1 - step) % world, (rank - step) % world, reduce=False)

    if not contiguous:
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def ring_all_reduce_bytes(numel: int, element_size: int, world: int, rank: int = 0) -> int:
    """Exact bytes that `rank` sends in :func:`ring_all_reduce` of `numel` elements.

    In reduce-scatter rank r sends every chunk but (r+1) mod N, in all-gather every chunk
    but (r+2) mod N, so it sends ``2 * numel - size[(r+1) % N] - size[(r+2) % N]`` elements.
    """
    _check_world(world)
    if numel < 0 or element_size < 1:
        raise ValueError(f"numel must be >= 0 and element_size >= 1, got {numel} and "
                         f"{element_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if world == 1:
        return 0
    sizes = _chunk_sizes(numel, world)
    return (2 * numel - sizes[(rank + 1) % world] - sizes[(rank + 2) % world]) * element_size


def all_reduce_bytes_per_rank(size_bytes: float, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of a `size_bytes` message: 2(N-1)/N * size.

    Exact when the element count divides by N; otherwise a rank's true count
    (:func:`ring_all_reduce_bytes`) differs from it by less than two elements.
    """
    _check_world(world)
    if size_bytes < 0:
        raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
    return 2 * (world - 1) / world * size_bytes


# --------------------------------------------------------------------------- timing
def time_all_reduce(sizes_bytes: Sequence[int], repeats: int = 5, warmup: int = 1,
                    group: dist.ProcessGroup | None = None,
                    all_reduce: Callable[..., Any] | None = None) -> list[tuple[int, float]]:
    """Median seconds of one all-reduce of a float32 tensor of each size (in-group).

    Each timed call is framed by barriers, so it measures one collective from a common
    start. The time of a repeat is the slowest rank's (a MAX all-reduce of the timings),
    which makes every rank return the same list. `all_reduce(tensor, group=group)`
    defaults to ``dist.all_reduce``; pass :func:`ring_all_reduce` to time the ring.
    Returns ``[(bytes, seconds), ...]`` with bytes = 4 * elements actually reduced.
    """
    _group_rank_world(group)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    reduce = all_reduce if all_reduce is not None else dist.all_reduce
    results = []
    for size in sizes_bytes:
        numel = max(1, int(size) // 4)
        tensor = torch.ones(numel, dtype=torch.float32)
        for _ in range(warmup):
            reduce(tensor, group=group)
        times = torch.empty(repeats, dtype=torch.float64)
        for i in range(repeats):
            dist.barrier(group=group)
            start = time.perf_counter()
            reduce(tensor, group=group)
            times[i] = time.perf_counter() - start
        dist.barrier(group=group)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        results.append((numel * 4, statistics.median(times.tolist())))
    return results


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    r"""Least-squares line :math:`t = \alpha + \beta n` through (message bytes, seconds).

    `n` is the size of the tensor each rank all-reduces, not the bytes it sends, so for a
    ring of N ranks :math:`\alpha = 2(N-1)\alpha_\text{link}` and :math:`\beta = 2(N-1)/(NB)`
    (see the module docstring). Returns (alpha in s, beta in s/byte). The fit is ordinary
    least squares: large messages dominate it, and noise can make alpha slightly negative.
    """
    n = torch.as_tensor(sizes, dtype=torch.float64).flatten()
    t = torch.as_tensor(times, dtype=torch.float64).flatten()
    if n.numel() != t.numel():
        raise ValueError(f"need one time per size, got {n.numel()} sizes and {t.numel()} times")
    if torch.unique(n).numel() < 2:
        raise ValueError(f"need at least two different sizes to fit a line, got {n.tolist()}")
    design = torch.stack([torch.ones_like(n), n], dim=1)
    solution = torch.linalg.lstsq(design, t.unsqueeze(1), driver="gelsd").solution.flatten()
    return float(solution[0]), float(solution[1])


def predict_all_reduce_time(n_bytes: float, alpha: float, beta: float, calls: int = 1) -> float:
    r"""Predicted seconds to all-reduce `n_bytes` split over `calls` collectives:
    :math:`\text{calls}\cdot\alpha + \beta\, n` (each call pays the latency once)."""
    if n_bytes < 0 or calls < 0:
        raise ValueError(f"n_bytes and calls must be >= 0, got {n_bytes} and {calls}")
    return calls * alpha + beta * n_bytes


def ring_all_reduce_time(n_bytes: float, world: int, alpha_link: float,
                         bandwidth_bytes_per_s: float) -> float:
    r""":math:`2(N-1)\alpha_\text{link} + 2(N-1)/N \cdot n / B`: seconds for a ring all-reduce.

    E.g. the fp32 gradients of a 7B-parameter model (28 GB) over 8 GPUs on NVLink 4
    (:data:`NVLINK4_H100_BYTES_PER_S`) take at least 2*7/8*28e9/450e9 = 0.11 s, over
    InfiniBand NDR between 8 nodes (:data:`INFINIBAND_NDR_BYTES_PER_S`) 0.98 s.
    """
    _check_world(world)
    if n_bytes < 0 or alpha_link < 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(f"need n_bytes >= 0, alpha_link >= 0 and bandwidth > 0, got {n_bytes}, "
                         f"{alpha_link} and {bandwidth_bytes_per_s}")
    steps = 2 * (world - 1)
    return steps * alpha_link + steps / world * n_bytes / bandwidth_bytes_per_s


# --------------------------------------------------------------------------- worker
def time_all_reduce_worker(sizes_bytes: Sequence[int], repeats: int = 5,
                           ring: bool = True) -> dict[str, Any]:
    """Worker: time ``dist.all_reduce`` (and the ring, if `ring`) and fit alpha, beta to each."""
    _, world = _group_rank_world(None)
    out: dict[str, Any] = {"world_size": world}
    timed = {"gloo": None, "ring": ring_all_reduce} if ring else {"gloo": None}
    for name, fn in timed.items():
        pairs = time_all_reduce(sizes_bytes, repeats=repeats, all_reduce=fn)
        alpha, beta = fit_alpha_beta([p[0] for p in pairs], [p[1] for p in pairs])
        out[name] = {"timings": pairs, "alpha": alpha, "beta": beta}
    return out


def run_time_all_reduce(world_size: int = 2,
                        sizes_bytes: Sequence[int] = (2**14, 2**17, 2**20, 2**22, 2**23),
                        repeats: int = 5, ring: bool = True, timeout: float = 60.0
                        ) -> dict[str, Any]:
    """``launch`` :func:`time_all_reduce_worker`; returns rank 0's timings and fits."""
    return launch(time_all_reduce_worker, world_size, list(sizes_bytes), repeats, ring,
                  timeout=timeout)[0]


def ring_check(lengths: Sequence[int] = (1, 7, 1000, 2**18), dtype: torch.dtype = torch.float64,
               seed: int = 0) -> list[dict[str, Any]]:
    """In-group: each length through :func:`ring_all_reduce` and through ``dist.all_reduce``.

    Every rank draws its own random tensor (seeded by `seed` and its rank). Returns, per
    length, the largest difference between the two sums, the bytes this rank sent, and
    the exact count :func:`ring_all_reduce_bytes` predicts for it.
    """
    rank, world = _group_rank_world(None)
    out = []
    for length in lengths:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + length)
        mine = torch.randn(length, generator=generator, dtype=dtype)
        expected = mine.clone()
        dist.all_reduce(expected)
        stats: dict[str, int] = {}
        ring_all_reduce(mine, stats=stats)
        out.append({"length": length, "rank": rank, "world_size": world,
                    "max_abs_diff": (mine - expected).abs().max().item(),
                    "bytes_sent": stats["bytes_sent"],
                    "predicted_bytes": ring_all_reduce_bytes(length, mine.element_size(), world,
                                                             rank),
                    "formula_bytes": all_reduce_bytes_per_rank(length * mine.element_size(),
                                                               world)})
    return out
