"""Chapter 10 graders: the bytes a ring all-reduce sends, its time under the alpha-beta
model, ZeRO's memory per device, the pipeline bubble and a column-parallel weight shard."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aimodels.distributed import collectives, pipeline, sharding

from ._common import NotYet, _number, _report, _shape, call, fresh_rng, grader, torch_generator

__all__ = [
    "check_bubble_fraction",
    "check_column_shard",
    "check_ring_bytes",
    "check_ring_time",
    "check_zero_memory",
]

Slip = tuple[str, Callable[..., float]]


def _grade_formula(label: str, fn: Callable[..., Any], cases: Sequence[tuple],
                   reference: Callable[..., float], slips: Sequence[Slip], hint: str,
                   rel: float = 1e-6) -> None:
    """Run ``fn`` on every case. When a number is wrong, ``NotYet`` names the first wrong
    case and gives the hint of the slip that matches the learner on every case (else on
    that case), else ``hint``."""

    def same(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)

    def slip_value(slip: Callable[..., float], case: tuple) -> float | None:
        try:
            return float(slip(*case))
        except Exception:  # a slip that cannot handle this case
            return None

    answers = [_number(f"{label}{case}", call(fn, *case, hint=hint)) for case in cases]
    wrong = [i for i, case in enumerate(cases) if not same(answers[i], reference(*case))]
    if not wrong:
        return
    first = cases[wrong[0]]
    message = (f"{label}{first} = {answers[wrong[0]]:.6g}, expected {reference(*first):.6g}.")
    everywhere = [h for h, slip in slips
                  if all((v := slip_value(slip, c)) is not None and same(a, v)
                         for c, a in zip(cases, answers, strict=True))]
    here = [h for h, slip in slips
            if (v := slip_value(slip, first)) is not None and same(answers[wrong[0]], v)]
    raise NotYet(message, (everywhere or here or [hint])[0])


# --------------------------------------------------------------------------- ring bytes
_RING_HINT = ("a ring all-reduce is a reduce-scatter (N - 1 steps) then an all-gather (N - 1 "
              "steps); each step every rank sends one chunk of size/N bytes.")


@grader
def check_ring_bytes(fn: Callable[[float, int], float]) -> bool:
    """Ch. 10, exercise 1: ``fn(size_bytes, world_size)`` is the number of bytes each rank
    sends in a ring all-reduce of a ``size_bytes`` buffer over ``world_size`` ranks."""
    rng = fresh_rng()
    cases = [(1_000_000.0, 2), (4e9, 8), (3.0e6, 3), (7.5e8, 64), (123.0, 1),
             (float(rng.randint(1, 10**9)), rng.randint(2, 32))]
    slips: list[Slip] = [
        ("that is only the reduce-scatter half: the all-gather sends as much again.",
         lambda s, n: (n - 1) / n * s),
        ("each rank sends a chunk of size/N per step, not the whole buffer (2 (N - 1) x size "
         "is also what all N ranks send together; the question asks per rank).",
         lambda s, n: 2 * (n - 1) * s),
        ("N ranks take N - 1 steps per phase, not N: a rank never sends to itself.",
         lambda s, n: 2 * s),
        ("with N = 1 there is no one to send to: 2 (N - 1) / N x size is 0.",
         lambda s, n: 2 * s / n),
    ]
    _grade_formula("ring bytes", fn, cases, collectives.all_reduce_bytes_per_rank, slips,
                   _RING_HINT)
    return _report(True, "each rank sends 2 (N - 1) / N of the buffer: almost twice its size, "
                         "whatever N is.")


# --------------------------------------------------------------------------- alpha-beta time
@grader
def check_ring_time(fn: Callable[[float, int, float, float], float]) -> bool:
    """Ch. 10, exercise 2: ``fn(size_bytes, world_size, alpha_s, bandwidth_bytes_per_s)``
    is the time of a ring all-reduce: 2 (N - 1) messages of latency alpha each, and
    2 (N - 1) / N x size bytes per rank over a link of the given bandwidth."""
    rng = fresh_rng()
    cases = [(1e9, 3, 5e-6, 25e9), (2e6, 2, 1e-4, 1e9), (3e8, 1024, 8e-6, 50e9),
             (1e3, 4, 2e-5, 1e10),
             (float(rng.randint(10**3, 10**10)), rng.randint(2, 512), rng.uniform(1e-6, 1e-4),
              rng.uniform(1e9, 1e11))]

    slips: list[Slip] = [
        ("latency is paid once per step, and there are 2 (N - 1) steps, not one.",
         lambda s, n, a, b: a + 2 * (n - 1) / n * s / b),
        ("the bandwidth term is 2 (N - 1) / N x size / bandwidth: each rank sends that many "
         "bytes.",
         lambda s, n, a, b: 2 * (n - 1) * a + s / b),
        ("the bandwidth term is 2 (N - 1) / N x size / bandwidth, not 2 (N - 1) x size / "
         "bandwidth: each step moves a chunk of size/N.",
         lambda s, n, a, b: 2 * (n - 1) * a + 2 * (n - 1) * s / b),
        ("both phases count: reduce-scatter and all-gather each take N - 1 steps.",
         lambda s, n, a, b: (n - 1) * a + (n - 1) / n * s / b),
        ("divide bytes by bandwidth (bytes per second) to get seconds, do not multiply.",
         lambda s, n, a, b: 2 * (n - 1) * a + 2 * (n - 1) / n * s * b),
    ]
    _grade_formula("ring time", fn, cases, collectives.ring_all_reduce_time, slips,
                   "t = 2 (N - 1) alpha + 2 (N - 1) / N x size / bandwidth.", rel=1e-6)
    return _report(True, "latency grows with N, the bandwidth term does not: big messages "
                         "cost about 2 x size / bandwidth on any ring.")


# --------------------------------------------------------------------------- ZeRO memory
def _zero_slip(*, grads_from: int = 2, params_from: int = 3, k: float = 12,
               param_bytes: float = 2, grad_bytes: float = 2, shard_optimizer: bool = True,
               unit: float = 1.0) -> Callable[..., float]:
    """ZeRO's bytes per device with one mistake: gradients or parameters sharded from
    another stage, another K, fp32 weights, the optimizer never sharded, or another unit."""

    def slip(n_params: float, n_devices: int, stage: int) -> float:
        opt = k * n_params / (n_devices if stage >= 1 and shard_optimizer else 1)
        grads = grad_bytes * n_params / (n_devices if stage >= grads_from else 1)
        params = param_bytes * n_params / (n_devices if stage >= params_from else 1)
        return (opt + grads + params) / unit

    return slip


@grader
def check_zero_memory(fn: Callable[[float, int, int], float]) -> bool:
    """Ch. 10, exercise 3: ``fn(n_params, n_devices, stage)`` is the bytes of model state
    per device under ZeRO stage 0-3 for mixed-precision Adam: 2 bytes of fp16 weights,
    2 of fp16 gradients and K = 12 of optimizer state (fp32 weights, momentum, variance)
    per parameter."""
    rng = fresh_rng()
    cases = ([(7.5e9, 64, s) for s in range(4)] + [(1e9, 8, s) for s in range(4)]
             + [(float(rng.randint(10**6, 10**11)), rng.randint(2, 1024), rng.randint(0, 3)),
                (3e8, 1, 3)])

    def reference(n_params: float, n_devices: int, stage: int) -> float:
        return sharding.zero_memory_bytes(n_params, n_devices, stage)

    slips: list[Slip] = [
        ("stage 1 shards only the optimizer state; gradients are sharded from stage 2 on.",
         _zero_slip(grads_from=1)),
        ("stage 2 shards the gradients as well as the optimizer state.", _zero_slip(grads_from=3)),
        ("stage 3 shards the fp16 weights too: every term is divided by N.",
         _zero_slip(params_from=4)),
        ("stage 2 keeps full fp16 weights on every device; only stage 3 shards them.",
         _zero_slip(params_from=2)),
        ("K = 12: fp32 weights, momentum and variance are 4 bytes each; the 2 + 2 bytes of fp16 "
         "weights and gradients are counted separately.", _zero_slip(k=16)),
        ("stage 1 already shards the optimizer state (the K bytes) across the N devices.",
         _zero_slip(shard_optimizer=False, grads_from=4, params_from=4)),
        ("the answer is in bytes, not GB.", _zero_slip(unit=1e9)),
        ("the answer is in bytes, not GiB.", _zero_slip(unit=2**30)),
    ]
    _grade_formula("ZeRO bytes", fn, cases, reference, slips,
                   "stage 0 keeps (2 + 2 + K) psi per device; stage 1 divides K psi by N, stage 2 "
                   "also the 2 psi of gradients, stage 3 also the 2 psi of weights.")
    return _report(True, "ZeRO-3 divides all 16 bytes per parameter by N; 7.5B parameters on 64 "
                         "devices need 1.9 GB each instead of 120 GB.")


# --------------------------------------------------------------------------- pipeline bubble
@grader
def check_bubble_fraction(fn: Callable[[int, int], float]) -> bool:
    """Ch. 10, exercise 4: ``fn(stages, microbatches)`` is the fraction of a GPipe step
    that a stage sits idle, when every micro-batch's forward and backward take the same
    time on every stage."""
    rng = fresh_rng()
    cases = [(2, 4), (4, 1), (8, 32), (1, 5), (4, 16), (rng.randint(2, 16), rng.randint(1, 64))]
    slips: list[Slip] = [
        ("(p - 1) / m is the bubble relative to the ideal time (Narayanan et al.); the idle "
         "fraction of the whole step is (p - 1) / (m + p - 1).", lambda p, m: (p - 1) / m),
        ("a step takes m + p - 1 slots per direction, not m + p.", lambda p, m: (p - 1) / (m + p)),
        ("the bubble is p - 1 slots, not p: the last stage starts after p - 1 hand-offs.",
         lambda p, m: p / (m + p - 1)),
        ("that is the busy fraction, m / (m + p - 1); the question asks for the idle one.",
         lambda p, m: m / (m + p - 1)),
        ("return a fraction between 0 and 1, not a percentage.",
         lambda p, m: 100 * (p - 1) / (m + p - 1)),
    ]
    _grade_formula("bubble", fn, cases, pipeline.pipeline_bubble_fraction, slips,
                   "draw the schedule: m + p - 1 time slots per direction, of which each stage "
                   "is busy for m.")
    return _report(True, "the bubble (p - 1) / (m + p - 1) shrinks as micro-batches grow: "
                         "m = 4p keeps it under 20%.")


# --------------------------------------------------------------------------- column shard
@grader
def check_column_shard(fn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> bool:
    """Ch. 10, exercise 5: ``fn(weight, rank, world_size)`` returns this rank's part of an
    ``nn.Linear`` weight (shape [out_features, in_features]) for a column-parallel layer:
    the rank computes the contiguous output features rank * out/N to (rank + 1) * out/N."""
    rng = fresh_rng()
    g = torch_generator(rng)
    hint = ("nn.Linear stores W as [out_features, in_features] and computes x @ W.T: output "
            "features are the rows of W. Take rows rank*out/N to (rank+1)*out/N.")
    shapes = [(8, 6, 2), (12, 5, 3), (6, 6, 2), (rng.choice([4, 8, 16]) * 4, rng.randint(2, 9), 4)]
    for out_features, in_features, world in shapes:
        weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
        for rank in range(world):
            got = call(fn, weight.clone(), rank, world, hint=hint)
            share = out_features // world
            want = weight[rank * share:(rank + 1) * share]
            if not isinstance(got, torch.Tensor):
                raise NotYet(f"rank {rank} of {world}: expected a tensor, got "
                             f"{type(got).__name__}.", hint)
            if got.dtype != weight.dtype:
                raise NotYet(f"rank {rank} of {world}: got a {got.dtype} tensor from a "
                             f"{weight.dtype} weight.", "keep the weight's dtype: slice it, "
                             "do not convert it.")
            if got.shape == want.shape and torch.equal(got, want):
                continue
            label = f"weight {list(weight.shape)}, rank {rank} of {world}: got {_shape(got)}"
            columns = weight[:, rank * (in_features // world):(rank + 1) * (in_features // world)]
            if got.shape == columns.shape and torch.equal(got, columns):
                raise NotYet(f"{label}, the input columns.", "that is the row-parallel split (the "
                             "input features). " + hint)
            if got.shape == want.T.shape and torch.equal(got, want.T):
                raise NotYet(f"{label}, the shard transposed.",
                             "keep nn.Linear's layout [out, in].")
            if got.shape == want.shape and rank + 1 < world and torch.equal(
                    got, weight[(rank + 1) * share:(rank + 2) * share]):
                raise NotYet(f"{label}, the next rank's rows.", "rank r starts at row r * out/N.")
            raise NotYet(f"{label}, not rows {rank * share} to {(rank + 1) * share}.", hint)
    return _report(True, "each rank holds out/N rows of W and computes out/N output features; "
                         "the row-parallel layer after it needs one all-reduce.")
