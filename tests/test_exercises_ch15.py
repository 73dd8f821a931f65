"""Chapter 15 graders: they accept right answers and reject the slips a learner makes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels import explain
from aimodels.data import digits
from aimodels.exercises import ch15

# --------------------------------------------------------------------------- answers
d, L, f, V, H, KV, E, K = 2048, 24, 5632, 50_000, 16, 4, 16, 2
HEAD = d // H
ATTN = L * (2 * d * d + 2 * d * KV * HEAD)
EXPERT = 3 * d * f
SHARED = 2 * V * d + ATTN + L * d * E + (2 * L + 1) * d
TOTAL, ACTIVE = SHARED + L * E * EXPERT, SHARED + L * K * EXPERT  # written out by hand

FLOPS = 6 * 70e9 * 2e12
MWH = FLOPS / (989e12 * 0.4) * 700 * 1.1 / 3.6e9


# Exercise 4: a small MLP with fixed random weights is enough to tell the baselines apart.
with torch.random.fork_rng():
    torch.manual_seed(0)
    MLP = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10)).eval()
DIGITS = digits()
X, Y = DIGITS["X_test"][:8], DIGITS["y_test"][:8]
MEAN = DIGITS["X_train"].mean(0, keepdim=True)
IG_BLANK = explain.integrated_gradients(MLP, X, Y, steps=128)
IG_MEAN = explain.integrated_gradients(MLP, X, Y, baseline=MEAN, steps=128)
FLIPS = int(((IG_MEAN * IG_BLANK) < 0).sum())  # the notebook's solution


def ig_case(ig_mean=IG_MEAN, flipped=FLIPS, model=MLP):
    return (ig_mean, flipped, model, X, Y)


class Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def cost(tps, price):  # the notebook's solution
    return price / (tps * 3600) * 1e6


def cost_per_token_first(tps, price):
    per_token = price / 3600 / tps
    return per_token * 1_000_000


def test_right_answers_pass(capsys):
    accepts(capsys, ch15.check_moe_parameters, (TOTAL, ACTIVE))
    accepts(capsys, ch15.check_moe_parameters, [float(TOTAL), float(ACTIVE)])
    accepts(capsys, ch15.check_moe_parameters, np.array([TOTAL, ACTIVE]))
    accepts(capsys, ch15.check_moe_parameters, torch.tensor([TOTAL, ACTIVE]))
    accepts(capsys, ch15.check_moe_parameters, torch.tensor([TOTAL, ACTIVE], dtype=torch.float64))
    # Both counts are multiples of 2**11 below 2**34: 23 significant bits, which float32
    # (24 bits) holds exactly, so a float32 tensor of the right answer is no false alarm.
    accepts(capsys, ch15.check_moe_parameters, torch.tensor([TOTAL, ACTIVE], dtype=torch.float32))
    accepts(capsys, ch15.check_training_energy, MWH)
    accepts(capsys, ch15.check_training_energy, round(MWH))
    accepts(capsys, ch15.check_cost_per_million, cost)
    accepts(capsys, ch15.check_cost_per_million, cost_per_token_first)
    accepts(capsys, ch15.check_ig_baseline, *ig_case())
    # fewer steps, the count as a tensor computed from the learner's own two tensors
    ig64 = explain.integrated_gradients(MLP, X, Y, baseline=MEAN)
    blank64 = explain.integrated_gradients(MLP, X, Y)
    accepts(capsys, ch15.check_ig_baseline, *ig_case(ig64, ((ig64 * blank64) < 0).sum()))
    accepts(capsys, ch15.check_ig_baseline, *ig_case(IG_MEAN.numpy(), float(FLIPS)))


WRONG = [
    wrong(ch15.check_moe_parameters, (TOTAL + L * 2 * d * (d - KV * HEAD),
                                      ACTIVE + L * 2 * d * (d - KV * HEAD)),
          expect=("grouped-query",), id="moe-no-gqa"),
    wrong(ch15.check_moe_parameters, (TOTAL - L * E * d * f, ACTIVE - L * K * d * f),
          expect=("three matrices",), id="moe-two-matrices"),
    wrong(ch15.check_moe_parameters, (TOTAL, TOTAL), expect=("only the experts",),
          id="moe-all-active"),
    wrong(ch15.check_moe_parameters, (TOTAL - L * d * E, ACTIVE - L * d * E),
          expect=("router",), id="moe-no-router"),
    wrong(ch15.check_moe_parameters, (TOTAL - V * d, ACTIVE - V * d), expect=("untied",),
          id="moe-tied"),
    wrong(ch15.check_moe_parameters, (TOTAL, ACTIVE - L * EXPERT), expect=("2 experts",),
          id="moe-one-expert"),
    wrong(ch15.check_moe_parameters, (TOTAL + 12345, ACTIVE), expect=("total count",),
          id="moe-unknown"),
    wrong(ch15.check_moe_parameters, (TOTAL, ACTIVE - L * d * E),
          expect=("count it in the active",), id="moe-router-not-active"),
    wrong(ch15.check_moe_parameters, (TOTAL + 1, ACTIVE), expect=("off by +1",),
          id="moe-off-by-one"),
    wrong(ch15.check_moe_parameters, (round(TOTAL / 1e9, 2) * 1e9, ACTIVE),
          expect=("total count",), id="moe-rounded"),
    wrong(ch15.check_moe_parameters, torch.tensor([TOTAL + 3000, ACTIVE], dtype=torch.float32),
          expect=("float32",), id="moe-float32-tensor"),
    wrong(ch15.check_moe_parameters, np.array([[TOTAL, ACTIVE]]), expect=("shape (1, 2)",),
          id="moe-2d-array"),
    wrong(ch15.check_moe_parameters, 47e9, expect=("pair",), id="moe-one-number"),
    wrong(ch15.check_training_energy, MWH / 1.1, expect=("PUE multiplies",), id="e-no-pue"),
    wrong(ch15.check_training_energy, MWH * 0.4, expect=("utilisation",), id="e-no-util"),
    wrong(ch15.check_training_energy, MWH / 3, expect=("6ND",), id="e-2nd"),
    wrong(ch15.check_training_energy, MWH * 1e3, expect=("kWh",), id="e-kwh"),
    wrong(ch15.check_training_energy, MWH * 3.6e9, expect=("joules",), id="e-joules"),
    wrong(ch15.check_training_energy, MWH * 989 / 1979, expect=("sparsity",),
          id="e-sparse-peak"),
    wrong(ch15.check_training_energy, MWH / 1.21, expect=("do not divide",), id="e-div-pue"),
    wrong(ch15.check_cost_per_million, lambda t, p: p / t * 1e6, expect=("3,600",),
          id="c-no-3600"),
    wrong(ch15.check_cost_per_million, lambda t, p: p / (3600 * t), expect=("one token",),
          id="c-per-token"),
    wrong(ch15.check_cost_per_million, lambda t, p: 3600 * t / p / 1e6, expect=("inverted",),
          id="c-inverted"),
    wrong(ch15.check_cost_per_million, lambda t, p: p / (3600 * t) * 1e3,
          expect=("thousand",), id="c-thousand"),
    wrong(ch15.check_cost_per_million, lambda t, p: t / (3600 * p) * 1e6, expect=("swapped",),
          id="c-swapped"),
    wrong(ch15.check_ig_baseline, *ig_case(IG_BLANK), expect=("blank (all-zero) baseline",),
          id="ig-blank-baseline"),
    wrong(ch15.check_ig_baseline,
          *ig_case(explain.integrated_gradients(MLP, X, Y, baseline=X.mean(0, keepdim=True),
                                                steps=128)),
          expect=("mean *training* image",), id="ig-test-mean"),
    wrong(ch15.check_ig_baseline,
          *ig_case(explain.integrated_gradients(MLP, X, Y, baseline=torch.full_like(
              MEAN, float(MEAN.mean())), steps=128)),
          expect=("one grey level",), id="ig-scalar-baseline"),
    wrong(ch15.check_ig_baseline,
          *ig_case(explain.integrated_gradients(MLP, MEAN.expand_as(X), Y, baseline=X,
                                                steps=128)),
          expect=("reversed",), id="ig-swapped"),
    wrong(ch15.check_ig_baseline, *ig_case(IG_MEAN / (X - MEAN).abs().clamp(min=0.1)),
          expect=("does not add up",), id="ig-no-x-minus-baseline"),
    wrong(ch15.check_ig_baseline, *ig_case(flipped=int(((IG_MEAN * IG_BLANK) <= 0).sum())),
          expect=("not <= 0",), id="ig-count-zeros"),
    wrong(ch15.check_ig_baseline,
          *ig_case(flipped=int((IG_MEAN.sign() != IG_BLANK.sign()).sum())),
          expect=("has no sign",), id="ig-sign-differs"),
    wrong(ch15.check_ig_baseline, *ig_case(flipped=((IG_MEAN * IG_BLANK) < 0).float().mean()),
          expect=("fraction",), id="ig-fraction"),
    wrong(ch15.check_ig_baseline,
          *ig_case(flipped=int(((IG_BLANK > 0) & (IG_MEAN < 0)).sum())),
          expect=("both directions",), id="ig-one-direction"),
    wrong(ch15.check_ig_baseline, *ig_case(flipped=int(((IG_MEAN * IG_BLANK) > 0).sum())),
          expect=("keep their sign",), id="ig-same-sign"),
]


@pytest.mark.parametrize("check, args, expect", WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None, "454", [1, 2, 3]])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ch15.check_training_energy, answer)
    rejects(capsys, ch15.check_moe_parameters, answer)


@pytest.mark.parametrize("case", [ig_case(...), ig_case(None), ig_case(flipped=...),
                                  ig_case(flipped="95"), ig_case(IG_MEAN[:4]),
                                  ig_case(IG_MEAN.long()), ig_case(model=Broken().eval()),
                                  ig_case(model=torch.nn.Sequential(torch.nn.Flatten(),
                                                                    torch.nn.Dropout(),
                                                                    torch.nn.Linear(64, 10)))])
def test_ig_stubs_and_errors_get_not_yet(capsys, case):
    rejects(capsys, ch15.check_ig_baseline, *case)


def test_ig_reference_counts_differ_from_every_slip():
    """The slips are told apart only if their counts differ from the right one."""
    slips = [((IG_MEAN * IG_BLANK) <= 0), (IG_MEAN.sign() != IG_BLANK.sign()),
             ((IG_BLANK > 0) & (IG_MEAN < 0)), ((IG_MEAN * IG_BLANK) > 0)]
    assert all(abs(int(s.sum()) - FLIPS) > 1 for s in slips)
    assert 0 < FLIPS < X.numel()


@pytest.mark.parametrize("fn", [stub, broken, lambda t, p: "cheap", 42])
def test_function_stubs_and_errors_get_not_yet(capsys, fn):
    rejects(capsys, ch15.check_cost_per_million, fn)


def test_every_chapter_15_grader_has_two_or_more_wrong_answers():
    counts = Counter(param.values[0].__name__ for param in WRONG)
    for name in ch15.__all__:
        assert counts[name] >= 2, name
        assert getattr(ch15, name).__doc__.startswith("Ch. 15, exercise ")


def test_the_hand_count_matches_the_calculator():
    from aimodels import trends

    count = trends.llm_parameters(**ch15.MOE_CONFIG)
    assert (count.total, count.active) == (TOTAL, ACTIVE)
