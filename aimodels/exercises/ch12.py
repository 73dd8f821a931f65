"""Chapter 12 graders: queueing arithmetic, tail latency, the v2 request body, batching
and input drift."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch

from ._common import Library, NotYet, _grade_number, _report, call, fresh_rng, grader

__all__ = [
    "check_batch_throughput",
    "check_littles_law",
    "check_nearest_rank",
    "check_psi",
    "check_v2_request",
]

def _percentile_library() -> Library:
    """numpy's percentile functions, and the book's own when the serving extra is present."""
    # NumPy's public functions are C dispatchers; the Python code they run is __wrapped__.
    watched = [(getattr(f, "__wrapped__", f), name) for f, name in (
        (np.percentile, "numpy.percentile"), (np.quantile, "numpy.quantile"),
        (np.nanpercentile, "numpy.nanpercentile"), (np.nanquantile, "numpy.nanquantile"))]
    try:
        from aimodels.serving import loadtest
    except ImportError:  # httpx is in the "serve" extra; without it nobody can call it
        pass
    else:
        watched.append((loadtest.percentile, "aimodels.serving.loadtest.percentile"))
    return Library(
        task="the exercise asks you to compute the percentile yourself",
        hint="sort the samples, then take the value at rank ceil(q/100 * n) (counting from 1).",
        python=tuple(watched),
    )


@grader
def check_littles_law(answer: object) -> bool:
    """Ch. 12, exercise 1: a service completes 400 requests/s and a request spends 80 ms
    in it on average. How many requests are inside the service on average?"""
    rate, latency_ms = 400.0, 80.0
    right = rate * latency_ms / 1000.0
    return _grade_number("requests in the system", answer, right, {
        rate * latency_ms: "the latency is in milliseconds: convert it to seconds first "
                           "(80 ms = 0.08 s), so the units of L = λW cancel.",
        rate / (latency_ms / 1000.0): "Little's law multiplies: L = λ·W, not λ / W.",
        latency_ms / 1000.0 / rate: "Little's law multiplies the rate by the time: L = λ·W.",
        1000.0 / latency_ms: "that is the rate one request at a time would reach; L = λ·W "
                             "uses the measured rate, 400 requests/s.",
    })


def _rank(q: float, n: int) -> int:
    """ceil(q/100 * n) computed exactly (q as the decimal it was written as), at least 1."""
    return max(1, math.ceil(Fraction(str(q)) * n / 100))


def _unambiguous(q: float, n: int) -> bool:
    """True when the usual float formulas give the exact rank (no rounding surprise)."""
    exact = _rank(q, n)
    return all(max(1, math.ceil(x)) == exact for x in (q / 100 * n, q * n / 100, n * q / 100))


def _nearest_rank(samples: np.ndarray, q: float) -> float:
    ordered = np.sort(samples)
    return float(ordered[_rank(q, len(ordered)) - 1])


@grader
def check_nearest_rank(fn: Callable[[list[float], float], float]) -> bool:
    """Ch. 12, exercise 2: ``fn(samples, q)`` is the nearest-rank q-th percentile
    (0 < q <= 100): the smallest sample with at least q % of the samples at or below it.

    Checked on unsorted lists of several lengths, with ties, for q = 50, 90, 95, 99, 100
    and random q. ``numpy.percentile`` and ``numpy.quantile`` are not allowed.
    """
    rng = fresh_rng()
    cases = [([0.3, 0.1, 0.5, 0.2, 0.4], 50.0), ([5.0, 1.0, 3.0, 2.0], 50.0),
             ([0.01] * 7 + [0.9, 0.02, 0.5], 90.0), ([2.0, 9.0, 4.0], 100.0)]
    for n in (1, 10, 99, 100, 101, 1000):
        samples = [round(rng.lognormvariate(-3.0, 0.8), 4) for _ in range(n)]
        q_random = round(rng.uniform(1.0, 99.9), 2)
        while not _unambiguous(q_random, n):  # 0.2 % of (q, n) pairs round differently
            q_random = round(rng.uniform(1.0, 99.9), 2)
        for q in (50.0, 95.0, 99.0, q_random):
            cases.append((samples, q))
    for samples, q in cases:
        expected = _nearest_rank(np.asarray(samples), q)
        got = call(fn, list(samples), q, library=_percentile_library(),
                   hint="q is in percent (0 < q <= 100): the rank is ceil(q/100 * n).")
        label = f"{len(samples)} samples, q={q:g}"
        if isinstance(got, np.ndarray) and got.size == 1:
            got = got.item()
        if not isinstance(got, (int, float, np.floating, np.integer)) or isinstance(got, bool):
            raise NotYet(f"{label}: expected a number, got {type(got).__name__}.",
                         "return one sample value (a float).")
        if float(got) == expected:
            continue
        ordered = sorted(samples)
        rank = _rank(q, len(ordered))
        if float(got) not in ordered:
            hint = ("your answer is not one of the samples: the nearest-rank percentile "
                    "picks a sample, it never interpolates between two.")
        elif float(got) in (ordered[min(len(ordered) - 1, rank)], ordered[max(0, rank - 2)]):
            hint = ("off by one rank: the rank is ceil(q/100 * n) counting from 1, so the "
                    "index is that minus one.")
        elif float(got) == samples[rank - 1] and samples != ordered:
            hint = "sort the samples first: the rank counts from the smallest sample."
        else:
            hint = "the rank is ceil(q/100 * n) counting from 1 in the sorted samples."
        raise NotYet(f"{label}: expected {expected:g}, got {float(got):g}.", hint)
    return _report(True, "your percentile picks the nearest-rank sample, ties and all.")


_V2_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
             np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


def _flatten(data: object) -> list:
    if isinstance(data, (list, tuple)):
        return [x for item in data for x in _flatten(item)]
    return [data]


@grader
def check_v2_request(fn: Callable[[np.ndarray], dict]) -> bool:
    """Ch. 12, exercise 3: ``fn(images)`` turns an array of shape [n, 64] (float32 pixels)
    into the JSON body of an Open Inference Protocol (KServe v2) infer request for the
    digits model, whose input is called "input" (FP32, shape [-1, 64]).

    The body must be a dict that ``json.dumps`` accepts, with one input whose name,
    shape, datatype and row-major data (flat or nested lists) match the array.
    """
    import json

    rng = fresh_rng()
    for n in (1, 3, rng.randint(2, 9)):
        images = np.asarray([[rng.randint(0, 16) for _ in range(64)] for _ in range(n)],
                            dtype=np.float32) + np.float32(0.5) * (n == 3)
        body = call(fn, images.copy())
        label = f"{n} image(s)"
        if not isinstance(body, dict):
            raise NotYet(f"{label}: expected a dict, got {type(body).__name__}.",
                         "return the request body as a Python dict; httpx sends it as JSON.")
        try:  # what the server receives: tuples become lists on the wire
            body = json.loads(json.dumps(body, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise NotYet(f"{label}: the body is not valid JSON ({exc}).",
                         "NumPy arrays and numbers are not JSON: use .tolist().") from None
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise NotYet(f"{label}: expected body['inputs'] to be a list with one tensor, got "
                         f"{inputs!r:.60}.", 'write {"inputs": [{"name": ..., "shape": ..., '
                         '"datatype": ..., "data": ...}]}.')
        tensor = inputs[0]
        if tensor.get("name") != "input":
            raise NotYet(f"{label}: the input is called {tensor.get('name')!r}.",
                         'the model\'s metadata names its input "input".')
        if tensor.get("datatype") != "FP32":
            raise NotYet(f"{label}: datatype {tensor.get('datatype')!r}.",
                         'the model\'s metadata says "FP32"; the protocol spells datatypes '
                         'like "FP32" and "INT64", not NumPy names such as "float32".')
        shape = tensor.get("shape")
        if isinstance(shape, list) and any(not isinstance(d, int) or isinstance(d, bool)
                                           for d in shape):
            raise NotYet(f"{label}: shape {shape!r} holds non-integers.",
                         "each dimension is a JSON integer: use list(images.shape).")
        if shape != [n, 64]:
            raise NotYet(f"{label}: shape {tensor.get('shape')!r}, expected [{n}, 64].",
                         "the shape is the real batch shape [n, 64]; -1 appears only in the "
                         "model's metadata.")
        flat = _flatten(tensor.get("data"))
        odd = [x for x in flat if not isinstance(x, (int, float)) or isinstance(x, bool)]
        if odd:
            raise NotYet(f"{label}: the data holds {type(odd[0]).__name__} values such as "
                         f"{odd[0]!r:.20}, not numbers.",
                         "FP32 data is a list of JSON numbers: images.reshape(-1).tolist().")
        if len(flat) != n * 64 or not np.allclose(np.asarray(flat, dtype=np.float64),
                                                   images.reshape(-1)):
            raise NotYet(f"{label}: the data does not hold the {n * 64} pixel values in "
                         "row-major order.", "send images.reshape(-1).tolist() (or .tolist()).")
    return _report(True, "your body is a valid v2 infer request for the digits model.")


@grader
def check_batch_throughput(answer: object) -> bool:
    """Ch. 12, exercise 4: one model call on a batch of b requests takes 6 ms + 0.5 ms × b.
    What is the most requests per second one model thread can serve with max_batch_size=16?
    """
    fixed_ms, per_item_ms, batch = 6.0, 0.5, 16
    right = batch / ((fixed_ms + per_item_ms * batch) / 1000.0)
    one = 1 / ((fixed_ms + per_item_ms) / 1000.0)
    return _grade_number("requests/s", answer, right, {
        one: "that is the ceiling without batching (b = 1). With b = 16, one call serves 16 "
             "requests.",
        batch / (fixed_ms / 1000.0): "the call's time grows with the batch: add 0.5 ms for "
                                     "each of the 16 requests.",
        batch / (per_item_ms * batch / 1000.0): "each call also pays the fixed 6 ms.",
        1 / ((fixed_ms + per_item_ms * batch) / 1000.0): "one call answers all 16 requests: "
                                                          "multiply the calls/s by 16.",
        batch / (fixed_ms + per_item_ms * batch): "the times are in milliseconds: divide by "
                                                  "1000 to get seconds.",
    })


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@grader
def check_psi(fn: Callable[[np.ndarray, np.ndarray], float]) -> bool:
    """Ch. 12, exercise 5: ``fn(expected, actual)`` is the population stability index of
    two histograms given as fractions per bin (each sums to 1, no zero bin):
    PSI = Σ (actual − expected) · ln(actual / expected)."""
    rng = fresh_rng()
    cases = [(np.full(4, 0.25), np.full(4, 0.25)),
             (np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1]))]
    for bins in (2, 5, 10, 10):
        e = np.array([rng.uniform(0.2, 1.0) for _ in range(bins)])
        a = np.array([rng.uniform(0.05, 1.0) for _ in range(bins)])
        cases.append((e / e.sum(), a / a.sum()))
    for expected, actual in cases:
        want = _psi(expected, actual)
        got = call(fn, expected.copy(), actual.copy())
        label = f"{len(expected)} bins"
        if (isinstance(got, torch.Tensor) and got.numel() == 1) or (
                isinstance(got, (np.ndarray, np.generic)) and got.size == 1):
            got = got.item()  # a 0-d array or tensor is one number too
        if not isinstance(got, (int, float, np.floating)) or isinstance(got, bool):
            raise NotYet(f"{label}: expected a number, got {type(got).__name__}.",
                         "return the sum as one float.")
        if math.isclose(float(got), want, rel_tol=1e-6, abs_tol=1e-9):
            continue
        kl = float(np.sum(actual * np.log(actual / expected)))
        if want and math.isclose(float(got), -want, rel_tol=1e-6):
            hint = "the sign: each term is (actual − expected) · ln(actual / expected) ≥ 0."
        elif math.isclose(float(got), kl, rel_tol=1e-6):
            hint = ("that is one KL divergence; PSI is the symmetric sum KL(a‖e) + KL(e‖a) "
                    "= Σ (a − e) ln(a / e).")
        elif any(math.isclose(float(got), float(np.sum((actual - expected) * log(
                actual / expected))), rel_tol=1e-6) for log in (np.log10, np.log2)):
            hint = "use the natural logarithm (np.log), not log10 or log2."
        else:
            hint = "sum (actual − expected) · ln(actual / expected) over the bins."
        raise NotYet(f"{label}: expected {want:.6g}, got {float(got):.6g}.", hint)
    return _report(True, "your PSI matches, and it is 0 for identical histograms.")
