"""Chapter 6 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn
from torch.nn import functional as F

from aimodels import exercises as ex
from aimodels import positional


# --------------------------------------------------------------------------- answers
def my_sinusoidal(max_len, d_model):  # the notebook's solution (float64)
    p = torch.arange(max_len, dtype=torch.float64)[:, None]
    omega = 10000 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(p * omega)
    table[:, 1::2] = torch.cos(p * omega)
    return table


def tutorial_float32(max_len, d_model):  # the classic float32 recipe with exp and log
    position = torch.arange(max_len).unsqueeze(1).float()
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def swapped(max_len, d_model):
    return my_sinusoidal(max_len, d_model).view(max_len, -1, 2).flip(-1).reshape(max_len, d_model)


def halves(max_len, d_model):  # all sines, then all cosines
    table = my_sinusoidal(max_len, d_model)
    return torch.cat([table[:, 0::2], table[:, 1::2]], 1)


def doubled_exponent(max_len, d_model):  # 2i where arange(0, d, 2) already is 2i
    p = torch.arange(max_len, dtype=torch.float64)[:, None]
    omega = 10000 ** (-2 * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    return torch.stack([torch.sin(p * omega), torch.cos(p * omega)], -1).reshape(max_len, d_model)


def positions_from_one(max_len, d_model):
    return my_sinusoidal(max_len + 1, d_model)[1:]


def fixed_width(max_len, d_model):  # written for d_model = 64
    return my_sinusoidal(max_len, 64)


def embed(ids, weight):  # the notebook's solution
    return F.one_hot(ids, weight.shape[0]).to(weight.dtype) @ weight


def embed_sum(ids, weight):  # one-hot product written as a broadcast sum
    one_hot = (ids[..., None] == torch.arange(weight.shape[0])).to(weight.dtype)
    return (one_hot[..., None] * weight).sum(-2)


def embed_eye(ids, weight):  # one-hot rows taken from an identity matrix
    return torch.eye(weight.shape[0], dtype=weight.dtype)[ids] @ weight


LENGTH_ERROR = ValueError("LearnedPositionalEmbedding: sequence length 16 exceeds max_len=8")

WRONG = [
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 1.0, "learned": 1.0}, expect=["record None", "room for 16"], id="extra-learned-with-16-rows"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 1.0, "learned": 0.1}, expect=["max_len=8 has rows for positions 0..7"], id="extra-learned-number"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 1.0, "learned": "cannot run"}, expect=["not as a string"], id="extra-learned-text"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": None, "learned": None}, expect=["max_len >= 16"], id="extra-sinusoidal-too-short"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 100.0, "learned": None}, expect=["fraction between 0 and 1"], id="extra-percent"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 0.1, "learned": None}, expect=["near chance", "*first* token"], id="extra-chance"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 0.7, "learned": None}, expect=["close to 100%"], id="extra-undertrained"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": -0.5, "learned": None}, expect=["not an accuracy"], id="extra-negative"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": "100%", "learned": None}, expect=["expected a number"], id="extra-text"),
    wrong(ex.ch06.check_extrapolation, {"sinusoidal": 1.0, "learned, max_len 8": None}, expect=["no key 'learned'"], id="extra-wrong-key"),
    wrong(ex.ch06.check_extrapolation, [1.0, None], expect=["expected a dict"], id="extra-list"),
    wrong(ex.check_sinusoidal, swapped, expect=["even columns"], id="pe-sin-cos-swapped"),
    wrong(ex.check_sinusoidal, halves, expect=["interleave"], id="pe-halves"),
    wrong(ex.check_sinusoidal, doubled_exponent, expect=["already holds 2i"], id="pe-exponent-4i"),
    wrong(ex.check_sinusoidal, positions_from_one, expect=["positions start at 0"], id="pe-positions-from-1"),
    wrong(ex.check_sinusoidal, fixed_width, expect=["[max_len, d_model]"], id="pe-fixed-width"),
    wrong(ex.check_sinusoidal, lambda n, d: torch.zeros(n, d, dtype=torch.long), expect=["float dtype"], id="pe-integer-table"),
    wrong(ex.check_sinusoidal, positional.sinusoidal_encoding, expect=["calls aimodels.positional", "yourself"], id="pe-book-function"),
    wrong(ex.check_sinusoidal, lambda n, d: positional.SinusoidalPositionalEncoding(d, n).pe, expect=["calls aimodels.positional"], id="pe-book-module"),
    wrong(ex.check_pe_norm, 64, expect=["*pair*"], id="norm-d-model"),
    wrong(ex.check_pe_norm, 1, expect=["one pair"], id="norm-one-pair"),
    wrong(ex.check_pe_norm, math.sqrt(32), expect=["squared length"], id="norm-length"),
    wrong(ex.check_embedding_matmul, lambda ids, w: F.one_hot(ids).to(w.dtype) @ w, expect=["num_classes"], id="emb-one-hot-without-num-classes"),
    wrong(ex.check_embedding_matmul, lambda ids, w: F.one_hot(ids, w.shape[0]).float() @ w, expect=["raised RuntimeError", "weight's dtype"], id="emb-float32-one-hot"),
    wrong(ex.check_embedding_matmul, lambda ids, w: F.one_hot(ids.flatten(), w.shape[0]).to(w.dtype) @ w, expect=["ids.shape + (dim,)"], id="emb-flattens-ids"),
    wrong(ex.check_embedding_matmul, lambda ids, w: 2 * embed(ids, w), expect=["values differ"], id="emb-scaled"),
    wrong(ex.check_embedding_matmul, lambda ids, w: w[ids], expect=["weight[ids]", "one-hot matrix product"], id="emb-indexing"),
    wrong(ex.check_embedding_matmul, lambda ids, w: w.detach()[ids], expect=["weight[ids]"], id="emb-indexing-a-view"),
    wrong(ex.check_embedding_matmul, lambda ids, w: w.index_select(0, ids.flatten()).view(*ids.shape, -1), expect=["weight.index_select"], id="emb-index-select"),
    wrong(ex.check_embedding_matmul, lambda ids, w: F.embedding(ids, w), expect=["calls F.embedding"], id="emb-F-embedding"),
    wrong(ex.check_embedding_matmul, lambda ids, w: nn.Embedding.from_pretrained(w)(ids), expect=["calls F.embedding"], id="emb-nn-Embedding"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_pe_norm, 64 / 2)
    accepts(capsys, ex.ch06.check_extrapolation, {"sinusoidal": 1.0, "learned": None})
    accepts(capsys, ex.ch06.check_extrapolation,
            {"sinusoidal": torch.tensor(0.968), "learned": LENGTH_ERROR, "learned, max_len 16": 1.0})
    for _ in range(3):  # the random cases change at every call
        for answer in (my_sinusoidal, tutorial_float32):
            accepts(capsys, ex.check_sinusoidal, answer)
        for answer in (embed, embed_sum, embed_eye):
            accepts(capsys, ex.check_embedding_matmul, answer)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("answer", [..., None])
def test_number_stubs_get_not_yet(capsys, answer):
    rejects(capsys, ex.check_pe_norm, answer, expect=["write your solution first"])
    rejects(capsys, ex.ch06.check_extrapolation, answer, expect=["write your solution first"])
    rejects(capsys, ex.ch06.check_extrapolation, {"sinusoidal": answer, "learned": None},
            expect=["max_len >= 16"] if answer is None else ["write your solution first"])


@pytest.mark.parametrize("check", [ex.check_sinusoidal, ex.check_embedding_matmul])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])


def test_every_chapter_6_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch06.__all__) and min(counts.values()) >= 2
