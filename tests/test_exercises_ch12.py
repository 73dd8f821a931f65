"""Chapter 12 graders: they accept a right answer and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels import exercises as ex

L = 400 * 0.080  # Little's law: 32 requests
RPS = 16 / 0.014  # 16 requests per 6 + 8 ms call


# --------------------------------------------------------------------------- answers
def nearest_rank(samples, q):  # the notebook's solution
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def interpolated(samples, q):  # numpy's default: linear interpolation, written out
    ordered = sorted(samples)
    pos = q / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def unsorted_rank(samples, q):
    return samples[max(1, math.ceil(q / 100 * len(samples))) - 1]


def rank_without_minus_one(samples, q):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)))]


def floor_rank(samples, q):
    ordered = sorted(samples)
    return ordered[max(0, math.floor(q / 100 * len(ordered)) - 1)]


def numpy_percentile(samples, q):
    return float(np.percentile(samples, q, method="inverted_cdf"))


def v2_body(images):
    return {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.reshape(-1).tolist()}]}


def v2_nested(images):
    return {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.tolist()}]}


def psi(expected, actual):
    return float(np.sum((actual - expected) * np.log(actual / expected)))


WRONG = [
    wrong(ex.check_littles_law, 400 * 80, expect=["milliseconds"], id="little-ms"),
    wrong(ex.check_littles_law, 400 / 0.08, expect=["multiplies"], id="little-divides"),
    wrong(ex.check_littles_law, 12.5, expect=["measured rate"], id="little-one-at-a-time"),
    wrong(ex.check_nearest_rank, interpolated, expect=["never interpolates"], id="rank-interpolates"),
    wrong(ex.check_nearest_rank, unsorted_rank, expect=["sort"], id="rank-unsorted"),
    wrong(ex.check_nearest_rank, rank_without_minus_one, expect=["off by one"], id="rank-off-by-one"),
    wrong(ex.check_nearest_rank, floor_rank, expect=["expected"], id="rank-floor"),
    wrong(ex.check_nearest_rank, numpy_percentile, expect=["calls numpy.percentile"], id="rank-numpy"),
    wrong(ex.check_nearest_rank, lambda s, q: sorted(s)[:1], expect=["expected a number"], id="rank-list"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{"name": "input", "shape": list(im.shape), "datatype": "FP32", "data": im}]}, expect=["not valid JSON", ".tolist()"], id="v2-numpy-array"),
    wrong(ex.check_v2_request, lambda im: {**v2_body(im), "inputs": [{**v2_body(im)["inputs"][0], "datatype": "float32"}]}, expect=['"FP32"'], id="v2-numpy-dtype-name"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "shape": [-1, 64]}]}, expect=["real batch shape"], id="v2-minus-one"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "name": "x"}]}, expect=['"input"'], id="v2-name"),
    wrong(ex.check_v2_request, lambda im: v2_body(im)["inputs"][0], expect=["body['inputs']"], id="v2-no-list"),
    wrong(ex.check_v2_request, lambda im: v2_body(im.T.copy()), expect=["shape"], id="v2-transposed"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "data": im.T.reshape(-1).tolist()}]}, expect=["row-major"], id="v2-column-major"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "data": np.round(im).reshape(-1).tolist()}]}, expect=["row-major"], id="v2-rounded-data"),
    wrong(ex.check_batch_throughput, 1 / 0.0065, expect=["without batching"], id="batch-b1"),
    wrong(ex.check_batch_throughput, 16 / 0.006, expect=["grows with the batch"], id="batch-no-per-item"),
    wrong(ex.check_batch_throughput, 1 / 0.014, expect=["multiply the calls/s by 16"], id="batch-calls-per-s"),
    wrong(ex.check_batch_throughput, 16 / 14, expect=["milliseconds"], id="batch-ms"),
    wrong(ex.check_psi, lambda e, a: -psi(e, a), expect=["the sign"], id="psi-sign"),
    wrong(ex.check_psi, lambda e, a: float(np.sum(a * np.log(a / e))), expect=["one KL"], id="psi-kl"),
    wrong(ex.check_psi, lambda e, a: float(np.sum((a - e) * np.log10(a / e))), expect=["log10"], id="psi-log10"),
    wrong(ex.check_psi, lambda e, a: float(np.sum(np.abs(a - e))), expect=["expected"], id="psi-l1"),
    wrong(ex.check_psi, lambda e, a: (a - e) * np.log(a / e), expect=["expected a number"], id="psi-per-bin"),
    wrong(ex.check_psi, lambda e, a: float(np.sum((a - e) * np.log2(a / e))), expect=["log2"], id="psi-log2"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "shape": [float(d) for d in im.shape]}]}, expect=["non-integers"], id="v2-float-shape"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "data": [str(x) for x in im.reshape(-1).tolist()]}]}, expect=["not numbers"], id="v2-strings"),
    wrong(ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "datatype": "FP64"}]}, expect=["metadata says"], id="v2-fp64"),
    wrong(ex.check_nearest_rank, lambda s, q: sorted(s)[math.ceil(q * len(s)) - 1], expect=["percent"], id="rank-q-as-fraction"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_littles_law, L)
    accepts(capsys, ex.check_batch_throughput, RPS)
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_nearest_rank, nearest_rank)
        accepts(capsys, ex.check_nearest_rank, lambda s, q: np.sort(s)[max(1, math.ceil(q / 100 * len(s))) - 1])
        accepts(capsys, ex.check_v2_request, v2_body)
        accepts(capsys, ex.check_v2_request, v2_nested)
        accepts(capsys, ex.check_psi, psi)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_littles_law, answer, expect=["write your solution first"])
    rejects(capsys, ex.check_batch_throughput, answer, expect=["write your solution first"])


@pytest.mark.parametrize("check", [ex.check_nearest_rank, ex.check_v2_request, ex.check_psi])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])


def test_every_chapter_12_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch12.__all__) and min(counts.values()) >= 2


def float_rank(samples, q):  # ceil(q * n / 100): the same rank, rounded in another order
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered) / 100)) - 1]


def test_float_rounding_never_rejects_a_right_percentile(capsys):
    """Random q are drawn where every usual float formula gives the exact rank."""
    from aimodels.serving.loadtest import percentile

    for _ in range(40):
        accepts(capsys, ex.check_nearest_rank, nearest_rank)
        accepts(capsys, ex.check_nearest_rank, float_rank)
    rejects(capsys, ex.check_nearest_rank, percentile, expect=["calls aimodels.serving.loadtest.percentile"])


def test_numbers_as_tensors_and_shapes_as_tuples_are_fine(capsys):
    import torch

    accepts(capsys, ex.check_psi, lambda e, a: torch.tensor(psi(e, a)))
    accepts(capsys, ex.check_v2_request, lambda im: {"inputs": [{**v2_body(im)["inputs"][0], "shape": im.shape}]})
