"""Chapter 7 graders: attention and the Transformer."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from aimodels import attention, scaling, transformer

from ._common import (
    Library,
    NotYet,
    _close,
    _expect_tensor,
    _report,
    _whole_number,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

__all__ = ["check_attention", "check_causal_mask", "check_mha_parameters", "check_post_ln"]

_TORCH_ATTENTION = Library(
    task="the exercise asks you to write it from matrix products and a softmax",
    hint="softmax(q @ k.transpose(-2, -1) / sqrt(d_k), dim=-1) @ v.",
    torch={"scaled_dot_product_attention": "F.scaled_dot_product_attention",
           "multi_head_attention_forward": "nn.MultiheadAttention",
           "_scaled_dot_product_attention_math": "F.scaled_dot_product_attention"},
    python=((attention, "aimodels.attention"),),
)


def _attention_cases(rng) -> list[tuple]:  # noqa: ANN001
    """(shape of q, shape of k, d_v, dtype): L != S, d_k != d_v, 2-D to 4-D, both dtypes."""
    f64, f32 = torch.float64, torch.float32
    cases = [((3, 4), (5, 4), 2, f64), ((2, 6, 8), (2, 6, 8), 8, f64),
             ((1, 2, 1, 16), (1, 2, 9, 16), 3, f64), ((2, 3, 5), (2, 7, 5), 6, f32)]
    for dtype in (f64, f32):
        lead = tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 2)))
        d_k = rng.randint(1, 16)
        cases.append(((*lead, rng.randint(1, 7), d_k), (*lead, rng.randint(1, 7), d_k),
                      rng.randint(1, 8), dtype))
    return cases


@grader
def check_attention(fn: Callable[..., torch.Tensor]) -> bool:
    """Ch. 7, exercise 1: ``fn(q, k, v)`` is unmasked scaled dot-product attention.

    Checked with any number of leading dimensions, L != S and d_k != d_v, in float32 and
    float64; ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` are not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    for shape_q, shape_k, dv, dtype in _attention_cases(rng):
        q = torch.randn(shape_q, generator=g, dtype=dtype)
        k = torch.randn(shape_k, generator=g, dtype=dtype)
        v = torch.randn(*shape_k[:-1], dv, generator=g, dtype=dtype)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        where = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({dtype})"
        got = call(fn, q.clone(), k.clone(), v.clone(), library=_TORCH_ATTENTION,
                   hint="transpose the last two axes of k with k.transpose(-2, -1): k.T "
                        "reverses every axis of a batched tensor.")
        got = _expect_tensor(got, tuple(expected.shape), where,
                             "the weights [..., L, S] times v [..., S, d_v] give [..., L, d_v].")
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        if _close(got, expected, tol):
            continue
        scores = q @ k.transpose(-2, -1)
        slips = {
            "divide the scores by sqrt(d_k) before the softmax.": torch.softmax(scores, -1),
            "divide by sqrt(d_k), not by d_k.": torch.softmax(scores / q.shape[-1], -1),
            "the scale is 1/sqrt(d_k), the size of the queries and keys, not of the values.":
                torch.softmax(scores / math.sqrt(dv), -1),
            "softmax over the *last* axis (the keys), so that each query's weights sum to 1.":
                torch.softmax(scores / math.sqrt(q.shape[-1]), -2),
        }
        hint = next((h for h, w in slips.items() if w.shape[-1] == v.shape[-2]
                     and _close(got, w @ v, tol)),
                    "softmax over the last axis (the keys) of q @ k^T / sqrt(d_k), times v.")
        raise NotYet(f"values differ for {where}.", hint)
    return _report(True, "your attention matches F.scaled_dot_product_attention.")


@grader
def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> bool:
    """Ch. 7, exercise 2: ``fn(n)`` is the bool ``[n, n]`` mask, True where attention is allowed.

    Checked for fixed and random sizes.
    """
    rng = fresh_rng()
    for n in (5, 1, 2, rng.randint(3, 40), rng.randint(3, 40)):
        expected = torch.ones(n, n, dtype=torch.bool).tril()
        where = f"n={n}"
        got = _expect_tensor(call(fn, n), (n, n), where,
                             "one row per query and one column per key: [n, n].")
        if got.dtype != torch.bool:
            if got.is_floating_point() and bool(torch.isinf(got).any()):
                hint = ("that is an additive float mask (0 and -inf); the exercise wants a bool "
                        "mask, True where attention is allowed.")
            else:
                hint = "make it boolean: dtype=torch.bool, or .bool() at the end."
            raise NotYet(f"{where}: got a {got.dtype} tensor.", hint)
        if torch.equal(got, expected):
            continue
        if torch.equal(got, ~expected):
            hint = ("that is the PyTorch module convention (True = masked out); here True means "
                    "allowed.")
        elif torch.equal(got, expected.T):
            hint = "that lets each query see the *later* keys: use the lower triangle (tril)."
        elif torch.equal(got, expected.tril(-1)):
            hint = "include the diagonal: query i may see key i itself."
        else:
            hint = "query i may see keys 0..i: the lower triangle, diagonal included."
        raise NotYet(f"{where}: wrong mask.", hint)
    return _report(True, "position i sees positions 0..i.")


_BUILDS_MHA = Library(
    task="the exercise asks you to count from embed_dim, without building the module",
    hint="four E x E projections (query, key, value, output), each with E biases.",
    python=((nn.MultiheadAttention, "nn.MultiheadAttention"),
            (attention.MultiHeadAttention, "aimodels.attention.MultiHeadAttention"),
            (scaling.count_parameters, "count_parameters")),
)


@grader
def check_mha_parameters(fn: Callable[[int], int]) -> bool:
    """Ch. 7, exercise 3: ``fn(embed_dim)`` counts ``nn.MultiheadAttention``'s parameters.

    Checked for fixed and random ``embed_dim`` against torch's own count (4 heads).
    """
    rng = fresh_rng()
    for e in (4, 64, 512, 4 * rng.randint(2, 300), 4 * rng.randint(2, 300)):
        expected = scaling.count_parameters(nn.MultiheadAttention(e, 4, device="meta"))
        where = f"embed_dim={e}"
        got = _whole_number(where, call(fn, e, library=_BUILDS_MHA))
        if got == expected:
            continue
        slips = {4 * expected: "the number of heads does not change the count: the heads split "
                               "the same E x E projections.",
                 3 * e * e + 3 * e: "there is a fourth projection: the output one.",
                 4 * e * e: "each projection also has E biases.",
                 4 * e * e + 3 * e: "the output projection has biases too."}
        raise NotYet(f"{where}: got {got}, expected {expected}.", slips.get(
            got, "four E x E projections (query, key, value, output), each with E biases."))
    return _report(True, "4E² + 4E, whatever the number of heads.")


_TORCH_POST_LN = Library(
    task="the exercise asks you to write the post-LN forward pass from the block's parts",
    hint="x = block.norm1(x + block.self_attn(x, x, x, need_weights=False)[0]), then "
         "block.norm2(x + block.feed_forward(x)).",
    python=((nn.TransformerEncoderLayer, "nn.TransformerEncoderLayer"),),
)


def _random_block(d_model: int, nhead: int, dim_feedforward: int,
                  g: torch.Generator) -> nn.Module:
    """An ``EncoderBlock`` in float64 with random weights, its LayerNorms far from identity."""
    block = transformer.EncoderBlock(d_model, nhead, dim_feedforward, dropout=0.0).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name.startswith("norm") and name.endswith("weight"):
                p.add_(1.0)
    return block


def _post_ln_slips(block: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs that common slips produce, each with its hint."""
    def sa(h: torch.Tensor) -> torch.Tensor:
        return block.self_attn(h, h, h, need_weights=False)[0]

    with torch.no_grad():
        inside = x + block.norm1(sa(x))
        no_residual = block.norm1(sa(x))
        return {
            "that is the pre-LN block (LayerNorm before each sub-layer): post-LN normalises "
            "after the residual addition, x = norm1(x + SA(x)).": block(x),
            "normalise the sum x + SA(x), not only the sub-layer's output: in post-LN the "
            "LayerNorm comes after the residual addition.":
                inside + block.norm2(block.feed_forward(inside)),
            "keep the residual connections: add each sub-layer's input back before the "
            "LayerNorm.": block.norm2(block.feed_forward(no_residual)),
            "the second LayerNorm is norm2, applied after the feed-forward residual.":
                block.norm1(block.norm1(x + sa(x)) + block.feed_forward(block.norm1(x + sa(x)))),
        }


@grader
def check_post_ln(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> bool:
    """Ch. 7, exercise 4: ``fn(block, x)`` is the post-LN forward pass of an ``EncoderBlock``.

    ``block`` is our pre-LN ``EncoderBlock`` (dropout 0); the answer must equal
    ``nn.TransformerEncoderLayer(norm_first=False)`` holding the same weights, for random
    sizes and weights in float64 (LayerNorms far from the identity). Calling
    ``nn.TransformerEncoderLayer`` is not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    cases = [(8, 2, 16, 2, 5), (16, 4, 12, 1, 1), (12, 3, 24, 3, 7)]
    cases.append((4 * rng.randint(1, 6), rng.choice([1, 2, 4]), rng.randint(4, 40),
                  rng.randint(1, 3), rng.randint(2, 9)))
    for d_model, nhead, ff, batch, length in cases:
        block = _random_block(d_model, nhead, ff, g)
        reference = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, norm_first=False,
                                               batch_first=True, dtype=torch.float64)
        reference.load_state_dict(block.state_dict())
        x = torch.randn(batch, length, d_model, generator=g, dtype=torch.float64)
        with torch.no_grad():
            expected = reference(x)
        where = f"d_model={d_model}, nhead={nhead}, x of shape {tuple(x.shape)}"
        student_block = copy.deepcopy(block)
        got = call(fn, student_block, x.clone(), library=_TORCH_POST_LN,
                   hint="block.self_attn(x, x, x) returns (output, weights): take [0].")
        got = _expect_tensor(got, tuple(x.shape), where,
                             "the block maps [batch, length, d_model] to the same shape.")
        if _close(got, expected, 1e-9):
            continue
        hint = next((h for h, out in _post_ln_slips(block, x).items() if _close(got, out, 1e-9)),
                    "x = norm1(x + SA(x)), then norm2(x + FFN(x)): each LayerNorm follows its "
                    "residual addition.")
        raise NotYet(f"values differ for {where}.", hint)
    return _report(True, "your post-LN forward pass matches "
                         "nn.TransformerEncoderLayer(norm_first=False).")
