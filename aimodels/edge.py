r"""Cloud or edge? A latency and cost model, and what a runtime costs to install (Chapter 14).

A prediction can be computed on the user's device (the *edge*) or on a server (the
*cloud*). On the device the latency is the compute alone,

.. math:: t_\text{edge} = \frac{F}{R_\text{device}},

for a model of :math:`F` floating-point operations per request on a device that
sustains :math:`R_\text{device}` FLOP/s. In the cloud the request crosses the network
twice and may wait in the server's queue:

.. math:: t_\text{cloud} = \text{RTT} + \frac{8\,(b_\text{up} + b_\text{down})}{B}
          + \underbrace{\frac{S}{1 - \rho}}_{\text{queue + service}},
          \qquad S = \frac{F}{R_\text{server}},\quad \rho = \lambda S,

with the round-trip time RTT (s), payload bytes :math:`b` each way, bandwidth :math:`B`
in **bits** per second (networks are quoted in bits), and the server modelled as an
M/M/1 queue (chapter 12): requests arrive at rate :math:`\lambda` per second, service
takes :math:`S` on average, and at utilisation :math:`\rho < 1` the mean time in the
system is :math:`S/(1-\rho)`, of which :math:`\rho S/(1-\rho)` is waiting. (By Little's
law the mean number in the system is then :math:`\rho/(1-\rho)`.) Without load
(:math:`\lambda = 0`) the edge wins for every model smaller than

.. math:: F^* = \frac{\text{RTT} + 8 (b_\text{up} + b_\text{down})/B}
                     {1/R_\text{device} - 1/R_\text{server}}.

Cost: a server rented at :math:`p` per hour and busy a fraction :math:`\rho` of the
time costs :math:`p\,S / (3600\,\rho)` per request; the edge costs the provider
nothing per request (the user's battery pays).

The second half measures what a runtime costs on a device: the bytes of the installed
packages it needs (:func:`installed_bytes`) and, for a program run in a subprocess,
the time from process start to its first prediction and its peak memory
(:func:`measure_process`). The program reports its own peak memory (Linux's ``VmHWM``,
the high-water mark of its own address space), so each runtime is measured alone.
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` would not do here: Linux carries the peak
across ``exec``, so a child forked from a large parent (a notebook with PyTorch and
data loaded) inherits the parent's peak.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

__all__ = [
    "Network",
    "cloud_cost_per_request",
    "cloud_latency",
    "crossover_flops",
    "edge_latency",
    "installed_bytes",
    "measure_process",
    "mm1_time_in_system",
    "transfer_time",
]


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Network:
    """A network link: round-trip time in seconds and bandwidth in bits per second."""

    rtt_s: float
    bandwidth_bps: float

    def __post_init__(self) -> None:
        _positive("rtt_s", self.rtt_s, allow_zero=True)
        _positive("bandwidth_bps", self.bandwidth_bps)


def transfer_time(payload_bytes: float, bandwidth_bps: float) -> float:
    """Seconds to send ``payload_bytes`` over a link of ``bandwidth_bps`` bits per second."""
    return 8.0 * _positive("payload_bytes", payload_bytes, True) / _positive("bandwidth_bps",
                                                                             bandwidth_bps)


def mm1_time_in_system(service_s: float, arrival_rate: float = 0.0) -> float:
    """Mean time a request spends in an M/M/1 queue: waiting plus service, ``S / (1 - ρ)``.

    ``ρ = arrival_rate × service_s`` must stay below 1; at or above it the queue grows
    without bound and the function raises.
    """
    service_s = _positive("service_s", service_s, allow_zero=True)
    rho = _positive("arrival_rate", arrival_rate, allow_zero=True) * service_s
    if rho >= 1:
        raise ValueError(f"utilisation rho = arrival_rate x service = {rho:.3g} >= 1: the "
                         f"queue grows without bound (add servers or lower the rate)")
    return service_s / (1.0 - rho)


def edge_latency(flops: float, device_flops: float) -> float:
    """Seconds to run a model of ``flops`` FLOPs on a device of ``device_flops`` FLOP/s."""
    return _positive("flops", flops, True) / _positive("device_flops", device_flops)


def cloud_latency(flops: float, server_flops: float, network: Network, request_bytes: float,
                  response_bytes: float = 0.0, arrival_rate: float = 0.0) -> float:
    """Round trip + transfer both ways + M/M/1 time in the server (see the module docstring)."""
    if not isinstance(network, Network):
        raise TypeError(f"network must be an aimodels.edge.Network, "
                        f"got {type(network).__name__}")
    service = _positive("flops", flops, True) / _positive("server_flops", server_flops)
    wire = transfer_time(request_bytes, network.bandwidth_bps) + transfer_time(
        response_bytes, network.bandwidth_bps)
    return network.rtt_s + wire + mm1_time_in_system(service, arrival_rate)


def crossover_flops(network: Network, request_bytes: float, response_bytes: float,
                    device_flops: float, server_flops: float) -> float:
    """The model size (FLOPs per request) below which the edge answers first, at no load.

    ``F* = (RTT + 8 (b_up + b_down) / B) / (1/R_device - 1/R_server)``; infinite when the
    device is at least as fast as the server.
    """
    if not isinstance(network, Network):
        raise TypeError(f"network must be an aimodels.edge.Network, "
                        f"got {type(network).__name__}")
    overhead = network.rtt_s + transfer_time(request_bytes + response_bytes,
                                             network.bandwidth_bps)
    gap = 1.0 / _positive("device_flops", device_flops) - 1.0 / _positive("server_flops",
                                                                        server_flops)
    return math.inf if gap <= 0 else overhead / gap


def cloud_cost_per_request(price_per_hour: float, service_s: float,
                           utilisation: float = 1.0) -> float:
    """What one request costs on a server rented by the hour: ``p × S / (3600 × ρ)``.

    A server busy a fraction ``utilisation`` of the time is paid for the idle rest too.
    """
    utilisation = _positive("utilisation", utilisation)
    if utilisation > 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation!r}")
    price = _positive("price_per_hour", price_per_hour, True)
    return price * _positive("service_s", service_s, True) / (3600.0 * utilisation)


# --------------------------------------------------------------------------- footprint
def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of the distributions ``dist`` requires, extras and unmet markers left out."""
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        names.append(requirement.name)
    return names


