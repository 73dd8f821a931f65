"""Chapter 11 graders: they accept a right answer and reject the slips a learner makes."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn
from torch.nn import functional as F

from aimodels import exercises as ex
from aimodels.compress import distillation_loss, quantize, shrink_mlp
from aimodels.exercises import ch11

# Two wrong answers use what torch warns about: kl_div's reduction="mean", and
# torch.quantize_per_channel.
pytestmark = [pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")]


# --------------------------------------------------------------------------- answers
def scale_zero_point(x_min, x_max, bits):  # the notebook's solution
    x_min, x_max = min(x_min, 0.0), max(x_max, 0.0)
    qmax = 2**bits - 1
    if x_max == x_min:
        return 1.0, 0
    scale = (x_max - x_min) / qmax
    return scale, min(max(round(-x_min / scale), 0), qmax)


def scale_zero_point_torch(x_min, x_max, bits):  # tensors in, 0-d tensors out
    x = torch.tensor([x_min, x_max], dtype=torch.float64)
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-low / scale).clamp(0, 2**bits - 1).to(torch.int64)


def per_channel(w, bits):  # the notebook's solution
    big = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / big
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-big, big).to(torch.int8), scale


def per_channel_flat(w, bits):  # scale of shape [out], int64 codes, zero rows at scale 0.5
    big = 2 ** (bits - 1) - 1
    scale = torch.stack([row.abs().max() / big for row in w])
    scale[scale == 0] = 0.5
    return (w / scale[:, None]).round().clamp(-big, big).long(), scale


def kd_loss(student_logits, teacher_logits, targets, temperature, alpha):  # the notebook's
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1),
                    F.log_softmax(teacher_logits / T, dim=-1),
                    reduction="batchmean", log_target=True)
    return alpha * T**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, targets)


def kd_by_hand(s, t, y, T, a):  # the sums written out, the teacher as probabilities
    p = torch.softmax(t / T, dim=-1)
    log_q = torch.log_softmax(s / T, dim=-1)
    kl = (p * (torch.log(p) - log_q)).sum(dim=-1).mean()
    ce = -torch.log_softmax(s, dim=-1).gather(1, y[:, None]).mean()
    return a * T * T * kl + (1 - a) * ce


def pruned_size(widths, keep):  # the notebook's solution
    def count(ws):
        return sum(a * b + b for a, b in zip(ws, ws[1:], strict=False))

    hidden = [round(keep * w) for w in widths[1:-1]]
    return count(widths), count([widths[0], *hidden, widths[-1]])


def pruned_size_loop(widths, keep):  # layer by layer, keeping track of the kept inputs
    before = after = 0
    kept_in = widths[0]
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        kept_out = b if i == len(widths) - 2 else round(keep * b)
        before += a * b + b
        after += kept_in * kept_out + kept_out
        kept_in = kept_out
    return before, after


# --------------------------------------------------------------------------- slips
def affine(x_min, x_max, bits, *, levels=-1, widen=True, rounding=round, clamp=True, sign=-1):
    low, high = (min(x_min, 0.0), max(x_max, 0.0)) if widen else (x_min, x_max)
    if high == low:
        return 1.0, 0
    scale = (high - low) / (2**bits + levels)
    zero = sign * low / scale
    zero = zero if rounding is None else rounding(zero)
    return scale, min(max(zero, 0), 2**bits - 1) if clamp else zero


def quantize_with(scale_of, rounding=torch.round, dtype=torch.int8):
    def answer(w, bits):
        big = 2 ** (bits - 1) - 1
        scale = scale_of(w, big)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = rounding(w / scale).clamp(-big, big)
        return (q if dtype is None else q.to(dtype)), scale

    return answer


def kd_with(*, power=2, reverse=False, reduction="batchmean", ce_soft=False,
            soften=(True, True), swap=False, kl_on_probs=False):
    def answer(s, t, y, T, a):
        log_q = F.log_softmax(s / T if soften[0] else s, dim=-1)
        log_p = F.log_softmax(t / T if soften[1] else t, dim=-1)
        if kl_on_probs:  # F.kl_div(softmax(s / T), softmax(t / T))
            kl = F.kl_div(log_q.exp(), log_p.exp(), reduction=reduction)
        elif reverse:
            kl = F.kl_div(log_p, log_q, reduction=reduction, log_target=True)
        else:
            kl = F.kl_div(log_q, log_p, reduction=reduction, log_target=True)
        soft, hard = T**power * kl, F.cross_entropy(s / T if ce_soft else s, y)
        return a * hard + (1 - a) * soft if swap else a * soft + (1 - a) * hard

    return answer


def zero_rows_unguarded(w, bits):  # scale 0 for a row of zeros, then 0 / 0
    big = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / big
    return torch.round(w / scale).clamp(-big, big).to(torch.int8), scale


def count(widths, biases=True):
    return sum(a * b + (b if biases else 0) for a, b in zip(widths, widths[1:], strict=False))


def prune_widths(widths, keep, rounding=round, first=1, last=None):
    last = len(widths) - 1 if last is None else last
    return [rounding(keep * w) if first <= i < last else w for i, w in enumerate(widths)]


def rows_only(widths, keep):
    new = prune_widths(widths, keep)
    return count(widths), sum(a * b + b for a, b in zip(widths, new[1:], strict=False))


WRONG = [
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, levels=0), expect=["2**bits - 1, not 2**bits"], id="affine-2-to-the-bits"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, widen=False), expect=["first widen the range to include 0"], id="affine-no-widening"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, widen=False, clamp=False), expect=["first widen the range to include 0"], id="affine-no-widening-no-clamp"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: ((b - a) / (2**n - 1), round(-a / ((b - a) / (2**n - 1)))), expect=["first widen the range to include 0"], id="affine-no-widening-no-guard"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, rounding=None), expect=["a whole number: round"], id="affine-zero-not-rounded"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, rounding=int), expect=["nearest code"], id="affine-zero-truncated"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, rounding=math.ceil), expect=["nearest code"], id="affine-zero-ceil"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, sign=1), expect=["-x_min / scale >= 0"], id="affine-sign-clamped"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: affine(a, b, n, sign=1, clamp=False), expect=["-x_min / scale >= 0"], id="affine-sign"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: (max(b, 0) - min(a, 0)) / (2**n - 1), expect=["expected a tuple (scale, zero_point), got float"], id="affine-scale-only"),
    wrong(ex.check_scale_zero_point, lambda a, b, n: scale_zero_point(a, b, n)[::-1], expect=["in that order"], id="affine-swapped"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax() / big), expect=["whole tensor"], id="pcq-per-tensor-0d"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax().expand(len(w), 1) / big), expect=["whole tensor"], id="pcq-per-tensor-expanded"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / (big + 1)), expect=["divide max|w[i]| by 2**(bits - 1) - 1"], id="pcq-2-to-the-bits-minus-1"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: 2 * w.abs().amax(dim=1, keepdim=True) / (2 * big + 1)), expect=["affine scale"], id="pcq-affine-scale"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.amax(dim=1, keepdim=True) / big), expect=["*magnitude*"], id="pcq-max-not-abs"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=0, keepdim=True) / big), expect=["per input column"], id="pcq-per-column"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / big, torch.floor), expect=["nearest code"], id="pcq-floor"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / big, torch.trunc), expect=["nearest code"], id="pcq-trunc"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / big, lambda x: x, None), expect=["torch.round(w / scale)"], id="pcq-not-rounded"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / big, dtype=None), expect=["the codes are right but q is a torch.float"], id="pcq-float-codes"),
    wrong(ex.check_per_channel_quantize, quantize_with(lambda w, big: w.abs().amax(dim=1, keepdim=True) / big, dtype=torch.uint8), expect=["cannot hold negative codes"], id="pcq-uint8"),
    wrong(ex.check_per_channel_quantize, lambda w, bits: ((lambda q, s: (q * s, s))(*per_channel(w, bits))), expect=["not the dequantised"], id="pcq-dequantised"),
    wrong(ex.check_per_channel_quantize, zero_rows_unguarded, expect=["row", "all zeros", "scale 1.0"], id="pcq-zero-row-scale-0"),
    wrong(ex.check_per_channel_quantize, lambda w, bits: per_channel(w, bits)[::-1], expect=["in that order"], id="pcq-swapped"),
    wrong(ex.check_kd_loss, kd_with(power=0), expect=["multiply the KL term by T**2"], id="kd-no-t-squared"),
    wrong(ex.check_kd_loss, kd_with(power=1), expect=["T**2, not T"], id="kd-t-not-squared"),
    wrong(ex.check_kd_loss, kd_with(reverse=True), expect=["KL(p || q)"], id="kd-reversed-kl"),
    wrong(ex.check_kd_loss, kd_with(reduction="mean"), expect=["'mean' also divides"], id="kd-mean"),
    wrong(ex.check_kd_loss, kd_with(reduction="sum"), expect=["do not just sum"], id="kd-sum"),
    wrong(ex.check_kd_loss, kd_with(ce_soft=True), expect=["raw student logits"], id="kd-ce-on-soft-logits"),
    wrong(ex.check_kd_loss, kd_with(soften=(True, False)), expect=["soften the teacher"], id="kd-teacher-not-softened"),
    wrong(ex.check_kd_loss, kd_with(soften=(False, True)), expect=["soften the student"], id="kd-student-not-softened"),
    wrong(ex.check_kd_loss, kd_with(soften=(False, False)), expect=["divide both"], id="kd-nothing-softened"),
    wrong(ex.check_kd_loss, kd_with(kl_on_probs=True), expect=["log-probabilities as its input"], id="kd-kl-div-on-probabilities"),
    wrong(ex.check_kd_loss, kd_with(swap=True), expect=["alpha = 1 is pure distillation"], id="kd-alpha-swapped"),
    wrong(ex.check_kd_loss, lambda *args: kd_loss(*args).item(), expect=["not .item()"], id="kd-item"),
    wrong(ex.check_kd_loss, lambda *args: kd_loss(*args).detach(), expect=["not connected"], id="kd-detached"),
    wrong(ex.check_kd_loss, lambda s, *rest: kd_loss(s.detach(), *rest), expect=["not connected"], id="kd-student-detached"),
    wrong(ex.check_kd_loss, lambda s, t, y, T, a: F.cross_entropy(s, y, reduction="none"), expect=["reduce to one number"], id="kd-per-example"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), count(prune_widths(ws, k, last=len(ws)))), expect=["keep the output width"], id="prune-output-too"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), count(prune_widths(ws, k, first=0))), expect=["input width"], id="prune-input-too"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws, False), count(prune_widths(ws, k), False)), expect=["biases"], id="prune-no-biases"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), count(prune_widths(ws, k), False) + sum(ws[1:])), expect=["takes its bias with it"], id="prune-biases-kept"),
    wrong(ex.check_pruned_size, rows_only, expect=["remove its column"], id="prune-rows-only"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), count(prune_widths(ws, k, int))), expect=["int(0.3 * 9)"], id="prune-int"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), count(prune_widths(ws, k, math.ceil))), expect=["ceil rounds up"], id="prune-ceil"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), k * count(ws)), expect=["fraction of the *units*"], id="prune-keep-times-params"),
    wrong(ex.check_pruned_size, lambda ws, k: (count(ws), int(k * count(ws))), expect=["expected"], id="prune-int-keep-times-params"),
    wrong(ex.check_pruned_size, lambda ws, k: pruned_size(ws, k)[::-1], expect=["in that order"], id="prune-swapped"),
    wrong(ex.check_pruned_size, lambda ws, k: pruned_size(ws, k)[1], expect=["expected a tuple (before, after), got int"], id="prune-after-only"),
]

RIGHT = [
    (ex.check_scale_zero_point, scale_zero_point), (ex.check_scale_zero_point, scale_zero_point_torch),
    (ex.check_scale_zero_point, lambda a, b, n: (float(quantize(torch.tensor([a, b], dtype=torch.float64), n, symmetric=False)[1]), int(quantize(torch.tensor([a, b], dtype=torch.float64), n, symmetric=False)[2]))),
    (ex.check_per_channel_quantize, per_channel), (ex.check_per_channel_quantize, per_channel_flat),
    (ex.check_kd_loss, kd_loss), (ex.check_kd_loss, kd_by_hand),
    (ex.check_pruned_size, pruned_size), (ex.check_pruned_size, pruned_size_loop),
    (ex.check_pruned_size, lambda ws, k: [float(n) for n in pruned_size(ws, k)]),
]

GRADERS = [ex.check_scale_zero_point, ex.check_per_channel_quantize, ex.check_kd_loss,
           ex.check_pruned_size]


@pytest.mark.parametrize(("check", "answer"), RIGHT, ids=lambda x: getattr(x, "__name__", ""))
def test_right_answers_pass(capsys, check, answer):
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, check, answer)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    for _ in range(3):
        rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", GRADERS)
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])
    rejects(capsys, check, ..., expect=["write your solution first"])
    rejects(capsys, check, None, expect=["write your solution first"])
    rejects(capsys, check, lambda *args: 1 // 0, expect=["raised ZeroDivisionError"])
    rejects(capsys, check, lambda *args: None, expect=["expected a"])
    rejects(capsys, check, lambda *args: "text", expect=["expected a"])
    rejects(capsys, check, 3, expect=["expected a function"])


def test_every_chapter_11_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch11.__all__) and min(counts.values()) >= 2


def test_the_library_is_not_allowed(capsys):
    rejects(capsys, ex.check_per_channel_quantize,
            lambda w, bits: quantize(w, bits, symmetric=True, axis=0)[:2],
            expect=["calls aimodels.compress.quant"])
    rejects(capsys, ex.check_per_channel_quantize,
            lambda w, bits: (torch.quantize_per_channel(
                w.float(), w.abs().amax(1) / 127, torch.zeros(len(w), dtype=torch.int64), 0,
                torch.qint8).int_repr(), w.abs().amax(1) / 127),
            expect=["calls torch.quantize_per_channel"])
    rejects(capsys, ex.check_kd_loss, distillation_loss,
            expect=["calls aimodels.compress.distill", "F.kl_div and F.cross_entropy are fine"])

    def by_building(widths, keep):
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)])
        return sum(p.numel() for p in model.parameters()), 0

    rejects(capsys, ex.check_pruned_size, by_building, expect=["calls nn.Linear"])


def test_the_degenerate_range_gets_its_own_hint(capsys):
    def divides_by_zero(x_min, x_max, bits):
        x_min, x_max = min(x_min, 0.0), max(x_max, 0.0)
        scale = (x_max - x_min) / (2**bits - 1)
        return scale, round(-x_min / scale)

    out = rejects(capsys, ex.check_scale_zero_point, divides_by_zero,
                  expect=["x_min=0.0, x_max=0.0, bits=8: your divides_by_zero raised "
                          "ZeroDivisionError"])
    assert "return scale 1.0 and zero_point 0" in out

    def nan_scale(x_min, x_max, bits):
        scale, zero = scale_zero_point(x_min, x_max, bits)
        return (float("nan"), 0) if x_min == x_max == 0 else (scale, zero)

    rejects(capsys, ex.check_scale_zero_point, nan_scale,
            expect=["the scale should be a finite number", "return scale 1.0"])


def test_a_row_of_zeros_may_have_any_positive_scale(capsys):
    def any_scale(w, bits):
        q, scale = per_channel(w, bits)
        return q, torch.where(w.abs().amax(dim=1, keepdim=True) > 0, scale, 7.5)

    accepts(capsys, ex.check_per_channel_quantize, any_scale)


def test_graders_leave_the_global_random_state_alone(capsys):
    state = torch.get_rng_state()
    for check, answer in RIGHT:
        accepts(capsys, check, answer)
    assert torch.equal(state, torch.get_rng_state())


def test_kd_loss_accepts_any_reduction_of_a_one_element_tensor(capsys):
    accepts(capsys, ex.check_kd_loss, lambda *args: kd_loss(*args).reshape(1))


# --------------------------------------------------------------------------- the references
def test_scale_zero_point_reference_matches_the_library():
    rng = random.Random(0)
    cases = [(0.0, 0.0, 8), (1.5, 1.5, 4), (-2.0, -2.0, 3), (-1.0, 3.0, 8), (0.5, 2.0, 2)]
    for seed in range(200):
        cases += ch11._random_affine_cases(random.Random(seed))
    cases += [(round(rng.uniform(-5, 5), 3), round(rng.uniform(-5, 5), 3), rng.randint(2, 8))
              for _ in range(500)]
    for a, b, bits in cases:
        x_min, x_max = min(a, b), max(a, b)
        _, scale, zero = quantize(torch.tensor([x_min, x_max], dtype=torch.float64), bits,
                                  symmetric=False)
        want_scale, want_zero = ch11._scale_zero(x_min, x_max, bits)
        assert math.isclose(float(scale), want_scale, rel_tol=1e-12)
        if ch11._tie_free(x_min, x_max, bits):
            assert int(zero) == want_zero, (x_min, x_max, bits)


def test_pruned_size_reference_matches_shrink_mlp():
    rng = random.Random(1)
    cases = [([64, 256, 256, 10], 0.5), ([784, 300, 100, 10], 0.3), ([3, 9, 2], 0.3),
             ([10, 24, 36, 48, 5], 0.75), ([32, 128, 8], 1.0), ([5, 7, 7, 3], 0.6),
             ([4, 5, 3], 0.5), ([4, 7, 3], 0.5)]  # ties: round(2.5) = 2, round(3.5) = 4
    for seed in range(10):
        cases += ch11._random_prune_cases(random.Random(seed))
    for _ in range(30):
        widths = [rng.randint(1, 60) for _ in range(rng.randint(3, 6))]
        keep = rng.choice((0.25, 0.5, 0.75, round(rng.uniform(0.05, 1.0), 2)))
        if all(round(keep * w) >= 1 for w in widths[1:-1]):
            cases.append((widths, keep))
    for widths, keep in cases:
        layers = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        small = shrink_mlp(model, keep)
        sizes = tuple(sum(p.numel() for p in m.parameters()) for m in (model, small))
        assert sizes == ch11._pruned_size(widths, keep) == pruned_size(widths, keep), widths


def test_kd_reference_is_the_library_loss():
    for seed in range(20):
        for s, t, y, T, a in ch11._kd_cases(random.Random(seed)):
            want = float(distillation_loss(s, t, y, T, a))
            assert math.isclose(ch11._kd(s, t, y, T, a), want, rel_tol=1e-12, abs_tol=1e-14)
            assert math.isclose(float(kd_loss(s, t, y, T, a)), want, rel_tol=1e-9)


# --------------------------------------------------------------------------- random cases
def test_random_cases_are_away_from_rounding_ties():
    for seed in range(300):
        for case in ch11._random_affine_cases(random.Random(seed)):
            assert ch11._tie_free(*case)
        for widths, keep in ch11._random_prune_cases(random.Random(seed)):
            assert ch11._keep_ok(widths, keep)
            assert all(round(keep * w) >= 1 for w in widths[1:-1])


def differs(slip, reference, case, same):
    try:
        return not same(slip(*case), reference(*case))
    except Exception:  # a crash is caught too
        return True


def kd_same(a, b):
    return math.isclose(float(a), float(b), rel_tol=1e-7, abs_tol=1e-10)


def per_channel_cases(rng):
    """The random per-channel cases alone, with their weights."""
    g = ch11.torch_generator(rng)
    cases = ch11._per_channel_cases(rng)
    weights = [(ch11._weight(shape, dtype, kind, g), bits) for shape, bits, dtype, kind in cases]
    return weights[4:]


def per_channel_same(a, b):
    return (isinstance(a, tuple) and len(a) == 2 and a[0].shape == b[0].shape
            and a[0].dtype == b[0].dtype and torch.equal(a[0], b[0])
            and torch.allclose(a[1].reshape(-1).double(), b[1].reshape(-1).double(), rtol=1e-6))


RANDOM_CASES = {  # each grader's random cases, without the fixed ones
    "check_scale_zero_point": (ch11._random_affine_cases, scale_zero_point, ch11._same_affine),
    "check_pruned_size": (ch11._random_prune_cases, pruned_size, ch11._same_sizes),
    "check_kd_loss": (ch11._kd_cases, kd_loss, kd_same),
    "check_per_channel_quantize": (per_channel_cases, per_channel, per_channel_same),
}

SLIPS_OF_VALUE = [p for p in WRONG if p.id not in {
    "affine-scale-only", "affine-no-widening-no-guard", "pcq-uint8", "kd-item", "kd-detached", "kd-student-detached",
    "kd-per-example", "prune-after-only"}]  # caught by their type or shape on any case


@pytest.mark.parametrize(("check", "args", "expect"), SLIPS_OF_VALUE)
def test_the_random_cases_alone_catch_every_slip(check, args, expect):
    """The fixed cases catch every slip; the random ones must too, whatever the seed, so
    that a learner whose code only fits the fixed cases still gets "Not yet"."""
    make_cases, reference, same = RANDOM_CASES[check.__name__]
    slip = args[0]
    missed = [seed for seed in range(100)
              if not any(differs(slip, reference, case, same)
                         for case in make_cases(random.Random(seed)))]
    assert missed == []


def test_success_messages_teach(capsys):
    accepts(capsys, ex.check_kd_loss, kd_loss)
    accepts(capsys, ex.check_pruned_size, pruned_size)
    accepts(capsys, ex.check_scale_zero_point, scale_zero_point)
    accepts(capsys, ex.check_per_channel_quantize, per_channel)
    ex.check_kd_loss(kd_loss)
    assert "T**2" in capsys.readouterr().out
