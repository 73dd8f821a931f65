"""Chapter 8 graders: the NLP pipeline (padding, BPE, rule-based translation, a trained
translator on the full range, BLEU's clipped precision)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.nn.utils import rnn as rnn_utils

from aimodels import data, text

from ._common import Library, NotYet, _report, _shape, call, fresh_rng, grader

__all__ = [
    "check_bpe_merge",
    "check_chinese_number",
    "check_clipped_precision",
    "check_full_range",
    "check_pad_batch",
]

_LIBRARY_PADDING = Library(
    task="the exercise asks you to write the padding yourself",
    hint="torch.full((batch, longest), pad_id), copy each sequence into its row from the left, "
         "and compare positions with the lengths for the mask.",
    torch={"pad_sequence": "pad_sequence"},
    python=((text.pad_batch, "aimodels.text.pad_batch"),
            (rnn_utils.pad_sequence, "torch.nn.utils.rnn.pad_sequence")),
)


def _as_tensor(got: object) -> torch.Tensor | None:
    try:
        return torch.as_tensor(got)
    except Exception:  # a ragged list or another type: reported by the caller
        return None


@grader
def check_pad_batch(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Ch. 8, exercise 1: ``fn(sequences, pad_id)`` pads to a tensor and returns the mask too.

    The ids come back as an integer tensor padded on the right, the mask as a bool tensor,
    True at real tokens. Checked on fixed and random batches, including real tokens equal
    to ``pad_id``.
    """
    rng = fresh_rng()
    cases = [([[1, 2, 3], [4]], 0), ([[7], [8, 9]], 5), ([[3, 3]], 0), ([[0, 4, 0], [0]], 0),
             ([[5, 6], [7, 8]], 1)]
    for _ in range(3):
        pad = rng.randint(0, 9)
        cases.append(([[rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
                       for _ in range(rng.randint(1, 5))], pad))
    for seqs, pad in cases:
        expected, expected_mask = text.pad_batch(seqs, pad)
        where = f"{seqs} with pad_id={pad}"
        result = call(fn, [list(s) for s in seqs], pad, library=_LIBRARY_PADDING)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise NotYet(f"{where}: expected a pair (ids, mask), got {_shape(result)}.",
                         "return both: the padded ids and the mask.")
        got, got_mask = (_as_tensor(r) for r in result)
        full = f"{where}: expected {expected.tolist()} and mask {expected_mask.tolist()}"
        if got is None or got.shape != expected.shape or not torch.equal(got, expected):
            if got is not None and got.shape == expected.shape and torch.equal(
                    got, torch.stack([row.roll(int((~m).sum())) for row, m in
                                      zip(expected, expected_mask, strict=True)])):
                hint = "pad on the right: the real tokens come first."
            elif got is None or got.shape != expected.shape:
                hint = "return a [batch, longest] tensor: pad every sequence to the longest one."
            else:
                hint = "fill with pad_id (not 0) and copy each sequence in from the left."
            raise NotYet(f"{full}; your ids differ.", hint)
        if got.is_floating_point():
            raise NotYet(f"{where}: the ids are {got.dtype}.",
                         "token ids are integers: dtype=torch.long.")
        if got_mask is None or got_mask.dtype != torch.bool or \
                not torch.equal(got_mask, expected_mask):
            if got_mask is not None and got_mask.shape == expected.shape and \
                    torch.equal(got_mask.bool(), expected != pad) and \
                    not torch.equal(expected != pad, expected_mask):
                hint = ("a real token can equal pad_id: build the mask from the lengths, "
                        "not by comparing the ids with pad_id.")
            elif got_mask is not None and got_mask.shape == expected.shape and \
                    torch.equal(got_mask.bool(), ~expected_mask):
                hint = "the mask is True at real tokens and False at padding."
            elif got_mask is not None and got_mask.dtype != torch.bool and \
                    got_mask.shape == expected.shape and torch.equal(got_mask.bool(),
                                                                     expected_mask):
                hint = "make the mask boolean (dtype=torch.bool)."
            else:
                hint = "the mask is True at real tokens: position j < length of the row."
            raise NotYet(f"{full}; your mask differs.", hint)
    return _report(True, f"padding and masks are right for all {len(cases)} batches.")


_LIBRARY_MERGE = Library(
    task="the exercise asks you to write the merge yourself",
    hint="scan left to right; at a match append new_id and skip two tokens, else copy one.",
    python=((text._merge, "the tokenizer's own _merge"), (text.BPETokenizer, "BPETokenizer")),
)


def _merge_overlapping(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """The slip that merges every position where the pair starts, overlaps included."""
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        elif not (i > 0 and (ids[i - 1], ids[i]) == pair):
            out.append(ids[i])
    return out


def _merge_digits(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """The slip that merges in the text "1 2 3" with str.replace, digits and all."""
    merged = " ".join(map(str, ids)).replace(f"{pair[0]} {pair[1]}", str(new_id))
    return [int(t) for t in merged.split()]


@grader
def check_bpe_merge(fn: Callable[[list[int], tuple[int, int], int], list[int]]) -> bool:
    """Ch. 8, exercise 2: ``fn(ids, pair, new_id)`` replaces each occurrence of ``pair``.

    Checked on fixed cases (overlaps, multi-digit ids, no match, empty) and random ones.
    """
    rng = fresh_rng()
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([1, 1, 1], (1, 1), 7), ([5], (5, 6), 8),
             ([], (1, 2), 3), ([2, 1, 2, 1], (1, 2), 4), ([11, 2, 1, 2], (1, 2), 5),
             ([3, 4, 3, 4, 3, 4], (3, 4), 6), ([4, 4, 4, 4, 4], (4, 4), 10)]
    for _ in range(4):
        ids = [rng.randint(1, 3) for _ in range(rng.randint(0, 12))]
        cases.append((ids, (rng.randint(1, 3), rng.randint(1, 3)), rng.randint(4, 300)))
    for ids, pair, new_id in cases:
        expected = list(text._merge(tuple(ids), pair, new_id))
        where = f"{ids} with {pair} -> {new_id}"
        got = call(fn, list(ids), pair, new_id, library=_LIBRARY_MERGE)
        try:
            got = [int(t) for t in got]
        except (TypeError, ValueError):
            raise NotYet(f"{where}: expected a list of ids, got {_shape(got)}.",
                         "return the new list of ids.") from None
        if got == expected:
            continue
        if got == list(ids) and expected != list(ids):
            hint = "replace each adjacent occurrence of the pair by new_id."
        elif got == list(text._merge(tuple(ids[::-1]), pair[::-1], new_id))[::-1]:
            hint = "scan from the left: in [1, 1, 1] the pair (1, 1) merges at positions 0-1."
        elif got == _merge_overlapping(ids, pair, new_id):
            hint = ("skip both tokens of a merged pair: (1, 1) in [1, 1, 1] merges once, "
                    "giving [7, 1]; pairs do not overlap.")
        elif got == _merge_digits(ids, pair, new_id):
            hint = "compare whole ids, not digits of a string: 11 is one token, not 1 and 1."
        else:
            hint = "scan left to right; at a match append new_id and skip two tokens."
        raise NotYet(f"{where}: got {got}, expected {expected}.", hint)
    return _report(True, "your merge matches the tokenizer's.")


_BOOK_NUMBERS = Library(
    task="the exercise asks you to write the rules yourself",
    hint="hundreds, then 零 for an inner zero, then tens (with 一 after 百), then units.",
    python=((data.chinese_number, "aimodels.data.chinese_number"),),
)


@grader
def check_chinese_number(fn: Callable[[int], str]) -> bool:
    """Ch. 8, exercise 3: a rule-based ``fn(n)`` for Chinese numerals, 1 <= n <= 999."""
    for n in range(1, 1000):
        expected = data.chinese_number(n)
        got = call(fn, n, library=_BOOK_NUMBERS)
        if got == expected:
            continue
        if not isinstance(got, str):
            hint = "return the numeral as a string."
        elif got == "一" + expected:
            hint = "10 to 19 on their own drop the 一: 十五, not 一十五."
        elif got.replace("零", "") == expected.replace("零", ""):
            hint = "a zero between digits is read as 零, once: 一百零五."
        elif 100 <= n and "百十" in got:
            hint = "tens after 百 keep their 一: 一百一十."
        else:
            hint = ("a zero between digits is read as 零 once; tens after 百 keep their 一 "
                    "(一百一十).")
        raise NotYet(f"n={n}: got {got!r}, expected {expected!r}.", hint)
    return _report(True, "all 999 numbers right: the rules the model had to learn.")


# --------------------------------------------------------------------------- exercise 4
_NO_RULES = Library(
    task="the exercise asks you to translate with the model you trained",
    hint="encode the English words with your source Vocab, call greedy_decode, and decode "
         "the ids with your target Vocab.",
    python=((data.chinese_number, "aimodels.data.chinese_number"),),
)


@grader
def check_full_range(translate: Callable[[list[str]], list[str]]) -> bool:
    """Ch. 8, exercise 4: ``translate(english)`` turns a list of English number words into
    a list of Chinese numerals, with a model trained on 1..999.

    Checked on the held-out numbers of ``data.number_translation_pairs(1, 999,
    test_fraction=0.2, seed=0)``: at least 90% exact match on 100..999 and at least 40% on
    1..99, where the chapter's model, trained on 100..999 only, gets none right.
    """
    test = data.number_translation_pairs(1, 999, test_fraction=0.2, seed=0)["test"]
    english = [e for _, e, _ in test]
    got = call(translate, list(english), library=_NO_RULES)
    if isinstance(got, str) or not isinstance(got, Sequence) or len(got) != len(test):
        size = f"{len(got)} items" if isinstance(got, Sequence) else _shape(got)
        raise NotYet(f"for {len(test)} English inputs, expected a list of {len(test)} "
                      f"translations, got {size}.",
                      "return one Chinese string per input, in the same order.")
    first = got[0]
    if isinstance(first, Sequence) and not isinstance(first, str) and \
            all(isinstance(c, str) for c in first):
        raise NotYet(f"{english[0]!r} -> {list(first)!r}: a list of characters.",
                     "join the characters into one string: \"\".join(chars).")
    if not all(isinstance(p, str) for p in got):
        raise NotYet(f"{english[0]!r} -> {first!r}: not a string.",
                     "decode the ids with your target Vocab and join the characters.")
    if any("<" in p for p in got):
        bad = next(p for p in got if "<" in p)
        raise NotYet(f"a translation contains a special token: {bad!r}.",
                     "Vocab.decode stops at <eos> and drops <pad> and <bos> by default.")
    if any(" " in p for p in got) and not any(" " in z for _, _, z in test):
        raise NotYet(f"{english[0]!r} -> {first!r}: Chinese numerals have no spaces.",
                     "join the characters with \"\", not \" \".")
    right = [p == z for p, (_, _, z) in zip(got, test, strict=True)]
    low = [ok for ok, (n, _, _) in zip(right, test, strict=True) if n < 100]
    high = [ok for ok, (n, _, _) in zip(right, test, strict=True) if n >= 100]
    low_acc, high_acc = sum(low) / len(low), sum(high) / len(high)
    scores = f"held-out exact match {high_acc:.1%} on 100..999 and {low_acc:.1%} on 1..99"
    if high_acc < 0.9:
        raise NotYet(f"{scores}.",
                     "the chapter's model reaches 100% on 100..999: train the same model for the "
                     "same 30 epochs, with vocabularies built from the new training pairs.")
    if low_acc < 0.4:
        raise NotYet(f"{scores}.",
                     "train on the full range, number_translation_pairs(low=1, ...): a model that "
                     "never saw a number without 'hundred' cannot translate 1..99.")
    return _report(True, f"{scores}; the model trained on 100..999 gets 0% on 1..99.")


# --------------------------------------------------------------------------- exercise 5
_NO_BLEU = Library(
    task="the exercise asks you to count the n-grams yourself",
    hint="Counter the hypothesis n-grams; clip each count by its largest count in one reference.",
    python=((text.bleu_statistics, "aimodels.text.bleu_statistics"),
            (text.corpus_bleu, "aimodels.text.corpus_bleu"),
            (text.ngram_counts, "aimodels.text.ngram_counts")),
)


def _grams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _clipped(hyp: Sequence[str], refs: Sequence[Sequence[str]], n: int, clip: str) -> tuple:
    """Reference answer (``clip="max"``) and the slips a learner makes."""
    counts = _grams(hyp, n)
    per_ref = [_grams(r, n) for r in refs]
    if clip == "max":
        limit = Counter()
        for c in per_ref:
            limit |= c
    elif clip == "sum":
        limit = sum(per_ref, Counter())
    elif clip == "none":
        return sum(k for g, k in counts.items() if any(g in c for c in per_ref)), \
            sum(counts.values())
    else:  # "distinct": each n-gram type once
        return sum(1 for g in counts if any(g in c for c in per_ref)), len(counts)
    return sum(min(k, limit[g]) for g, k in counts.items()), sum(counts.values())


def _best_single_reference(hyp: list[str], refs: list[list[str]], n: int) -> tuple[int, int]:
    """A slip: clip against each reference on its own and keep the best reference's count."""
    return max((_clipped(hyp, [ref], n, "max") for ref in refs), default=(0, 0))


@grader
def check_clipped_precision(fn: Callable[[list[str], list[list[str]], int], tuple]) -> bool:
    """Ch. 8, exercise 5: ``fn(hypothesis, references, n)`` returns BLEU's clipped n-gram
    counts ``(matches, total)`` for one sentence, ``references`` being a list of token lists.

    Checked on Papineni et al.'s "the the the ..." example, on empty and short inputs, and
    on random sentences with one to three references.
    """
    rng = fresh_rng()
    the7 = ["the"] * 7
    papineni = [["the", "cat", "is", "on", "the", "mat"],
                ["there", "is", "a", "cat", "on", "the", "mat"]]
    cases = [(the7, papineni, 1), (the7, papineni, 2), ("a b a b a".split(), [["a", "b"]], 1),
             ("a b a b".split(), [["a", "b"], ["a", "b"]], 2), ([], [["a"]], 1),
             (["a", "b"], [["a", "b"]], 3), ("x y z".split(), [["a", "b", "c"]], 1),
             (["a", "b"], [["a"], ["b"]], 1)]  # each n-gram takes its own best reference
    for _ in range(6):
        words = lambda: [rng.choice("abc") for _ in range(rng.randint(0, 9))]  # noqa: E731
        cases.append((words(), [words() for _ in range(rng.randint(1, 3))], rng.randint(1, 4)))
    for hyp, refs, n in cases:
        expected = _clipped(hyp, refs, n, "max")
        where = f"hypothesis {' '.join(hyp)!r}, references {[' '.join(r) for r in refs]}, n={n}"
        got = call(fn, list(hyp), [list(r) for r in refs], n, library=_NO_BLEU)
        try:
            got = tuple(int(x) for x in got)
            assert len(got) == 2
        except (TypeError, ValueError, AssertionError):
            raise NotYet(f"{where}: expected a pair (matches, total), got {_shape(got)}.",
                         "return two whole numbers: the clipped matches and the number of "
                         "hypothesis n-grams.") from None
        if got == expected:
            continue
        if got == _clipped(hyp, refs, n, "none"):
            hint = ("clip: an n-gram counts at most as often as it occurs in a reference, so "
                    "'the' x 7 scores 2/7, not 7/7.")
        elif got == _clipped(hyp, refs, n, "sum"):
            hint = ("clip by the largest count in any *one* reference, not the sum over the "
                    "references.")
        elif got == _clipped(hyp, refs, n, "distinct"):
            hint = "count every occurrence of an n-gram, not each distinct n-gram once."
        elif got == _best_single_reference(hyp, refs, n):
            hint = ("take the maximum count over the references separately for each n-gram: "
                    "for 'a b' against ['a'] and ['b'] both words match.")
        elif got[1] != expected[1]:
            hint = ("the total is the number of n-grams in the hypothesis: len(hypothesis) - "
                    "n + 1 (0 if shorter).")
        else:
            hint = "matches = sum over hypothesis n-grams of min(count, max count in a reference)."
        raise NotYet(f"{where}: got {got}, expected {expected}.", hint)
    return _report(True, f"clipped counts right on all {len(cases)} cases, 'the' x 7 included.")
