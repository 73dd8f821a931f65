"""Chapter 15 graders: they accept right answers and reject the slips a learner makes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong

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
]


@pytest.mark.parametrize("check, args, expect", WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None, "454", [1, 2, 3]])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ch15.check_training_energy, answer)
    rejects(capsys, ch15.check_moe_parameters, answer)


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
