"""Chapter 14 graders: the size of an int8 file, which shapes an ONNX input accepts, the
latency of a cloud request with a queue, and the model size where edge and cloud tie."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from aimodels import edge
from aimodels.export import shape_accepts

from ._common import NotYet, _report, call, fresh_rng, grader
from .ch10 import _grade_formula

__all__ = [
    "check_cloud_latency",
    "check_crossover_flops",
    "check_int8_size",
    "check_shape_accepts",
]

Slip = tuple[str, Callable[..., float]]


# --------------------------------------------------------------------------- int8 size
def _int8_bytes(quantized_params: float, float_params: float) -> float:
    return 1.0 * quantized_params + 4.0 * float_params


@grader
def check_int8_size(fn: Callable[[float, float], float]) -> bool:
    """Ch. 14, exercise 1: ``fn(quantized_params, float_params)`` is the bytes of the
    weights after int8 quantisation: one byte per quantised weight, four (fp32) for every
    weight left in float (LayerNorm gains, biases, anything not quantised)."""
    rng = fresh_rng()
    cases = [(4_000_000.0, 50_000.0), (221_184.0, 60_000.0), (1e9, 0.0), (0.0, 1234.0),
             (float(rng.randint(10**4, 10**8)), float(rng.randint(10**3, 10**6)))]
    slips: list[Slip] = [
        ("swapped: the quantised weights take 1 byte each and the float ones 4.",
         lambda q, f: 4 * q + f),
        ("only the quantised weights shrink: the float weights still take 4 bytes each.",
         lambda q, f: q + f),
        ("int8 is one byte per weight; fp32 is four bytes. Did you quantise anything?",
         lambda q, f: 4 * (q + f)),
        ("that is in bits: divide by 8 to get bytes.",
         lambda q, f: 8 * q + 32 * f),
    ]
    _grade_formula("int8 bytes", fn, cases, _int8_bytes, slips,
                   "bytes = 1 x quantised weights + 4 x float weights.")
    return _report(True, "1 byte per int8 weight and 4 per fp32 weight: the float leftovers "
                         "decide how close the file gets to 4x smaller.")


# --------------------------------------------------------------------------- shapes
_SHAPE_CASES: list[tuple[list, list, str]] = [
    (["batch", 1, 32, 32], [7, 1, 32, 32], "a symbolic batch takes any size"),
    (["batch", 1, 32, 32], [1, 1, 32, 32], "batch 1 is one size among others"),
    (["batch", 1, 32, 32], [7, 3, 32, 32], "a fixed size (1 channel) must match exactly"),
    (["batch", 1, 32, 32], [7, 32, 32], "the rank (number of axes) must match"),
    (["batch", 64], [3, 64], "a symbolic batch with fixed sequence 64"),
    (["batch", 64], [3, 65], "fixed 64 does not accept 65"),
    (["batch", 64], [3, 63], "fixed 64 does not accept 63 either"),
    ([4, 10], [3, 10], "a fixed batch of 4 refuses 3"),
    (["batch", "sequence"], [17], "a missing axis changes the rank"),
    (["batch", "sequence"], [2, 17], "both axes symbolic: any [N, T]"),
    (["batch", "sequence"], [2, 17, 1], "an extra axis changes the rank"),
    ([None, 10], [5, 10], "None (an unnamed dynamic axis) takes any size"),
    ([4, 10], [5, 10], "a fixed batch of 4 refuses 5"),
]


@grader
def check_shape_accepts(fn: Callable[[Sequence, Sequence], bool]) -> bool:
    """Ch. 14, exercise 2: ``fn(declared, actual)`` says whether an array of shape
    ``actual`` fits an ONNX input declared as ``declared`` (ints are fixed sizes, strings
    or ``None`` are dynamic axes)."""
    for declared, actual, why in _SHAPE_CASES:
        expected = shape_accepts(declared, actual)
        got = call(fn, list(declared), tuple(actual),
                   hint="compare the ranks first, then every fixed (int) size.")
        if isinstance(got, np.bool_) or (isinstance(got, torch.Tensor) and got.numel() == 1
                                         and got.dtype == torch.bool):
            got = bool(got)  # NumPy's np.bool_ (from np.all) or a one-element bool tensor
        if not isinstance(got, bool):
            raise NotYet(f"fn({declared}, {actual}) returned {type(got).__name__} {got!r:.40}, "
                         f"not True or False.", "return a bool.")
        if got != expected:
            verdict = "accepts" if expected else "refuses"
            if len(declared) != len(actual):
                hint = "check the rank first: an array with a different number of axes never fits."
            elif expected:
                hint = ("a string (or None) in the declared shape is a dynamic axis: it accepts "
                        "any size, not only the example's.")
            else:
                hint = "an int in the declared shape is fixed: the actual size must equal it."
            raise NotYet(f"fn({declared}, {list(actual)}) = {got}, but ONNX Runtime {verdict} "
                         f"it ({why}).", hint)
    return _report(True, "same rank, equal fixed sizes, anything for a symbolic axis: what "
                         "dynamic_shapes at export time buys you.")


# --------------------------------------------------------------------------- cloud latency
def _cloud(flops: float, server_flops: float, rtt_s: float, payload_bytes: float,
           bandwidth_bps: float, arrival_rate: float) -> float:
    return edge.cloud_latency(flops, server_flops, edge.Network(rtt_s, bandwidth_bps),
                              payload_bytes, 0.0, arrival_rate)


@grader
def check_cloud_latency(fn: Callable[..., float]) -> bool:
    """Ch. 14, exercise 3: ``fn(flops, server_flops, rtt_s, payload_bytes, bandwidth_bps,
    arrival_rate)`` is the mean latency of a cloud request: one round trip, the payload
    sent once over the link (bandwidth in bits per second), and the time in an M/M/1
    server, ``S / (1 - rho)`` with ``S = flops / server_flops`` and ``rho = arrival_rate * S``."""
    rng = fresh_rng()
    cases = [(2e9, 1e12, 0.05, 150_000.0, 20e6, 100.0),
             (1e10, 5e11, 0.1, 10_000.0, 1e6, 40.0),
             (1e8, 1e12, 0.02, 1000.0, 100e6, 0.0),
             (4e11, 1e12, 0.03, 500_000.0, 50e6, 2.0),
             (rng.uniform(1e8, 1e10), 1e12, rng.uniform(0.01, 0.2),
              float(rng.randint(10**3, 10**6)), rng.uniform(1e6, 1e8), rng.uniform(0.0, 50.0))]

    def service(f, r):
        return f / r

    slips: list[Slip] = [
        ("the server is busy: the time in an M/M/1 system is S / (1 - rho), not S.",
         lambda f, r, t, p, b, lam: t + 8 * p / b + service(f, r)),
        ("bandwidth is in bits per second: a payload of p bytes takes 8 p / B seconds.",
         lambda f, r, t, p, b, lam: t + p / b + service(f, r) / (1 - lam * service(f, r))),
        ("S / (1 - rho) already holds the service time; adding S again counts it twice.",
         lambda f, r, t, p, b, lam: t + 8 * p / b + service(f, r)
         + service(f, r) / (1 - lam * service(f, r))),
        ("rho S / (1 - rho) is the wait alone; the request is also served, for S.",
         lambda f, r, t, p, b, lam: t + 8 * p / b
         + lam * service(f, r) ** 2 / (1 - lam * service(f, r))),
        ("the round trip (RTT) is paid once per request.",
         lambda f, r, t, p, b, lam: 8 * p / b + service(f, r) / (1 - lam * service(f, r))),
    ]
    _grade_formula("cloud latency", fn, cases, _cloud, slips,
                   "latency = RTT + 8 x payload / bandwidth + S / (1 - rho).")
    return _report(True, "the network and the queue both add to the server's compute: near "
                      "rho = 1 the queue dominates.")


# --------------------------------------------------------------------------- crossover
def _crossover(rtt_s: float, payload_bytes: float, bandwidth_bps: float, device_flops: float,
               server_flops: float) -> float:
    return edge.crossover_flops(edge.Network(rtt_s, bandwidth_bps), payload_bytes, 0.0,
                                device_flops, server_flops)


@grader
def check_crossover_flops(fn: Callable[..., Any]) -> bool:
    """Ch. 14, exercise 4: ``fn(rtt_s, payload_bytes, bandwidth_bps, device_flops,
    server_flops)`` is the model size in FLOPs at which the edge and an idle cloud server
    answer equally fast (smaller models answer first on the edge)."""
    rng = fresh_rng()
    cases = [(0.05, 150_000.0, 20e6, 1e10, 1e12), (0.2, 50_000.0, 1e6, 5e9, 2e11),
             (0.01, 1000.0, 1e9, 1e11, 1e13), (0.08, 0.0, 10e6, 2e10, 4e11),
             (rng.uniform(0.01, 0.3), float(rng.randint(10**3, 10**6)), rng.uniform(1e6, 1e8),
              rng.uniform(1e9, 5e10), rng.uniform(1e11, 1e13))]
    slips: list[Slip] = [
        ("the server computes too: divide the network time by 1/R_device - 1/R_server, "
         "not 1/R_device.",
         lambda t, p, b, d, s: (t + 8 * p / b) * d),
        ("bandwidth is in bits per second: the payload takes 8 p / B seconds.",
         lambda t, p, b, d, s: (t + p / b) / (1 / d - 1 / s)),
        ("the round trip counts as well as the transfer.",
         lambda t, p, b, d, s: (8 * p / b) / (1 / d - 1 / s)),
        ("the transfer time counts as well as the round trip.",
         lambda t, p, b, d, s: t / (1 / d - 1 / s)),
        ("solve F / R_device = overhead + F / R_server for F: F = overhead / (1/R_device - "
         "1/R_server).",
         lambda t, p, b, d, s: (t + 8 * p / b) * (s - d)),
    ]
    _grade_formula("crossover FLOPs", fn, cases, _crossover, slips,
                   "set F / R_device = RTT + 8 p / B + F / R_server and solve for F.")
    return _report(True, "below F* the device answers before the network could; a slower "
                         "network moves F* up, a faster device too.")
