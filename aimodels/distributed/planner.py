"""Which parallelism to pick: model-state memory and traffic per device, from the module's formulas.

`plan(n_params, device_memory_bytes, n_devices)` lists, for data parallelism and ZeRO
stages 1-3 (FSDP is stage 3), the bytes of model state each device holds and the bytes
it sends per step, and picks the least sharded one that fits. Less sharding means less
communication and simpler code, so the first that fits wins.

It counts model states only (mixed-precision Adam, 16 bytes per parameter), not
activations, which depend on batch size and sequence length and are cut by activation
recomputation. Tensor and pipeline parallelism do not lower the total either: the
16 bytes per parameter are split N ways at best. When even full sharding does not fit,
the planner says how many devices would. Tensor parallelism inside a node and pipeline
parallelism across nodes (Narayanan et al., 2021) are chosen for other reasons, which
the chapter discusses: activations that do not fit, and ZeRO-3's weight traffic over slow
links between nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aimodels.distributed.collectives import all_reduce_bytes_per_rank
from aimodels.distributed.sharding import zero_memory_bytes

__all__ = ["Option", "plan", "STRATEGIES"]

STRATEGIES = {0: "data parallel (DDP)", 1: "ZeRO-1 (shard optimizer state)",
              2: "ZeRO-2 (shard optimizer state and gradients)",
              3: "FSDP / ZeRO-3 (shard everything)"}


@dataclass(frozen=True)
class Option:
    stage: int
    strategy: str
    bytes_per_device: float
    sent_per_device_per_step: float  # bytes, ring collectives over the n_devices ranks
    fits: bool


def _traffic(n_params: float, n_devices: int, stage: int, grad_bytes: float) -> float:
    """Bytes each rank sends per step. Stages 0-2: one all-reduce of the gradients (a
    reduce-scatter plus an all-gather, 2 (N-1)/N of the gradient bytes). Stage 3 gathers
    the weights again for the backward pass: 1.5 times as much (ZeRO, section 7)."""
    reduce = all_reduce_bytes_per_rank(n_params * grad_bytes, n_devices)
    return reduce * (1.5 if stage == 3 else 1.0)


def plan(n_params: float, device_memory_bytes: float, n_devices: int, *, headroom: float = 0.8,
         optimizer_bytes_per_param: float = 12, param_bytes: float = 2, grad_bytes: float = 2
         ) -> tuple[list[Option], str]:
    """Every option's memory and traffic per device, and the pick: the least sharded option
    whose model state fits in `headroom` of a device's memory (the rest for activations)."""
    if not n_params > 0 or not device_memory_bytes > 0:
        raise ValueError(f"n_params and device_memory_bytes must be > 0, got {n_params} and "
                         f"{device_memory_bytes}")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    budget = headroom * device_memory_bytes
    options = []
    for stage in range(4):
        need = zero_memory_bytes(n_params, n_devices, stage, optimizer_bytes_per_param,
                                 param_bytes, grad_bytes)
        options.append(Option(stage, STRATEGIES[stage], need,
                               _traffic(n_params, n_devices, stage, grad_bytes), need <= budget))
    pick = next((o.strategy for o in options if o.fits), None)
    if pick is None:
        total = options[-1].bytes_per_device * n_devices  # ZeRO-3 splits all of it N ways
        pick = (f"none: even fully sharded it needs {math.ceil(total / budget)} devices, "
                f"not {n_devices}")
    return options, pick
