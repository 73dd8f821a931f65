"""Chapter 6 graders: embeddings and positional encodings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch.nn import functional as F  # noqa: N812

from aimodels import positional

from ._common import (
    STUB_HINT,
    Library,
    NotYet,
    _close,
    _expect_tensor,
    _grade_number,
    _number,
    _report,
    call,
    fresh_rng,
    grader,
    torch_generator,
)

__all__ = ["check_embedding_matmul", "check_extrapolation", "check_pe_norm", "check_sinusoidal"]

_BOOK_ENCODING = Library(
    task="the exercise asks you to build the table yourself",
    hint="PE[p, 2i] = sin(p w_i) and PE[p, 2i+1] = cos(p w_i), with w_i = 10000^(-2i/d_model).",
    python=((positional, "aimodels.positional"),),
)


def _variants(max_len: int, d: int) -> dict[str, torch.Tensor]:
    """The tables that common slips produce, each with its hint."""
    p = torch.arange(max_len, dtype=torch.float64)[:, None]
    pairs = torch.arange(0, d, 2, dtype=torch.float64)
    right = positional.sinusoidal_encoding(max_len, d, dtype=torch.float64)
    swapped = torch.stack([right[:, 1::2], right[:, 0::2]], -1).reshape(max_len, d)
    halves = torch.cat([right[:, 0::2], right[:, 1::2]], 1)
    angles = p * 10000 ** (-2 * pairs / d)  # 2i counted twice: exponent 4i/d
    doubled = torch.stack([torch.sin(angles), torch.cos(angles)], -1).reshape(max_len, d)
    shifted = positional.sinusoidal_encoding(max_len + 1, d, dtype=torch.float64)[1:]
    return {
        "sin goes in the even columns 2i and cos in the odd ones 2i+1.": swapped,
        "interleave the columns: sin in column 2i, cos in 2i+1, not all sines then all "
        "cosines.": halves,
        "the exponent is 2i/d_model with i the index of the (sin, cos) pair; arange(0, d, 2) "
        "already holds 2i.": doubled,
        "positions start at 0: the first row is sin(0) = 0, cos(0) = 1.": shifted,
    }


@grader
def check_sinusoidal(fn: Callable[[int, int], torch.Tensor]) -> bool:
    """Ch. 6, exercise 1: ``fn(max_len, d_model)`` returns the sinusoidal table.

    Checked on fixed and random sizes (``d_model`` even), in any float dtype, to 1e-4.
    The book's own ``aimodels.positional`` is not allowed.
    """
    rng = fresh_rng()
    cases = [(4, 2), (10, 8), (50, 64), (1, 6), (7, 12)]
    cases += [(rng.randint(1, 64), 2 * rng.randint(1, 32)) for _ in range(3)]
    for max_len, d in cases:
        expected = positional.sinusoidal_encoding(max_len, d, dtype=torch.float64)
        where = f"max_len={max_len}, d_model={d}"
        got = call(fn, max_len, d, library=_BOOK_ENCODING)
        got = _expect_tensor(got, (max_len, d), where,
                             "one row per position, one column per dimension: [max_len, d_model].")
        if not got.is_floating_point():
            raise NotYet(f"{where}: got a {got.dtype} tensor.",
                         "the table holds sines and cosines: use a float dtype.")
        if _close(got, expected, 1e-4):
            continue
        hint = next((h for h, table in _variants(max_len, d).items() if _close(got, table, 1e-4)),
                    "PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i), w_i = 10000^(-2i/d_model).")
        raise NotYet(f"values differ for {where}.", hint)
    return _report(True, "your table matches the formula.")


@grader
def check_pe_norm(answer: object) -> bool:
    """Ch. 6, exercise 2: the squared length PE(p)·PE(p) for d_model = 64, at any position."""
    return _grade_number(
        "PE(p)·PE(p)", answer, 32.0,
        {64.0: "each (sin, cos) *pair* contributes sin² + cos² = 1, and there are d/2 pairs.",
         1.0: "that is one pair; there are d_model / 2 of them.",
         math.sqrt(32): "that is the length; the question asks for the squared length.",
         0.0: "sin² + cos² = 1 for every pair: the squares do not cancel."},
        rel=1e-9,
    )


def _looks_up(weight: torch.Tensor) -> Callable[[Callable, tuple], str | None]:
    """Flags ``weight[ids]``, ``weight.index_select(...)`` and the like on this matrix
    (or on a copy of it, such as ``weight.double()``)."""

    def is_weight(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.shape == weight.shape and (
            t.data_ptr() == weight.data_ptr() or torch.equal(t.detach().to(weight.dtype), weight))

    def check(func: Callable, args: tuple) -> str | None:
        name = getattr(func, "__name__", "")
        if name not in {"__getitem__", "index_select", "take", "gather", "take_along_dim"}:
            return None
        index = args[1] if len(args) > 1 else None
        if name == "__getitem__" and not (isinstance(index, torch.Tensor)
                                          and not index.is_floating_point()
                                          and index.dtype != torch.bool):
            return None
        if args and is_weight(args[0]):
            return "weight[ids]" if name == "__getitem__" else f"weight.{name}"
        return None

    return check


@grader
def check_embedding_matmul(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Ch. 6, exercise 3: ``fn(ids, weight)`` equals ``F.embedding`` via a one-hot product.

    Checked for ids of several shapes (some that never use the last rows), float32 and
    float64 weights; a lookup (``F.embedding``, ``nn.Embedding``, ``weight[ids]``) is
    not allowed.
    """
    rng = fresh_rng()
    g = torch_generator(rng)
    cases = [(11, 5, (7,), torch.float64, 11), (11, 5, (2, 3), torch.float64, 11),
             (9, 4, (4, 1), torch.float32, 9), (12, 3, (3, 2, 2), torch.float64, 5),
             (rng.randint(2, 30), rng.randint(1, 8), (rng.randint(1, 5), rng.randint(1, 5)),
              rng.choice([torch.float32, torch.float64]), None)]
    for vocab, dim, shape, dtype, high in cases:
        weight = torch.randn(vocab, dim, generator=g, dtype=dtype)
        ids = torch.randint(0, high or vocab, shape, generator=g)
        if high is None or high == vocab:
            ids.view(-1)[0] = vocab - 1  # the last row is used at least once
        expected = F.embedding(ids, weight)
        where = f"ids of shape {tuple(shape)}, weight {tuple(weight.shape)} ({dtype})"
        weight_arg = weight.clone()
        lookup = Library(task="the exercise asks for a one-hot matrix product",
                         hint="F.one_hot(ids, num_classes=weight.shape[0]), in the weight's "
                              "dtype, times weight.",
                         torch={"embedding": "F.embedding", "embedding_bag": "F.embedding_bag"},
                         check=_looks_up(weight_arg))
        got = call(fn, ids.clone(), weight_arg, library=lookup,
                   hint="convert the one-hot matrix to the weight's dtype (.to(weight.dtype)) "
                        "and give one_hot num_classes=weight.shape[0].")
        got = _expect_tensor(got, tuple(expected.shape), where,
                             "one_hot(ids, vocab) has shape ids.shape + (vocab,); times weight "
                             "gives ids.shape + (dim,).")
        if not _close(got, expected, 1e-12 if dtype == torch.float64 else 1e-6):
            raise NotYet(f"values differ for {where}.",
                         "F.one_hot(ids, num_classes=weight.shape[0]) as float, times weight "
                         "(one-hot on the left).")
    return _report(True, "one-hot times the matrix is the embedding lookup.")


