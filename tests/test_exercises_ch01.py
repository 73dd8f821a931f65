"""Chapter 1 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn

from aimodels import exercises as ex
from aimodels import scaling

# --------------------------------------------------------------------------- answers
N = 7e9
DAYS = scaling.training_days(scaling.training_flops(N, 20 * N), 256 * 312e12, 0.4)


def mlp_parameters(sizes):  # the notebook's solution
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def no_bias(sizes):
    return sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))


def bias_per_input(sizes):
    return sum(a * b + a for a, b in zip(sizes, sizes[1:], strict=False))


def input_bias_too(sizes):
    return mlp_parameters(sizes) + sizes[0]


def two_layers_only(sizes):  # written for the [784, 256, 10] example
    return sizes[0] * sizes[1] + sizes[1] + sizes[1] * sizes[2] + sizes[2]


TABLE = {(3, 4, 2): 26, (784, 256, 10): 203_530, (10, 1): 11, (5, 7, 7, 7, 1): 162,
         (1024, 4096, 1024): 8_393_728}


def memorised(sizes):  # the grader's fixed cases, copied from its source
    return TABLE.get(tuple(sizes), 0)


def builds_the_model(sizes):
    layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
    return sum(p.numel() for p in nn.Sequential(*layers).parameters())


def counts_with_the_library(sizes):
    return scaling.count_parameters(nn.Sequential(*[nn.Linear(a, b, device="meta")
                                                    for a, b in zip(sizes, sizes[1:], strict=False)]))


WRONG = [
    wrong(ex.check_weights_gb, 28, 3.5, expect=["float32"], id="weights-bf16-as-float32"),
    wrong(ex.check_weights_gb, 14, 28, expect=["bf16 is right", "4 *bits*"], id="weights-int4-as-4-bytes"),
    wrong(ex.check_weights_gb, 14, 7, expect=["int8"], id="weights-int4-as-int8"),
    wrong(ex.check_weights_gb, 14e9 / 2**30, 3.5e9 / 2**30, expect=["GiB"], id="weights-GiB"),
    wrong(ex.check_weights_gb, 112, 3.5, expect=["bits"], id="weights-bits-not-bytes"),
    wrong(ex.check_training_days, DAYS * 24, expect=["hours"], id="days-in-hours"),
    wrong(ex.check_training_days, DAYS * 86_400, expect=["seconds"], id="days-in-seconds"),
    wrong(ex.check_training_days, DAYS * 0.4, expect=["100%"], id="days-full-utilisation"),
    wrong(ex.check_training_days, DAYS / 3, expect=["6ND"], id="days-2ND"),
    wrong(ex.check_training_days, DAYS * 256, expect=["256 GPUs"], id="days-one-gpu"),
    wrong(ex.check_training_days, DAYS * 300 / 140, expect=["20 tokens"], id="days-gpt3-tokens"),
    wrong(ex.check_training_days, 1.0, expect=["formula"], id="days-guess"),
    wrong(ex.check_mlp_parameters, no_bias, expect=["bias"], id="mlp-no-bias"),
    wrong(ex.check_mlp_parameters, bias_per_input, expect=["*output*"], id="mlp-bias-per-input"),
    wrong(ex.check_mlp_parameters, input_bias_too, expect=["input layer"], id="mlp-input-bias"),
    wrong(ex.check_mlp_parameters, two_layers_only, expect=["raised IndexError"], id="mlp-two-layers-only"),
    wrong(ex.check_mlp_parameters, memorised, expect=["expected"], id="mlp-hard-coded-table"),
    wrong(ex.check_mlp_parameters, builds_the_model, expect=["calls nn.Linear", "without building"], id="mlp-builds-nn-linear"),
    wrong(ex.check_mlp_parameters, counts_with_the_library, expect=["calls nn.Linear"], id="mlp-count-parameters"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_weights_gb, 7e9 * 2 / 1e9, 7e9 * 0.5 / 1e9)
    accepts(capsys, ex.check_weights_gb, 14, 3.5)
    accepts(capsys, ex.check_training_days, DAYS)
    accepts(capsys, ex.check_training_days, round(DAYS, 1))
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_mlp_parameters, mlp_parameters)
    accepts(capsys, ex.check_mlp_parameters, lambda sizes: float(mlp_parameters(sizes)))


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_training_days, answer, expect=["write your solution first"])
    rejects(capsys, ex.check_weights_gb, answer, answer, expect=["write your solution first"])
    rejects(capsys, ex.check_weights_gb, 14, answer, expect=["bf16 is right", "solution first"])


def test_answers_of_the_wrong_type_get_not_yet(capsys):
    rejects(capsys, ex.check_training_days, "2.1", expect=["expected a number, got str"])
    rejects(capsys, ex.check_training_days, [2.1], expect=["got list"])
    rejects(capsys, ex.check_training_days, float("nan"), expect=["not a finite number"])
    rejects(capsys, ex.check_training_days, True, expect=["got bool"])
    rejects(capsys, ex.check_weights_gb, 14, expect=["could not be checked", "TypeError"])
    accepts(capsys, ex.check_training_days, torch.tensor(DAYS))
    rejects(capsys, ex.check_mlp_parameters, mlp_parameters([3, 4, 2]), expect=["expected a function"])
    rejects(capsys, ex.check_mlp_parameters, lambda sizes: [1], expect=["whole number"])
    rejects(capsys, ex.check_mlp_parameters, lambda sizes: mlp_parameters(sizes) / 3, expect=["whole number"])


@pytest.mark.parametrize("check", [ex.check_mlp_parameters])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])
    rejects(capsys, check, ..., expect=["write your solution first"])


def test_keyboard_interrupt_is_not_swallowed():
    def interrupted(sizes):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.check_mlp_parameters(interrupted)
    assert sys.getprofile() is None and torch._C._len_torch_function_stack() == 0


def test_graders_leave_the_global_random_state_alone(capsys):
    state = torch.get_rng_state()
    accepts(capsys, ex.check_mlp_parameters, mlp_parameters)
    rejects(capsys, ex.check_mlp_parameters, counts_with_the_library)
    assert torch.equal(state, torch.get_rng_state())


def test_every_chapter_1_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch01.__all__) and min(counts.values()) >= 2


def test_the_package_re_exports_every_chapter_grader():
    import inspect

    from aimodels.exercises import check_weights_gb

    by_chapter = [name for module in ex.CHAPTERS.values() for name in module.__all__]
    assert sorted(by_chapter) == sorted(ex.__all__) and len(set(by_chapter)) == len(by_chapter) == 68
    for name in ex.__all__:
        assert getattr(ex, name).__module__.startswith("aimodels.exercises.ch")
        assert getattr(ex, name).__doc__.startswith("Ch. ")
    assert list(inspect.signature(check_weights_gb).parameters) == ["bf16", "int4"]
