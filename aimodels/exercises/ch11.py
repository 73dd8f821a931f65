"""Chapter 11 graders: the scale and zero point of affine quantisation, symmetric
per-channel quantisation, the distillation loss and the size of a structurally pruned MLP."""

from __future__ import annotations

import importlib
import math
import numbers
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from aimodels import scaling
from aimodels.compress import prune, quant

from ._common import (
    STUB_HINT,
    Library,
    NotYet,
    _report,
    _shape,
    _whole_number,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

# ``aimodels.compress.distill`` is the module: the package's ``distill`` is its training loop.
distill = importlib.import_module("aimodels.compress.distill")

__all__ = [
    "check_kd_loss",
    "check_per_channel_quantize",
    "check_pruned_size",
    "check_scale_zero_point",
]

Slip = tuple[str, Callable[..., Any]]


# --------------------------------------------------------------------------- shared
def _real(got: object) -> float | None:
    """The answer as a finite float (int, float, one-element tensor), else None."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_complex():
        got = got.detach().item()
    if isinstance(got, numbers.Real) and not isinstance(got, bool):
        value = float(got)
        return value if math.isfinite(value) else None
    return None


def _fresh(case: tuple) -> tuple:
    """The case with its lists and tensors copied, so that the learner cannot change ours."""
    return tuple(list(arg) if isinstance(arg, list) else
                 arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in case)


def _call_on(label: str, fn: Callable[..., Any], case: tuple, *, hint: str,
             library: Library | None = None) -> Any:
    """``call`` on a copy of the case, with the case named when the learner's code raises."""
    try:
        return call(fn, *_fresh(case), library=library, hint=hint)
    except NotYet as crash:
        if crash.hint == STUB_HINT:
            raise
        raise NotYet(f"{label}: {crash.message}", crash.hint) from None


def _pair(label: str, got: object, names: str, hint: str) -> tuple[Any, Any]:
    """The learner's two results, or ``NotYet`` that says what arrived instead."""
    if isinstance(got, (tuple, list)) and len(got) == 2:
        return got[0], got[1]
    what = (f"{len(got)} items" if isinstance(got, (tuple, list)) else _shape(got)
            if isinstance(got, torch.Tensor) else f"{type(got).__name__} {got!r:.40}")
    raise NotYet(f"{label}: expected a tuple {names}, got {what}.", hint)


def _named_slip(fn: Callable[..., Any], cases: Sequence[tuple], answers: list[Any],
                slips: Sequence[Slip], same: Callable[[Any, Any], bool],
                library: Library | None = None) -> str | None:
    """The hint of the first slip that gives the learner's answer on every case answered.

    ``answers`` are the learner's answers to the first cases (the last one wrong); the
    learner's code is run on the remaining cases too, until it raises.
    """
    answered = list(zip(cases, answers, strict=False))
    for later in cases[len(answers):]:
        try:
            answered.append((later, call(fn, *_fresh(later), library=library)))
        except NotYet:
            break

    def fits(slip: Callable[..., Any], case: tuple, answer: Any) -> bool:
        try:
            return bool(same(answer, slip(*case)))
        except Exception:  # a slip that cannot handle the case, or an odd answer
            return False

    return next((hint for hint, slip in slips
                 if all(fits(slip, case, answer) for case, answer in answered)), None)


# --------------------------------------------------------------------------- scale and zero point
def _scale_zero(x_min: float, x_max: float, bits: int) -> tuple[float, int]:
    """Affine quantisation to [0, 2^bits - 1], as ``quant.quantize(..., symmetric=False)``."""
    qmax = 2**bits - 1
    low, high = min(x_min, 0.0), max(x_max, 0.0)
    scale = (high - low) / qmax
    if not scale > 0:  # an empty range, [0, 0]: any positive scale maps 0 to code 0
        return 1.0, 0
    return scale, min(max(round(-low / scale), 0), qmax)


def _affine_slip(*, levels: int = -1, widen: bool = True, rounding: Callable | None = round,
                 clamp: bool = True, sign: int = -1) -> Callable[..., tuple[float, float]]:
    """The scale and zero point with one mistake: ``levels`` added to 2**bits, no
    widening to 0, another ``rounding`` (None: none), no clamping, the sign of x_min."""

    def slip(x_min: float, x_max: float, bits: int) -> tuple[float, float]:
        qmax = 2**bits - 1
        low, high = (min(x_min, 0.0), max(x_max, 0.0)) if widen else (x_min, x_max)
        if high == low:  # the empty range, whichever way it was reached
            return 1.0, 0
        scale = (high - low) / (2**bits + levels)
        zero = sign * low / scale
        zero = zero if rounding is None else rounding(zero)
        return scale, min(max(zero, 0), qmax) if clamp else zero

    return slip


_WIDEN_HINT = ("first widen the range to include 0: x_min = min(x_min, 0), x_max = "
               "max(x_max, 0). Then the real 0 is exactly code z, so zero padding and ReLU "
               "zeros are stored without error.")
_NEAREST_HINT = ("round to the nearest code with round(-x_min / scale): int() and floor round "
                 "down, ceil rounds up.")
_SIGN_HINT = ("z = round(-x_min / scale): x_min <= 0 after widening, so -x_min / scale >= 0, "
              "and the real 0 lands on code z (x = (q - z) * scale).")
_AFFINE_HINT = ("widen [x_min, x_max] to include 0, then scale = (x_max - x_min) / (2**bits - "
                "1) and zero_point = round(-x_min / scale), clamped to [0, 2**bits - 1].")
_ZERO_RANGE_HINT = ("when x_min = x_max = 0 the scale would be 0 (and -x_min / scale 0 / 0): "
                    "return scale 1.0 and zero_point 0 for that empty range.")

_AFFINE_SLIPS: list[Slip] = [
    ("return (scale, zero_point), in that order.",
     lambda x_min, x_max, bits: _scale_zero(x_min, x_max, bits)[::-1]),
    ("b bits give the 2**b codes 0 to 2**b - 1, so 2**b - 1 steps span the range: divide by "
     "2**bits - 1, not 2**bits.", _affine_slip(levels=0)),
    (_WIDEN_HINT, _affine_slip(widen=False)),
    (_WIDEN_HINT, _affine_slip(widen=False, clamp=False)),
    ("the zero point is a code, a whole number: round(-x_min / scale).",
     _affine_slip(rounding=None)),
    (_NEAREST_HINT, _affine_slip(rounding=int)),
    (_NEAREST_HINT, _affine_slip(rounding=math.floor)),
    (_NEAREST_HINT, _affine_slip(rounding=math.ceil)),
    (_SIGN_HINT, _affine_slip(sign=1)),
    (_SIGN_HINT, _affine_slip(sign=1, clamp=False)),
    (_SIGN_HINT, _affine_slip(sign=1, widen=False)),
]


def _tie_free(x_min: float, x_max: float, bits: int) -> bool:
    """True when -x_min / scale is not within 1e-6 of a half: every rounding agrees."""
    low, high = min(x_min, 0.0), max(x_max, 0.0)
    if high == low:
        return True
    ratio = -low / ((high - low) / (2**bits - 1))
    return abs(ratio - math.floor(ratio) - 0.5) > 1e-6


def _catches(cases: Sequence[tuple], slips: Sequence[Slip], reference: Callable[..., Any],
             same: Callable[[Any, Any], bool]) -> bool:
    """True when every slip gives a wrong answer on at least one of the cases."""

    def differs(slip: Callable[..., Any], case: tuple) -> bool:
        try:
            return not same(slip(*case), reference(*case))
        except Exception:  # a crash is caught too
            return True

    return all(any(differs(slip, case) for case in cases) for _, slip in slips)


def _same_affine(got: Any, want: tuple[float, float]) -> bool:
    scale, zero = _real(got[0]), _real(got[1])
    return (scale is not None and zero is not None
            and math.isclose(scale, want[0], rel_tol=1e-9)
            and math.isclose(zero, want[1], rel_tol=0.0, abs_tol=1e-9))


def _random_affine_cases(rng: random.Random) -> list[tuple[float, float, int]]:
    """Eight ranges with 4 decimals, 2 to 8 bits, no zero point near a rounding tie: ranges
    that straddle 0, lie above it and below it. Drawn again until every slip shows."""
    while True:
        cases: list[tuple[float, float, int]] = []
        kinds = ["straddle"] * 4 + ["positive", "negative", "lopsided", "tiny"]
        for kind in kinds:
            while True:
                bits = rng.randint(2, 8)
                if kind == "positive":
                    x_min = round(rng.uniform(0.01, 3.0), 4)
                    x_max = round(x_min + rng.uniform(0.1, 5.0), 4)
                elif kind == "negative":
                    x_max = round(-rng.uniform(0.01, 3.0), 4)
                    x_min = round(x_max - rng.uniform(0.1, 5.0), 4)
                elif kind == "lopsided":  # a small negative tail, as after a GELU
                    x_min, x_max = round(-rng.uniform(0.05, 0.2), 4), round(rng.uniform(2, 9), 4)
                elif kind == "tiny":
                    x_min = round(-rng.uniform(1e-3, 1e-2), 6)
                    x_max = round(rng.uniform(1e-3, 1e-2), 6)
                else:
                    x_min, x_max = round(-rng.uniform(0.1, 10), 4), round(rng.uniform(0.1, 10), 4)
                if _tie_free(x_min, x_max, bits):
                    break
            cases.append((x_min, x_max, bits))
        rng.shuffle(cases)
        if _catches(cases, _AFFINE_SLIPS, _scale_zero, _same_affine):
            return cases


@grader
def check_scale_zero_point(fn: Callable[[float, float, int], tuple[float, int]]) -> bool:
    """Ch. 11, exercise 1: ``fn(x_min, x_max, bits)`` returns ``(scale, zero_point)`` of
    asymmetric (affine) quantisation to the codes [0, 2^bits - 1]: the range widened to
    include 0, scale = (x_max - x_min) / (2^bits - 1), zero_point = round(-x_min / scale)
    clamped to the codes; scale 1.0 and zero_point 0 when the range is [0, 0].

    The convention of ``aimodels.compress.quant.quantize(x, bits, symmetric=False)``.
    Checked on fixed ranges (one-sided, empty, 2 to 8 bits) and on random ones that change
    at every call; the scale to a relative 1e-9, the zero point exactly.
    """
    cases: list[tuple[float, float, int]] = [
        (-1.0, 3.0, 8), (0.5, 2.0, 8), (-3.0, -0.5, 8), (-0.3, 1.0, 4), (-2.0, 6.0, 2),
        (0.0, 0.0, 8), (1.5, 1.5, 8), (-0.05, 6.0, 8)]
    cases += _random_affine_cases(fresh_rng())
    answers: list[Any] = []
    for x_min, x_max, bits in cases:
        label = f"x_min={x_min}, x_max={x_max}, bits={bits}"
        empty = min(x_min, 0.0) == max(x_max, 0.0)
        got = _call_on(label, fn, (x_min, x_max, bits),
                       hint=_ZERO_RANGE_HINT if empty else _WIDEN_HINT if x_min == x_max
                       else "run it by hand on this range to see where it fails.")
        answers.append(got)
        scale, zero = _pair(label, got, "(scale, zero_point)",
                            "return two values: return scale, zero_point.")
        want_scale, want_zero = _scale_zero(x_min, x_max, bits)
        got_scale, got_zero = _real(scale), _real(zero)
        if got_scale is None:
            raise NotYet(f"{label}: the scale should be a finite number, got "
                         f"{type(scale).__name__} {scale!r:.40}.",
                         _ZERO_RANGE_HINT if empty else "return the scale as a float.")
        if got_zero is None:
            raise NotYet(f"{label}: the zero point should be a whole number, got "
                         f"{type(zero).__name__} {zero!r:.40}.",
                         _ZERO_RANGE_HINT if empty else "return the zero point as an int.")
        if math.isclose(got_scale, want_scale, rel_tol=1e-9) and got_zero == want_zero:
            continue
        hint = _named_slip(fn, cases, answers, _AFFINE_SLIPS, _same_affine)
        if hint is None:
            hint = (_ZERO_RANGE_HINT if empty else
                    "the zero point is a code, a whole number: round(-x_min / scale)."
                    if not got_zero.is_integer() else _AFFINE_HINT)
        shown = f"({got_scale:.6g}, {got_zero:g})"
        raise NotYet(f"{label}: got {shown}, expected ({want_scale:.6g}, {want_zero}).", hint)
    relu_scale, relu_zero = _scale_zero(0.0, 6.0, 8)
    return _report(True, f"all {len(cases)} ranges right. The real 0 is exactly code z, so "
                         f"zeros (padding, ReLU) are stored without error. For ReLU6 outputs in "
                         f"[0, 6], 8 bits give scale {relu_scale:.4f} and z = {relu_zero}; "
                         f"symmetric int8 would step {6 / 127:.4f}, twice as coarse, because "
                         "half its codes are for negatives that never occur.")


# --------------------------------------------------------------------------- per channel
_QUANT_LIBRARY = Library(
    task="the exercise asks you to write the quantisation yourself",
    hint="with Q = 2**(bits - 1) - 1: scale = w.abs().amax(dim=1, keepdim=True) / Q, then "
         "q = torch.round(w / scale).clamp(-Q, Q).to(torch.int8).",
    torch={"quantize_per_channel": "torch.quantize_per_channel",
           "quantize_per_tensor": "torch.quantize_per_tensor",
           "fake_quantize_per_channel_affine": "torch.fake_quantize_per_channel_affine"},
    python=((quant, "aimodels.compress.quant"),),
)

_PER_ROW_HINT = ("one scale per output channel, i.e. per row of w [out, in]: "
                 "w.abs().amax(dim=1, keepdim=True), shape [out, 1].")
_ZERO_ROW_HINT = ("a row of zeros has max|w| = 0, so its scale would be 0 and w / scale 0 / 0: "
                  "give it scale 1.0 (any positive scale is accepted, since all its codes are "
                  "0), e.g. torch.where(scale > 0, scale, torch.ones_like(scale)).")
_AFFINE_SCALE_HINT = ("that is an affine scale, a range over 2**bits - 1 steps; the symmetric "
                      "codes -(2**(bits-1) - 1) to 2**(bits-1) - 1 leave one code out, so "
                      "scale = max|w[i]| / (2**(bits - 1) - 1).")
_ROUND_HINT = ("round to the nearest code with torch.round(w / scale): floor and trunc (and "
               ".to(torch.int8) on its own, which truncates) move codes by up to a whole step.")


def _per_channel_cases(rng: random.Random) -> list[tuple[tuple[int, int], int, torch.dtype, str]]:
    """(shape, bits, dtype, kind): out != in except once; a zero row; an outlier row."""
    f64 = torch.float64
    cases = [((4, 6), 8, f64, "plain"), ((6, 3), 4, f64, "zero row"),
             ((5, 5), 8, f64, "outlier"), ((3, 7), 2, f64, "plain")]
    for kind in ("plain", "outlier", "zero row", "plain"):
        out = rng.randint(2, 24)
        cases.append(((out, rng.choice([n for n in range(1, 33) if n != out])),
                      rng.randint(2, 8), f64, kind))
    cases.append(((rng.randint(2, 16), rng.randint(17, 64)), rng.choice((4, 8)), torch.float32,
                  "outlier"))
    return cases


def _weight(shape: tuple[int, int], dtype: torch.dtype, kind: str,
            g: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    w *= torch.rand(shape[0], 1, generator=g, dtype=torch.float64) * 2 + 0.1  # rows differ
    row = int(torch.randint(shape[0], (1,), generator=g))
    if kind == "outlier":
        w[row] *= 30
    elif kind == "zero row":
        w[row] = 0
    return w.to(dtype)


def _near_ties(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where w / scale is within 1e-5 of a half: a code may round either way there."""
    ratio = (w.double() / scale.double()).abs()
    return (ratio - ratio.floor() - 0.5).abs() < 1e-5


def _codes_match(got: torch.Tensor, want: torch.Tensor, ties: torch.Tensor) -> bool:
    if got.is_complex() or not bool(torch.isfinite(got.double()).all()):
        return False
    diff = (got.double() - want.double()).abs()
    return bool(((diff == 0) | ((diff == 1) & ties)).all())


@grader
def check_per_channel_quantize(fn: Callable[[torch.Tensor, int],
                                            tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Ch. 11, exercise 2: ``fn(w, bits)`` returns ``(q, scale)`` of symmetric
    per-output-channel quantisation of a weight ``w`` of shape [out, in]: scale[i] =
    max|w[i]| / (2^(bits-1) - 1) (shape [out, 1] or [out]; any positive scale for a row of
    zeros), q = clamp(round(w / scale), -(2^(bits-1) - 1), 2^(bits-1) - 1) as integers.

    Checked against ``aimodels.compress.quant.quantize(w, bits, symmetric=True, axis=0)``
    on weights with zero and outlier rows, 2 to 8 bits, float64 and float32, which change
    at every call; calling that function is not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    cases = _per_channel_cases(rng)
    for shape, bits, dtype, kind in cases:
        w = _weight(shape, dtype, kind, g)
        want_q, want_scale, _ = quant.quantize(w, bits, symmetric=True, axis=0)
        big = 2 ** (bits - 1) - 1
        label = (f"w of shape {list(shape)} ({kind}, {str(dtype).removeprefix('torch.')}), "
                 f"bits={bits}")
        got = _call_on(label, fn, (w, bits), library=_QUANT_LIBRARY,
                       hint=_ZERO_ROW_HINT if kind == "zero row" else
                       "run it by hand on a small w to see where it fails.")
        q, scale = _pair(label, got, "(q, scale)", "return two tensors: return q, scale.")
        if (isinstance(q, torch.Tensor) and isinstance(scale, torch.Tensor)
                and tuple(q.shape) in ((shape[0], 1), (shape[0],)) and q.shape != scale.shape
                and tuple(scale.shape) == shape):
            raise NotYet(f"{label}: the first tensor has the shape of a scale.",
                         "return (q, scale), in that order.")
        _check_scale(label, scale, w, want_scale, big)
        _check_codes(label, q, w, want_q, want_scale, big)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(11)) * 0.02
    w[0] *= 50
    shares = []
    for axis in (None, 0):
        codes = quant.quantize(w, 4, symmetric=True, axis=axis)[0]
        shares.append(float((codes[1:] == 0).double().mean()))
    return _report(True, f"your codes match quant.quantize(w, bits, axis=0) on all {len(cases)} "
                         f"weights. On a [64, 256] weight whose row 0 is 50x larger, one int4 "
                         f"scale for the whole tensor rounds {shares[0]:.0%} of the other rows' "
                         f"weights to 0; one scale per row, {shares[1]:.0%}: an outlier channel "
                         "sets the step of its own row only.")


def _check_scale(label: str, scale: object, w: torch.Tensor, want: torch.Tensor,
                 big: int) -> None:
    """``NotYet`` unless ``scale`` holds one right scale per row of ``w``."""
    out, cols = w.shape
    if not isinstance(scale, torch.Tensor):
        raise NotYet(f"{label}: the scale should be a tensor of shape [{out}, 1] or [{out}], "
                     f"got {_shape(scale)}.", _PER_ROW_HINT)
    if tuple(scale.shape) not in ((out, 1), (out,)):
        if scale.numel() == 1:
            hint = ("that is one scale for the whole tensor; " + _PER_ROW_HINT)
        elif tuple(scale.shape) in ((1, cols), (cols,)):
            hint = ("that is one scale per input column (dim=0); the output channels are the "
                    "rows: " + _PER_ROW_HINT)
        else:
            hint = _PER_ROW_HINT
        raise NotYet(f"{label}: the scale should have shape [{out}, 1] or [{out}], got "
                     f"{list(scale.shape)}.", hint)
    if scale.is_complex() or not scale.is_floating_point():
        raise NotYet(f"{label}: the scale should be a float tensor, got {scale.dtype}.",
                     "divide in floating point: max|w[i]| / (2**(bits - 1) - 1).")
    got, want = scale.detach().double().reshape(out), want.double().reshape(out)
    zero_rows = w.abs().amax(dim=1) == 0
    bad = zero_rows & ~(torch.isfinite(got) & (got > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise NotYet(f"{label}: row {i} is all zeros and got scale {got[i].item():.6g}.",
                     _ZERO_ROW_HINT)
    rtol = 1e-9 if w.dtype == torch.float64 else 1e-6
    if torch.allclose(got[~zero_rows], want[~zero_rows], rtol=rtol, atol=0.0):
        return
    w64 = w.double()
    levels = 2 * big + 1  # 2**bits - 1
    slips = [
        ("that is one scale for the whole tensor; " + _PER_ROW_HINT,
         w64.abs().amax().expand(out) / big),
        ("the codes run from -(2**(bits-1) - 1) to 2**(bits-1) - 1 (-127 to 127 for 8 bits): "
         "divide max|w[i]| by 2**(bits - 1) - 1, so that the largest weight gets the largest "
         "code.", w64.abs().amax(dim=1) / (big + 1)),
        ("use the largest *magnitude* of each row, max|w[i]|, not its largest value: a row "
         "whose most extreme weight is negative would be clipped.", w64.amax(dim=1) / big),
        (_AFFINE_SCALE_HINT, 2 * w64.abs().amax(dim=1) / levels),
        (_AFFINE_SCALE_HINT, (w64.amax(dim=1) - w64.amin(dim=1)) / levels),
    ]
    if out == cols:
        slips.append(("that is one scale per input column (dim=0); the output channels are the "
                      "rows: " + _PER_ROW_HINT, w64.abs().amax(dim=0) / big))
    hint = next((h for h, s in slips  # with scale 1 wherever the slip gives none, as guarded
                 if torch.allclose(got[~zero_rows], torch.where(s > 0, s, 1.0)[~zero_rows],
                                   rtol=rtol, atol=0.0)),
                "scale[i] = max|w[i]| / (2**(bits - 1) - 1), one per row.")
    i = int((~torch.isclose(got, want, rtol=rtol, atol=0.0) & ~zero_rows).nonzero()[0, 0])
    raise NotYet(f"{label}: scale[{i}] = {got[i].item():.6g}, expected {want[i].item():.6g}.",
                 hint)


def _check_codes(label: str, q: object, w: torch.Tensor, want: torch.Tensor,
                 scale: torch.Tensor, big: int) -> None:
    """``NotYet`` unless ``q`` holds the right integer codes (a near tie may go either way)."""
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != tuple(w.shape):
        raise NotYet(f"{label}: q should be a tensor of shape {list(w.shape)}, got {_shape(q)}.",
                     "q has one code per weight: the shape of w.")
    if q.dtype == torch.bool or q.is_complex():
        raise NotYet(f"{label}: q is a {q.dtype} tensor.",
                     "return integer codes, e.g. .to(torch.int8).")
    if q.dtype == torch.uint8:
        raise NotYet(f"{label}: q is a torch.uint8 tensor, which cannot hold negative codes.",
                     "symmetric codes are signed, -(2**(bits-1) - 1) to 2**(bits-1) - 1: use "
                     "torch.int8.")
    ties = _near_ties(w, scale)
    got = q.detach()
    if not _codes_match(got, want, ties):
        ratio = w.double() / scale.double()
        slips = {
            _ROUND_HINT: tuple(r.clamp(-big, big)
                               for r in (ratio.floor(), ratio.trunc(), ratio.ceil())),
            "round w / scale to whole codes: torch.round(w / scale).": (ratio,),
            "return the integer codes q, not the dequantised weights q * scale.":
                (want.double() * scale.double(),),
        }
        hint = next((h for h, candidates in slips.items()
                     if any(_codes_match(got, c, ties) or (got.is_floating_point() and
                            torch.allclose(got.double(), c, rtol=1e-9, atol=1e-12))
                            for c in candidates)),
                    "q = clamp(round(w / scale), -(2**(bits-1) - 1), 2**(bits-1) - 1).")
        diff = (got.double() - want.double()).abs()
        r, c = (int(i) for i in (~((diff == 0) | ((diff == 1) & ties))).nonzero()[0])
        raise NotYet(f"{label}: q[{r}, {c}] = {got[r, c].item():.6g}, expected "
                     f"{int(want[r, c])} (w / scale = {ratio[r, c].item():.4f}).", hint)
    if got.is_floating_point():
        raise NotYet(f"{label}: the codes are right but q is a {got.dtype} tensor.",
                     "codes are stored as small integers, which is the point of quantising: "
                     "return q.to(torch.int8).")


# --------------------------------------------------------------------------- distillation
_KD_LIBRARY = Library(
    task="the exercise asks you to write the loss yourself (F.kl_div and F.cross_entropy "
         "are fine)",
    hint="alpha * T**2 * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), "
         "reduction='batchmean', log_target=True) + (1 - alpha) * F.cross_entropy(s, y).",
    python=((distill, "aimodels.compress.distill"),),
)


def _kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float,
        *, power: int = 2, reverse: bool = False, reduction: str = "batchmean",
        ce_soft: bool = False, soften: tuple[bool, bool] = (True, True),
        log_input: bool = True, swap: bool = False) -> float:
    """The loss, or one of its slips: T**power, KL(q || p), another reduction, the CE on
    s / T, logits not softened (student, teacher), kl_div on probabilities, alpha swapped."""
    T = temperature  # noqa: N806
    log_q = F.log_softmax(s / T if soften[0] else s, dim=-1)
    log_p = F.log_softmax(t / T if soften[1] else t, dim=-1)
    if not log_input:  # F.kl_div(softmax(s / T), p): the input taken as log-probabilities
        terms = log_p.exp() * (log_p - log_q.exp())
    elif reverse:
        terms = log_q.exp() * (log_q - log_p)
    else:
        terms = log_p.exp() * (log_p - log_q)
    kl = {"batchmean": terms.sum() / len(s), "mean": terms.mean(), "sum": terms.sum()}[reduction]
    ce = F.cross_entropy(s / T if ce_soft else s, y)
    soft = T**power * kl
    loss = alpha * ce + (1 - alpha) * soft if swap else alpha * soft + (1 - alpha) * ce
    return float(loss)


def _kd_slip(**mistake: Any) -> Callable[..., float]:
    return lambda s, t, y, T, a: _kd(s, t, y, T, a, **mistake)


_KD_SLIPS: list[Slip] = [
    ("multiply the KL term by T**2: its gradient shrinks as 1/T**2, and T**2 restores it, so "
     "that alpha weighs the two terms the same way at every temperature.", _kd_slip(power=0)),
    ("the factor is T**2, not T: the soft term's gradient shrinks as 1/T**2.",
     _kd_slip(power=1)),
    ("KL(p || q) with p the teacher's softened distribution: sum p * (log p - log q). "
     "F.kl_div(input, target) takes the *student's* log-probabilities as input and the "
     "teacher's as target.", _kd_slip(reverse=True)),
    ("sum the KL over the classes and average over the batch only (reduction='batchmean'); "
     "reduction='mean' also divides by the number of classes.", _kd_slip(reduction="mean")),
    ("average the KL over the batch (reduction='batchmean'), do not just sum it.",
     _kd_slip(reduction="sum")),
    ("the cross-entropy with the hard labels uses the raw student logits (T = 1), not s / T.",
     _kd_slip(ce_soft=True)),
    ("soften the teacher too: p = softmax(teacher_logits / T), at the same temperature as the "
     "student.", _kd_slip(soften=(True, False))),
    ("soften the student too: q = softmax(student_logits / T) in the KL term.",
     _kd_slip(soften=(False, True))),
    ("divide both the student's and the teacher's logits by T before the softmax in the KL "
     "term.", _kd_slip(soften=(False, False))),
    ("F.kl_div expects log-probabilities as its input: pass F.log_softmax(s / T, dim=-1), not "
     "softmax.", _kd_slip(log_input=False)),
    ("alpha weighs the distillation term: alpha * T**2 * KL + (1 - alpha) * CE, so alpha = 1 "
     "is pure distillation.", _kd_slip(swap=True)),
]


def _kd_cases(rng: random.Random) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                float, float]]:
    """Every temperature with every alpha, batches of 2 to 16 (and one of 1), 2 to 20
    classes, float64."""
    g = torch_generator(rng)
    cases = []
    settings = [(T, a) for T in (1.0, 2.0, 4.5) for a in (0.0, 0.3, 1.0)]
    settings.insert(0, settings.pop(4))  # T = 2, alpha = 0.3 first: every term shows
    for i, (T, a) in enumerate(settings):
        batch = 1 if i == len(settings) - 1 else rng.randint(2, 16)
        classes = rng.randint(2, 20)
        s = torch.randn(batch, classes, generator=g, dtype=torch.float64) * rng.uniform(1, 3)
        t = torch.randn(batch, classes, generator=g, dtype=torch.float64) * rng.uniform(2, 5)
        y = torch.randint(classes, (batch,), generator=g)
        cases.append((s, t, y, T, a))
    return cases


def _kd_label(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float,  # noqa: N803
              a: float) -> str:
    return f"batch {s.shape[0]}, {s.shape[1]} classes, temperature={T:g}, alpha={a:g}"


def _loss_value(label: str, got: object, batch: int) -> float:
    """The learner's loss as a float, or ``NotYet`` for a non-scalar or non-tensor."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and got.is_floating_point():
        value = got.detach().item()
        if math.isfinite(value):
            return value
        raise NotYet(f"{label}: the loss is {value}.",
                     "use F.log_softmax for the log-probabilities: log(softmax(x)) gives "
                     "-inf where a probability underflows to 0.")
    if isinstance(got, torch.Tensor):
        hint = ("reduce to one number: sum the KL over classes, average it and the "
                "cross-entropy over the batch." if got.ndim >= 1 and got.shape[0] == batch
                else "return the loss as a scalar tensor.")
        raise NotYet(f"{label}: expected a scalar tensor, got {_shape(got)} ({got.dtype}).",
                     hint)
    raise NotYet(f"{label}: expected a scalar tensor, got {type(got).__name__} {got!r:.40}.",
                 "return the loss tensor itself, not .item(): loss.backward() needs it.")


@grader
def check_kd_loss(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 11, exercise 3: ``fn(student_logits, teacher_logits, targets, temperature, alpha)``
    is the distillation loss alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
    CE(s, targets), the KL summed over classes and averaged over the batch, as a scalar
    tensor.

    Checked against ``aimodels.compress.distill.distillation_loss`` on random float64 logits
    for T in {1, 2, 4.5} and alpha in {0, 0.3, 1}, which change at every call; calling that
    function is not allowed.
    """
    cases = _kd_cases(fresh_rng())
    answers: list[Any] = []
    for case in cases:
        s, t, y, T, a = case
        label = _kd_label(*case)
        student = s.clone().requires_grad_(True)
        got = _call_on(label, fn, (student, t, y, T, a), library=_KD_LIBRARY,
                       hint="run it by hand on a batch of two to see where it fails.")
        answers.append(got)
        value = _loss_value(label, got, len(s))
        expected = float(distill.distillation_loss(s, t, y, T, a))
        if math.isclose(value, expected, rel_tol=1e-7, abs_tol=1e-10):
            if not got.requires_grad:
                raise NotYet(f"{label}: the value is right, but the loss is not connected to "
                             "the student's logits.",
                             "compute it with torch operations on student_logits, without "
                             ".detach(), .item() or numpy, so that loss.backward() reaches the "
                             "student.")
            continue
        hint = _named_slip(fn, cases, answers, _KD_SLIPS,
                           lambda answer, want: math.isclose(_real(answer), want, rel_tol=1e-7,
                                                             abs_tol=1e-10),
                           library=_KD_LIBRARY)
        raise NotYet(f"{label}: got {value:.6g}, expected {expected:.6g}.", hint or
                     "alpha * T**2 * KL(p || q) + (1 - alpha) * CE(s, y) with p = softmax(t / "
                     "T) and q = softmax(s / T), the KL summed over classes and averaged over "
                     "the batch.")
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(64, 10, generator=g) * 2, torch.randn(64, 10, generator=g) * 2
    norms = []
    for T in (1.0, 4.0):
        student = s.clone().requires_grad_(True)
        F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(t / T, -1),
                 reduction="batchmean", log_target=True).backward()
        norms.append(float(student.grad.norm()))
    return _report(True, f"your loss matches distillation_loss in all {len(cases)} cases. "
                         f"Why T**2: on a sample batch the KL term's gradient at T = 4 is "
                         f"{norms[0] / norms[1]:.0f}x smaller than at T = 1 (it shrinks as "
                         f"1/T**2 for large T); times T**2 = 16 it is "
                         f"{16 * norms[1] / norms[0]:.2f}x its T = 1 size, so alpha keeps its "
                         "meaning whatever the temperature.")


# --------------------------------------------------------------------------- pruned size
_BUILDS_THE_MLP = Library(
    task="the exercise asks you to count from the widths, without building the model",
    hint="a Linear(a, b) holds a * b weights and b biases; prune the hidden widths to "
         "round(keep * width) and count again.",
    python=((nn.Linear, "nn.Linear"), (scaling.count_parameters, "count_parameters"),
            (prune, "aimodels.compress.prune")),
)


def _mlp_size(widths: Sequence[int], biases: bool = True) -> int:
    return sum(a * b + (b if biases else 0) for a, b in zip(widths, widths[1:], strict=False))


def _pruned_widths(widths: Sequence[int], keep: float, count: Callable[[float], int] = round,
                   first: int = 1, last: int = -1) -> list[int]:
    """``widths`` with those from ``first`` to before ``last`` (the hidden ones) pruned."""
    end = len(widths) + last if last < 0 else last
    return [count(keep * w) if first <= i < end else w for i, w in enumerate(widths)]


def _pruned_size(widths: Sequence[int], keep: float) -> tuple[int, int]:
    """Parameters before and after keeping round(keep * width) units of each hidden layer."""
    return _mlp_size(widths), _mlp_size(_pruned_widths(widths, keep))


def _rows_only(widths: Sequence[int], keep: float) -> int:
    new = _pruned_widths(widths, keep)
    return sum(a * b + b for a, b in zip(widths, new[1:], strict=False))


def _old_biases(widths: Sequence[int], keep: float) -> int:
    return _mlp_size(_pruned_widths(widths, keep), biases=False) + sum(widths[1:])


_ROUND_KEEP_HINT = ("keep round(keep * width) units: int() and floor round down (int(0.3 * 9) "
                    "= 2, but round gives 3), ceil rounds up.")
_BIAS_HINT = ("each Linear(a, b) also has b biases, and a pruned unit takes its bias with it: "
              "count a * b + b per layer, before and after.")

_PRUNE_SLIPS: list[Slip] = [
    ("keep the output width: the output units are the model's answers (one per class), so "
     "only the hidden layers are pruned.",
     lambda ws, k: (_mlp_size(ws), _mlp_size(_pruned_widths(ws, k, last=len(ws))))),
    ("the input width is the data's and cannot be pruned: only the hidden layers are.",
     lambda ws, k: (_mlp_size(ws), _mlp_size(_pruned_widths(ws, k, first=0)))),
    ("the input width is the data's and the output width the answers': prune only the "
     "hidden layers.",
     lambda ws, k: (_mlp_size(ws), _mlp_size(_pruned_widths(ws, k, first=0, last=len(ws))))),
    (_BIAS_HINT, lambda ws, k: (_mlp_size(ws, False),
                                _mlp_size(_pruned_widths(ws, k), False))),
    (_BIAS_HINT, lambda ws, k: (_mlp_size(ws), _old_biases(ws, k))),
    ("a pruned unit is also an input the next layer no longer reads: remove its column there "
     "too. Between two pruned layers the weights shrink by keep**2.",
     lambda ws, k: (_mlp_size(ws), _rows_only(ws, k))),
    (_ROUND_KEEP_HINT, lambda ws, k: (_mlp_size(ws), _mlp_size(_pruned_widths(ws, k, int)))),
    (_ROUND_KEEP_HINT,
     lambda ws, k: (_mlp_size(ws), _mlp_size(_pruned_widths(ws, k, math.ceil)))),
    ("keep is a fraction of the *units*, not of the parameters: a weight matrix between two "
     "hidden layers loses rows and columns, so about keep**2 of it stays.",
     lambda ws, k: (_mlp_size(ws), k * _mlp_size(ws))),
    ("keep is a fraction of the *units*, not of the parameters: a weight matrix between two "
     "hidden layers loses rows and columns, so about keep**2 of it stays.",
     lambda ws, k: (_mlp_size(ws), round(k * _mlp_size(ws)))),
    ("return (before, after), in that order.", lambda ws, k: _pruned_size(ws, k)[::-1]),
]


def _same_sizes(got: Any, want: tuple[float, float]) -> bool:
    before, after = _real(got[0]), _real(got[1])
    return (before is not None and after is not None and math.isclose(before, want[0])
            and math.isclose(after, want[1], rel_tol=1e-12))


def _keep_ok(widths: Sequence[int], keep: float) -> bool:
    """Every hidden width keeps at least one unit, and no keep * width is near a half."""
    for w in widths[1:-1]:
        x = keep * w
        if round(x) < 1 or abs(x - math.floor(x) - 0.5) < 1e-6:
            return False
    return True


def _random_prune_cases(rng: random.Random) -> list[tuple[list[int], float]]:
    """Five MLPs of 3 to 6 layers, widths 2 to 1024, keep 0.1 to 0.95; drawn again until
    every slip shows."""
    while True:
        cases = []
        while len(cases) < 5:
            widths = [rng.randint(2, 1024) for _ in range(rng.randint(3, 6))]
            keep = round(rng.uniform(0.1, 0.95), 2)
            if _keep_ok(widths, keep):
                cases.append((widths, keep))
        if _catches(cases, _PRUNE_SLIPS, _pruned_size, _same_sizes):
            return cases


@grader
def check_pruned_size(fn: Callable[[list[int], float], tuple[int, int]]) -> bool:
    """Ch. 11, exercise 4: ``fn(widths, keep)`` returns ``(before, after)``, the parameters
    of an MLP of ``nn.Linear(widths[i], widths[i+1])`` layers with biases before and after
    structured pruning keeps round(keep * width) units of every hidden layer (the input and
    output widths stay): the pruned units' rows and biases go, and the matching columns of
    the next layer.

    The rounding of ``aimodels.compress.prune.shrink_mlp``. Checked on fixed MLPs (keep = 1,
    no hidden layer) and on random ones that change at every call; building the layers is
    not allowed.
    """
    cases: list[tuple[list[int], float]] = [
        ([64, 256, 256, 10], 0.5), ([784, 300, 100, 10], 0.3), ([3, 9, 2], 0.3),
        ([10, 24, 36, 48, 5], 0.75), ([32, 128, 8], 1.0), ([16, 4], 0.5), ([5, 7, 7, 3], 0.6)]
    cases += _random_prune_cases(fresh_rng())
    answers: list[Any] = []
    for widths, keep in cases:
        label = f"widths={widths}, keep={keep}"
        got = _call_on(label, fn, (widths, keep), library=_BUILDS_THE_MLP,
                       hint="run it by hand on a small MLP such as [3, 9, 2] to see where it "
                            "fails.")
        answers.append(got)
        before, after = _pair(label, got, "(before, after)",
                              "return two counts: return before, after.")
        want = _pruned_size(widths, keep)
        if (_real(before), _real(after)) == want:
            continue
        hint = _named_slip(fn, cases, answers, _PRUNE_SLIPS, _same_sizes, library=_BUILDS_THE_MLP)
        if hint is None:
            _whole_number(f"{label}: before", before)  # a count is a whole number
            _whole_number(f"{label}: after", after)
            hint = ("count a * b + b for each Linear(a, b), then again with every hidden width "
                    "w replaced by round(keep * w).")
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v)
                          for v in (_real(before), _real(after)))
        raise NotYet(f"{label}: got ({shown}), expected {want}.", hint)
    widths = [784, 1024, 1024, 10]
    before, after = _pruned_size(widths, 0.5)
    return _report(True, f"all {len(cases)} MLPs counted exactly. Halving the hidden units of "
                         f"{widths} leaves {after:,} of its {before:,} parameters "
                         f"({after / before:.0%}): the 1024 x 1024 matrix between two pruned "
                         "layers keeps a quarter (keep**2), the first and last layers half; and "
                         "the smaller dense layers run faster on any hardware, unlike scattered "
                         "zeros.")
