"""Chapter 7 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch import nn
from torch.nn import functional as F

from aimodels import attention
from aimodels import exercises as ex

# One wrong answer uses k.T on a batch, which torch deprecates with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")


# --------------------------------------------------------------------------- answers
def attend(q, k, v):  # the notebook's solution
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def attend_einsum(q, k, v):
    scores = torch.einsum("...ld,...sd->...ls", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("...ls,...sv->...lv", scores.softmax(-1), v)


def unscaled(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


def scaled_by_d_k(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1], -1) @ v


def scaled_by_d_v(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1]), -1) @ v


def softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -2) @ v


def k_dot_t(q, k, v):  # k.T reverses every axis of a batched tensor
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1) @ v


def float32_inside(q, k, v):
    return attend(q.float(), k.float(), v.float())


def causal_mask(n):  # the notebook's solution
    return torch.ones(n, n, dtype=torch.bool).tril()


MASKS = {1: [[True]], 2: [[True, False], [True, True]],
         5: [[j <= i for j in range(5)] for i in range(5)]}


def mha_parameters(embed_dim):  # the notebook's solution
    return 4 * embed_dim * embed_dim + 4 * embed_dim


def post_ln_forward(block, x):  # the notebook's solution
    x = block.norm1(x + block.self_attn(x, x, x, need_weights=False)[0])
    return block.norm2(x + block.feed_forward(x))


def post_ln_with_dropouts(block, x):  # the same, written like nn.TransformerEncoderLayer
    sa = block.dropout1(block.self_attn(x, x, x, need_weights=False)[0])
    x = block.norm1(x + sa)
    ff = block.linear2(block.dropout(torch.relu(block.linear1(x))))
    return block.norm2(x + block.dropout2(ff))


def post_ln_norm_inside(block, x):  # LayerNorm on the sub-layer's output only
    x = x + block.norm1(block.self_attn(x, x, x, need_weights=False)[0])
    return x + block.norm2(block.feed_forward(x))


def post_ln_no_residual(block, x):
    x = block.norm1(block.self_attn(x, x, x, need_weights=False)[0])
    return block.norm2(block.feed_forward(x))


def post_ln_norm1_twice(block, x):
    x = block.norm1(x + block.self_attn(x, x, x, need_weights=False)[0])
    return block.norm1(x + block.feed_forward(x))


def post_ln_forgets_index(block, x):  # self_attn returns (output, weights)
    x = block.norm1(x + block.self_attn(x, x, x))
    return block.norm2(x + block.feed_forward(x))


def post_ln_with_the_library(block, x):
    d, h, ff = block.linear1.in_features, block.self_attn.num_heads, block.linear1.out_features
    layer = nn.TransformerEncoderLayer(d, h, ff, dropout=0.0, batch_first=True, dtype=x.dtype)
    layer.load_state_dict(block.state_dict())
    return layer(x)


WRONG = [
    wrong(ex.check_attention, unscaled, expect=["divide the scores by sqrt(d_k)"], id="attn-unscaled"),
    wrong(ex.check_attention, scaled_by_d_k, expect=["not by d_k"], id="attn-scaled-by-d-k"),
    wrong(ex.check_attention, scaled_by_d_v, expect=["not of the values"], id="attn-scaled-by-d-v"),
    wrong(ex.check_attention, softmax_over_queries, expect=["*last* axis"], id="attn-softmax-wrong-axis"),
    wrong(ex.check_attention, k_dot_t, expect=["k.transpose(-2, -1)"], id="attn-k-dot-T"),
    wrong(ex.check_attention, float32_inside, expect=["values differ"], id="attn-float32-inside"),
    wrong(ex.check_attention, lambda q, k, v: F.scaled_dot_product_attention(q, k, v), expect=["calls F.scaled_dot_product_attention", "matrix products"], id="attn-sdpa"),
    wrong(ex.check_attention, lambda q, k, v: torch._C._nn.scaled_dot_product_attention(q, k, v), expect=["calls F.scaled_dot_product_attention"], id="attn-sdpa-alias"),
    wrong(ex.check_attention, attention.scaled_dot_product_attention, expect=["calls aimodels.attention"], id="attn-book-function"),
    wrong(ex.check_causal_mask, lambda n: ~causal_mask(n), expect=["True = masked out"], id="mask-inverted"),
    wrong(ex.check_causal_mask, lambda n: torch.ones(n, n, dtype=torch.bool).triu(), expect=["*later* keys"], id="mask-upper-triangle"),
    wrong(ex.check_causal_mask, lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), expect=["diagonal"], id="mask-no-diagonal"),
    wrong(ex.check_causal_mask, lambda n: torch.ones(n, n).tril(), expect=["dtype=torch.bool"], id="mask-float-ones"),
    wrong(ex.check_causal_mask, nn.Transformer.generate_square_subsequent_mask, expect=["additive float mask"], id="mask-additive-float"),
    wrong(ex.check_causal_mask, lambda n: torch.tensor(MASKS[n]), expect=["raised KeyError"], id="mask-hard-coded-table"),
    wrong(ex.check_mha_parameters, lambda e: 4 * mha_parameters(e), expect=["number of heads"], id="mha-times-heads"),
    wrong(ex.check_mha_parameters, lambda e: 3 * e * e + 3 * e, expect=["output one"], id="mha-no-output-projection"),
    wrong(ex.check_mha_parameters, lambda e: 4 * e * e, expect=["biases"], id="mha-no-biases"),
    wrong(ex.check_mha_parameters, lambda e: 4 * e * e + 3 * e, expect=["output projection has biases"], id="mha-no-output-bias"),
    wrong(ex.check_mha_parameters, lambda e: {4: 80, 64: 16_640, 512: 1_050_624}.get(e, 0), expect=["expected"], id="mha-hard-coded-table"),
    wrong(ex.ch07.check_post_ln, lambda block, x: block(x), expect=["pre-LN block"], id="post-ln-is-pre-ln"),
    wrong(ex.ch07.check_post_ln, post_ln_norm_inside, expect=["normalise the sum"], id="post-ln-norm-inside"),
    wrong(ex.ch07.check_post_ln, post_ln_no_residual, expect=["keep the residual"], id="post-ln-no-residual"),
    wrong(ex.ch07.check_post_ln, post_ln_norm1_twice, expect=["norm2"], id="post-ln-norm1-twice"),
    wrong(ex.ch07.check_post_ln, post_ln_forgets_index, expect=["raised TypeError", "take [0]"], id="post-ln-tuple"),
    wrong(ex.ch07.check_post_ln, lambda block, x: post_ln_forward(block, x)[:, :1], expect=["same shape"], id="post-ln-shape"),
    wrong(ex.ch07.check_post_ln, post_ln_with_the_library, expect=["calls nn.TransformerEncoderLayer"], id="post-ln-library"),
    wrong(ex.check_mha_parameters, lambda e: sum(p.numel() for p in nn.MultiheadAttention(e, 4).parameters()), expect=["calls nn.MultiheadAttention", "without building"], id="mha-builds-the-module"),
]


def test_right_answers_pass(capsys):
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_attention, attend)
        accepts(capsys, ex.check_attention, attend_einsum)
        accepts(capsys, ex.check_causal_mask, causal_mask)
        accepts(capsys, ex.check_causal_mask, lambda n: torch.tril(torch.ones(n, n)).bool())
        accepts(capsys, ex.check_mha_parameters, mha_parameters)
        accepts(capsys, ex.ch07.check_post_ln, post_ln_forward)
        accepts(capsys, ex.ch07.check_post_ln, post_ln_with_dropouts)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", [ex.check_attention, ex.check_causal_mask, ex.check_mha_parameters,
                                   ex.ch07.check_post_ln])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])
    rejects(capsys, check, ..., expect=["write your solution first"])


def test_every_chapter_7_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch07.__all__) and min(counts.values()) >= 2

