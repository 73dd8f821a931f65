"""Chapter 8 graders accept the right answers and reject the slips a learner makes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from grader_helpers import accepts, broken, rejects, stub, wrong
from torch.nn.utils.rnn import pad_sequence

from aimodels import data, text
from aimodels import exercises as ex
from aimodels.exercises import ch08


# --------------------------------------------------------------------------- answers
def pad(sequences, pad_id):  # the notebook's solution
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(s) for s in sequences])
    return out, torch.arange(longest)[None, :] < lengths[:, None]


def pad_lists(sequences, pad_id):  # plain lists are fine too
    longest = max(map(len, sequences))
    ids = [list(s) + [pad_id] * (longest - len(s)) for s in sequences]
    return ids, torch.tensor([[j < len(s) for j in range(longest)] for s in sequences])


def pad_left(sequences, pad_id):
    ids, mask = pad(sequences, pad_id)
    shift = (~mask).sum(1)
    return (torch.stack([r.roll(int(n)) for r, n in zip(ids, shift, strict=False)]),
            torch.stack([m.roll(int(n)) for m, n in zip(mask, shift, strict=False)]))


def mask_from_ids(sequences, pad_id):
    ids, _ = pad(sequences, pad_id)
    return ids, ids != pad_id


def inverted_mask(sequences, pad_id):
    ids, mask = pad(sequences, pad_id)
    return ids, ~mask


def integer_mask(sequences, pad_id):
    ids, mask = pad(sequences, pad_id)
    return ids, mask.long()


def pads_with_zero(sequences, pad_id):
    return pad(sequences, 0)


def float_ids(sequences, pad_id):
    ids, mask = pad(sequences, pad_id)
    return ids.float(), mask


def fixed_length(sequences, pad_id):  # pads to 8 whatever the batch
    ids = torch.full((len(sequences), 8), pad_id)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, torch.arange(8) < torch.tensor([len(s) for s in sequences])[:, None]


def uses_pad_sequence(sequences, pad_id):
    ids = pad_sequence([torch.tensor(s) for s in sequences], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(s) for s in sequences])
    return ids, torch.arange(ids.shape[1]) < lengths[:, None]


def merge(ids, pair, new_id):  # the notebook's solution
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# The slip the grader recognises: every overlapping occurrence merged, [1, 1, 1] -> [7, 7].
merge_overlapping = ch08._merge_overlapping


def merge_from_the_right(ids, pair, new_id):
    return merge(ids[::-1], pair[::-1], new_id)[::-1]


def merge_strings(ids, pair, new_id):  # digits of a string, not whole ids
    text_ = " ".join(map(str, ids)).replace(f"{pair[0]} {pair[1]}", str(new_id))
    return [int(t) for t in text_.split()]


def merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2:]
    return ids


DIGITS = "零一二三四五六七八九"


def zh(n):  # the notebook's solution
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return "十" + (DIGITS[n % 10] if n % 10 else "")
    if n < 100:
        return DIGITS[n // 10] + "十" + (DIGITS[n % 10] if n % 10 else "")
    rest = n % 100
    head = DIGITS[n // 100] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + DIGITS[rest]
    return head + DIGITS[rest // 10] + "十" + (DIGITS[rest % 10] if rest % 10 else "")


def zh_yi_shi(n):  # 一十五 for 15
    return "一" + zh(n) if 10 <= n < 20 else zh(n)


def zh_no_ling(n):
    return zh(n).replace("零", "")


def zh_bai_shi(n):  # 一百十 for 110
    return zh(n).replace("百一十", "百十")


# exercise 4: translators stand in for trained models (a lookup table is a perfect one)
TABLE = {data.english_number(n): data.chinese_number(n) for n in range(1, 1000)}


def perfect(english):
    return [TABLE[e] for e in english]


def full_range_model(english):  # about what the chapter's solution reaches: 1..99 partly
    return [TABLE[e] if " " in e or "-" in e and len(e) % 3 else "三" for e in english]


def trained_on_hundreds_only(english):  # the chapter's first model: 1..99 all wrong
    return [TABLE[e] if "hundred" in e else "一百" + TABLE[e] for e in english]


def undertrained(english):
    return [TABLE[e][:-1] if i % 4 == 0 else TABLE[e] for i, e in enumerate(english)]


def character_lists(english):
    return [list(TABLE[e]) for e in english]


def with_eos(english):
    return [TABLE[e] + "<eos>" for e in english]


def with_spaces(english):
    return [" ".join(TABLE[e]) for e in english]


def uses_the_rules(english):
    numbers = {data.english_number(n): n for n in range(1, 1000)}
    return [data.chinese_number(numbers[e]) for e in english]


# exercise 5: clipped n-gram counts
def clipped(hyp, refs, n):  # the notebook's solution
    grams = lambda tokens: Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))  # noqa: E731
    limit = Counter()
    for ref in refs:
        limit |= grams(ref)
    counts = grams(hyp)
    return sum(min(k, limit[g]) for g, k in counts.items()), sum(counts.values())


def best_single_reference(hyp, refs, n):  # clips against each reference alone, keeps the best
    return max((clipped(hyp, [ref], n) for ref in refs), default=(0, 0))


def unclipped(hyp, refs, n):
    grams = lambda tokens: [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]  # noqa: E731
    ref_grams = {g for r in refs for g in grams(r)}
    return sum(g in ref_grams for g in grams(hyp)), len(grams(hyp))


def clipped_by_sum(hyp, refs, n):
    grams = lambda tokens: Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))  # noqa: E731
    limit = sum((grams(r) for r in refs), Counter())
    counts = grams(hyp)
    return sum(min(k, limit[g]) for g, k in counts.items()), sum(counts.values())


def distinct_only(hyp, refs, n):
    grams = lambda tokens: {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}  # noqa: E731
    ref_grams = set().union(*(grams(r) for r in refs))
    return len(grams(hyp) & ref_grams), len(grams(hyp))


def total_off_by_one(hyp, refs, n):
    matches, total = clipped(hyp, refs, n)
    return matches, len(hyp) - n


def uses_bleu_statistics(hyp, refs, n):
    stats = text.bleu_statistics([hyp], [refs], max_order=n)
    return stats.matches[-1], stats.totals[-1]


WRONG = [
    wrong(ex.check_pad_batch, pad_left, expect=["on the right"], id="pad-left"),
    wrong(ex.check_pad_batch, mask_from_ids, expect=["a real token can equal pad_id"], id="pad-mask-from-ids"),
    wrong(ex.check_pad_batch, inverted_mask, expect=["True at real tokens"], id="pad-mask-inverted"),
    wrong(ex.check_pad_batch, integer_mask, expect=["boolean"], id="pad-integer-mask"),
    wrong(ex.check_pad_batch, pads_with_zero, expect=["pad_id (not 0)"], id="pad-with-zero"),
    wrong(ex.check_pad_batch, float_ids, expect=["integers"], id="pad-float-ids"),
    wrong(ex.check_pad_batch, fixed_length, expect=["longest"], id="pad-fixed-length"),
    wrong(ex.check_pad_batch, lambda seqs, pad_id: pad(seqs, pad_id)[0], expect=["expected a pair"], id="pad-no-mask"),
    wrong(ex.check_pad_batch, uses_pad_sequence, expect=["calls torch.nn.utils.rnn.pad_sequence", "write the padding yourself"], id="pad-pad-sequence"),
    wrong(ex.check_pad_batch, text.pad_batch, expect=["calls aimodels.text.pad_batch"], id="pad-book-function"),
    wrong(ex.check_bpe_merge, lambda ids, pair, new_id: ids, expect=["replace each"], id="bpe-unchanged"),
    wrong(ex.check_bpe_merge, merge_overlapping, expect=["do not overlap"], id="bpe-overlapping"),
    wrong(ex.check_bpe_merge, merge_from_the_right, expect=["from the left"], id="bpe-right-to-left"),
    wrong(ex.check_bpe_merge, merge_strings, expect=["11 is one token"], id="bpe-string-replace"),
    wrong(ex.check_bpe_merge, merge_first_only, expect=["at a match"], id="bpe-first-only"),
    wrong(ex.check_bpe_merge, lambda ids, pair, new_id: list(text._merge(tuple(ids), pair, new_id)), expect=["calls the tokenizer's own _merge"], id="bpe-book-function"),
    wrong(ex.check_chinese_number, zh_yi_shi, expect=["十五, not 一十五"], id="zh-yi-shi"),
    wrong(ex.check_chinese_number, zh_no_ling, expect=["零"], id="zh-no-ling"),
    wrong(ex.check_chinese_number, zh_bai_shi, expect=["一百一十"], id="zh-bai-shi"),
    wrong(ex.check_chinese_number, lambda n: zh(n).replace("二百", "两百"), expect=["n=200"], id="zh-liang"),
    wrong(ex.check_chinese_number, lambda n: n, expect=["string"], id="zh-returns-int"),
    wrong(ex.check_chinese_number, data.chinese_number, expect=["calls aimodels.data.chinese_number"], id="zh-book-function"),
    wrong(ch08.check_full_range, trained_on_hundreds_only, expect=["0.0% on 1..99", "low=1"], id="range-hundreds-only"),
    wrong(ch08.check_full_range, undertrained, expect=["on 100..999", "30 epochs"], id="range-undertrained"),
    wrong(ch08.check_full_range, character_lists, expect=["join the characters"], id="range-char-lists"),
    wrong(ch08.check_full_range, with_eos, expect=["special token"], id="range-eos"),
    wrong(ch08.check_full_range, with_spaces, expect=["no spaces"], id="range-spaces"),
    wrong(ch08.check_full_range, lambda english: perfect(english)[:-1], expect=["got 199 items"], id="range-one-missing"),
    wrong(ch08.check_full_range, lambda english: "".join(perfect(english)), expect=["a list of 200"], id="range-one-string"),
    wrong(ch08.check_full_range, uses_the_rules, expect=["calls aimodels.data.chinese_number", "model you trained"], id="range-rules"),
    wrong(ch08.check_clipped_precision, unclipped, expect=["2/7"], id="clip-none"),
    wrong(ch08.check_clipped_precision, clipped_by_sum, expect=["*one* reference"], id="clip-sum"),
    wrong(ch08.check_clipped_precision, best_single_reference, expect=["separately for each n-gram"], id="clip-best-reference"),
    wrong(ch08.check_clipped_precision, distinct_only, expect=["every occurrence"], id="clip-distinct"),
    wrong(ch08.check_clipped_precision, total_off_by_one, expect=["len(hypothesis) - n + 1"], id="clip-total"),
    wrong(ch08.check_clipped_precision, lambda hyp, refs, n: clipped(hyp, refs, n)[0], expect=["a pair"], id="clip-no-total"),
    wrong(ch08.check_clipped_precision, uses_bleu_statistics, expect=["calls aimodels.text.bleu_statistics"], id="clip-book-function"),
]


def test_right_answers_pass(capsys):
    accepts(capsys, ex.check_chinese_number, zh)
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, ex.check_pad_batch, pad)
        accepts(capsys, ex.check_pad_batch, pad_lists)
        accepts(capsys, ex.check_bpe_merge, merge)
        accepts(capsys, ex.check_bpe_merge, lambda ids, pair, new_id: tuple(merge(ids, pair, new_id)))
        accepts(capsys, ch08.check_clipped_precision, clipped)
        accepts(capsys, ch08.check_clipped_precision, lambda h, r, n: list(clipped(h, r, n)))
    accepts(capsys, ch08.check_full_range, perfect)
    accepts(capsys, ch08.check_full_range, full_range_model)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", [ex.check_pad_batch, ex.check_bpe_merge, ex.check_chinese_number,
                                   ch08.check_full_range, ch08.check_clipped_precision])
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])


def test_every_chapter_8_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch08.__all__) and min(counts.values()) >= 2