def installed_bytes(names: Sequence[str] | str, with_requirements: bool = False) -> int:
    """Bytes on disk of the installed distributions ``names`` (summed over their files).

    With ``with_requirements`` the distributions they require, recursively, are counted
    too, each once (those that are not installed are skipped).
    """
    queue = [names] if isinstance(names, str) else list(names)
    seen: set[str] = set()
    total = 0
    while queue:
        name = queue.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if key in {n.lower().replace("_", "-") for n in
                       ([names] if isinstance(names, str) else names)}:
                raise
            continue
        for file in dist.files or []:
            located = file.locate()
            if located.is_file():
                total += located.stat().st_size
        if with_requirements:
            queue.extend(_requirement_names(dist))
    return total


def measure_process(argv: Sequence[str], timeout_s: float = 120.0) -> dict:
    """Run ``argv`` (a program that prints one JSON report) and time its cold start.

    The program must print a JSON object with ``first_prediction_unix`` (the wall-clock
    time of its first prediction) and ``peak_rss_bytes``, as :mod:`aimodels.edge_runner`
    and ``aimodels.export.TORCH_RUNNER`` do. Returns that report plus
    ``cold_start_s``, from just before the process was started to its first prediction,
    and ``wall_s``, to its exit.
    """
    start = time.time()
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    wall = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed with exit code {done.returncode}: "
                           f"{done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["cold_start_s"] = report["first_prediction_unix"] - start
    report["wall_s"] = wall
    return report


def python() -> str:
    """The interpreter running this code, for starting runners with the same packages."""
    return sys.executable