_CANNOT_RUN = "None (the model cannot run at that length)"


def _cannot_run(value: object) -> bool:
    """None, or the exception the model raised, both mean "cannot run at this length"."""
    return value is None or isinstance(value, Exception)


@grader
def check_extrapolation(results: object) -> bool:
    """Ch. 6, exercise 4: accuracies at length 16 of position probes trained on length 8.

    ``results["sinusoidal"]`` is the test accuracy (a fraction) on 16-token sequences of
    the probe with the sinusoidal encoding; ``results["learned"]`` is that of the probe
    whose learned table was built with ``max_len=8``, or None (or the exception it
    raised) when it cannot run. Trained as in the chapter, the sinusoidal probe keeps at
    least 90% (the chapter measures 100%); other keys are ignored.
    """
    if results is Ellipsis or results is None:
        blank = "..." if results is Ellipsis else "None"
        raise NotYet(f"no answer yet (results is still {blank}).", STUB_HINT)
    if not isinstance(results, Mapping):
        raise NotYet(f"expected a dict, got {type(results).__name__} {results!r:.40}.",
                     'pass {"sinusoidal": accuracy, "learned": accuracy or None}.')
    missing = [key for key in ("sinusoidal", "learned") if key not in results]
    if missing:
        raise NotYet(f"results has no key {missing[0]!r} (keys: {sorted(map(str, results))}).",
                     'use the keys "sinusoidal" and "learned" (the table with max_len=8).')

    learned = results["learned"]
    if isinstance(learned, str):
        raise NotYet(f'results["learned"] is the text {learned!r}.',
                     "record a model that cannot run at this length as None (or the exception "
                     "it raised), not as a string.")
    if not _cannot_run(learned):
        value = _number('results["learned"]', learned)
        raise NotYet(f'results["learned"] = {value:.4g}, an accuracy.',
                     "a learned table built with max_len=8 has rows for positions 0..7 only: "
                     "on 16 tokens the model raises ValueError, so record None. A number "
                     "means your table had room for 16 positions.")

    sinusoidal = results["sinusoidal"]
    if _cannot_run(sinusoidal):
        raise NotYet(f'results["sinusoidal"] is {_CANNOT_RUN}.',
                     "the sinusoidal encoding is a formula defined at every position: build "
                     "the module with max_len >= 16 (the chapter uses 64) and it runs.")
    value = _number('results["sinusoidal"]', sinusoidal)
    if 1 < value <= 100:
        raise NotYet(f'results["sinusoidal"] = {value:.4g}.',
                     "give the accuracy as a fraction between 0 and 1 (1.0 for 100%).")
    if not 0 <= value <= 1:
        raise NotYet(f'results["sinusoidal"] = {value:.4g} is not an accuracy.',
                     "an accuracy is the fraction of sequences classified correctly, in [0, 1].")
    if value < 0.3:
        raise NotYet(f'results["sinusoidal"] = {value:.1%}, near chance (10 tokens: 10%).',
                     "label each 16-token sequence with its *first* token, tokens[:, 0], and "
                     "train the probe on length 8 before testing it.")
    if value < 0.9:
        raise NotYet(f'results["sinusoidal"] = {value:.1%}.',
                     "the probe needs only position 0, whose encoding is the same at any "
                     "length: train it as in the chapter (8 epochs, Adam, lr 3e-3) and expect "
                     "close to 100%.")
    return _report(True, f"the sinusoidal probe keeps {value:.0%} at length 16; the learned "
                         "table with max_len=8 has no row for position 8.")
