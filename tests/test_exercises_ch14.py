"""Chapter 14 graders: they accept right answers and reject the slips a learner makes."""

from __future__ import annotations

import pytest
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels.exercises.ch14 import (
    check_cloud_latency,
    check_crossover_flops,
    check_int8_size,
    check_shape_accepts,
)


# --------------------------------------------------------------------------- answers
def int8_bytes(quantized, floats):  # the notebook's solution
    return quantized * 1 + floats * 4


def int8_bytes_bits(quantized, floats):  # in bits, then converted
    return (8 * quantized + 32 * floats) / 8


def accepts_shape(declared, actual):
    if len(declared) != len(actual):
        return False
    return all(not isinstance(d, int) or d == a for d, a in zip(declared, actual, strict=False))


def accepts_shape_loop(declared, actual):
    if len(declared) != len(actual):
        return False
    for d, a in zip(declared, actual, strict=False):
        if isinstance(d, int) and d != a:
            return False
    return True


def cloud(flops, server_flops, rtt, payload, bandwidth, rate):
    service = flops / server_flops
    return rtt + 8 * payload / bandwidth + service / (1 - rate * service)


def cloud_wait_plus_service(flops, server_flops, rtt, payload, bandwidth, rate):
    s = flops / server_flops
    rho = rate * s
    return rtt + payload * 8 / bandwidth + rho * s / (1 - rho) + s


def crossover(rtt, payload, bandwidth, device, server):
    return (rtt + 8 * payload / bandwidth) / (1 / device - 1 / server)


def crossover_rearranged(rtt, payload, bandwidth, device, server):
    return (rtt + 8 * payload / bandwidth) * device * server / (server - device)


@pytest.mark.parametrize("check, answer", [
    (check_int8_size, int8_bytes), (check_int8_size, int8_bytes_bits),
    (check_shape_accepts, accepts_shape), (check_shape_accepts, accepts_shape_loop),
    (check_cloud_latency, cloud), (check_cloud_latency, cloud_wait_plus_service),
    (check_crossover_flops, crossover), (check_crossover_flops, crossover_rearranged),
])
def test_accepts_right_answers(capsys, check, answer):
    accepts(capsys, check, answer)


# --------------------------------------------------------------------------- slips
def _service(f, r):
    return f / r


@pytest.mark.parametrize("check, args, expect", [
    wrong(check_int8_size, lambda q, f: 4 * q + f, expect=["swapped"], id="int8-swapped"),
    wrong(check_int8_size, lambda q, f: q + f, expect=["float weights still"],
          id="int8-all-one-byte"),
    wrong(check_int8_size, lambda q, f: 4 * (q + f), expect=["quantise anything"],
          id="int8-none"),
    wrong(check_int8_size, lambda q, f: 8 * q + 32 * f, expect=["bits"], id="int8-bits"),
    wrong(check_shape_accepts, lambda d, a: list(d) == list(a), expect=["dynamic axis"],
          id="shape-exact"),
    wrong(check_shape_accepts, lambda d, a: all(not isinstance(x, int) or x == y
                                                for x, y in zip(d, a, strict=False)),
          expect=["rank"], id="shape-no-rank"),
    wrong(check_shape_accepts, lambda d, a: len(d) == len(a), expect=["fixed"],
          id="shape-rank-only"),
    wrong(check_shape_accepts, lambda d, a: 1, expect=["bool"], id="shape-not-bool"),
    wrong(check_cloud_latency, lambda f, r, t, p, b, lam: t + 8 * p / b + f / r,
          expect=["S / (1 - rho), not S"], id="cloud-no-queue"),
    wrong(check_cloud_latency,
          lambda f, r, t, p, b, lam: t + p / b + _service(f, r) / (1 - lam * _service(f, r)),
          expect=["bits"], id="cloud-bytes"),
    wrong(check_cloud_latency,
          lambda f, r, t, p, b, lam: t + 8 * p / b + lam * _service(f, r) ** 2
          / (1 - lam * _service(f, r)), expect=["wait alone"], id="cloud-wait-only"),
    wrong(check_cloud_latency,
          lambda f, r, t, p, b, lam: 8 * p / b + _service(f, r) / (1 - lam * _service(f, r)),
          expect=["round trip"], id="cloud-no-rtt"),
    wrong(check_crossover_flops, lambda t, p, b, d, s: (t + 8 * p / b) * d,
          expect=["server computes too"], id="crossover-no-server"),
    wrong(check_crossover_flops, lambda t, p, b, d, s: (t + p / b) / (1 / d - 1 / s),
          expect=["bits"], id="crossover-bytes"),
    wrong(check_crossover_flops, lambda t, p, b, d, s: t / (1 / d - 1 / s),
          expect=["transfer"], id="crossover-no-transfer"),
    wrong(check_crossover_flops, lambda t, p, b, d, s: (t + 8 * p / b) * (s - d),
          expect=["solve"], id="crossover-algebra"),
])
def test_rejects_slips_with_a_specific_hint(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", [check_int8_size, check_shape_accepts, check_cloud_latency,
                                   check_crossover_flops])
def test_stubs_crashes_and_non_functions_are_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet"])
    rejects(capsys, check, broken)
    rejects(capsys, check, ..., expect=["no answer yet"])
    rejects(capsys, check, 42)


def test_graders_follow_the_house_docstring():
    for number, check in enumerate([check_int8_size, check_shape_accepts, check_cloud_latency,
                                    check_crossover_flops], start=1):
        assert check.__doc__.startswith(f"Ch. 14, exercise {number}: ")


def test_shape_graders_catch_fixed_as_maximum_and_short_ranks(capsys):
    import numpy as np
    import torch as _torch
    from grader_helpers import accepts, rejects

    def fixed_as_maximum(declared, actual):
        return len(declared) == len(actual) and all(
            not isinstance(d, int) or a <= d for d, a in zip(declared, actual, strict=True))

    def rank_at_most(declared, actual):
        return len(actual) <= len(declared) and all(
            not isinstance(d, int) or a == d for d, a in zip(declared, actual, strict=False))

    def numpy_answer(declared, actual):
        fixed = np.array([not isinstance(d, int) or a == d
                          for d, a in zip(declared, actual, strict=False)])
        return np.bool_(len(declared) == len(actual)) & np.all(fixed)

    def tensor_answer(declared, actual):
        return _torch.tensor(bool(numpy_answer(declared, actual)))

    rejects(capsys, check_shape_accepts, fixed_as_maximum, expect=["fixed"])
    rejects(capsys, check_shape_accepts, rank_at_most, expect=["rank"])
    accepts(capsys, check_shape_accepts, numpy_answer)
    accepts(capsys, check_shape_accepts, tensor_answer)
