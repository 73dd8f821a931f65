"""Chapter 13 graders: they accept a right answer and reject the slips a learner makes."""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
from collections import Counter

import pytest
from grader_helpers import accepts, broken, rejects, stub, wrong

from aimodels import exercises as ex
from aimodels.exercises import ch13


# --------------------------------------------------------------------------- answers
def kv_blocks(lengths, block_size):  # the notebook's solution
    return sum(-(-n // block_size) for n in lengths)


def ridge_batch(n_params, bytes_per_param, kv_bytes, peak_flops, bandwidth):  # the notebook's
    ridge = peak_flops / bandwidth
    room = 2 * n_params - ridge * kv_bytes  # B * room >= ridge * bytes_per_param * n_params
    if room <= 0:
        return None
    return max(1, math.ceil(ridge * bytes_per_param * n_params / room))


def ridge_by_search(n_params, bytes_per_param, kv_bytes, peak_flops, bandwidth):
    """The definition, step by step (after checking that the limit lies above the ridge)."""
    ridge = peak_flops / bandwidth
    if kv_bytes and 2 * n_params / kv_bytes <= ridge:
        return None

    def intensity(batch):
        return 2 * batch * n_params / (bytes_per_param * n_params + batch * kv_bytes)

    batch = 1
    while intensity(batch) < ridge:
        batch *= 2
    low = batch // 2  # intensity(low) < ridge <= intensity(batch), or batch == 1
    while batch - low > 1:
        middle = (low + batch) // 2
        low, batch = (low, middle) if intensity(middle) >= ridge else (middle, batch)
    return batch


def ridge_without_kv(n, b, k, p, w):  # chapter 13's first formula: the weights only
    return max(1, math.ceil(p * b / (2 * w)))


def ridge_kv_once(n, b, k, p, w):  # one cache for the whole batch
    return max(1, math.ceil(p / w * (b * n + k) / (2 * n)))


def ridge_never_forgotten(n, b, k, p, w):  # the formula without the "no batch" case
    return max(1, math.ceil(p / w * b * n / (2 * n - p / w * k)))


def static_steps(lengths, max_batch):
    return sum(max(lengths[i:i + max_batch]) for i in range(0, len(lengths), max_batch))


def continuous_steps(lengths, max_batch):  # with a heap of finishing steps
    finishing, start = [], 0
    for length in lengths:
        if len(finishing) == max_batch:
            start = heapq.heappop(finishing)
        heapq.heappush(finishing, start + length)
    return max(finishing, default=0)


def simulate(lengths, max_batch, *, refill=True, admit_first=False):
    """Brute force, one decoding step at a time. ``refill=False`` admits only into an
    empty batch (static batching); ``admit_first`` removes the finished sequences at the
    start of the next step, but only after filling the free slots (a slip)."""
    queue, running, steps = list(lengths), [], 0
    while queue or running:
        if refill or not running:
            while queue and len(running) < max_batch:
                running.append(queue.pop(0))
        if admit_first:
            running = [r for r in running if r > 0]
            if not running and not queue:
                break
        running = [r - 1 for r in running]
        steps += 1
        if not admit_first:
            running = [r for r in running if r > 0]
    return steps


def parse_sse(raw):
    events, data = [], []
    for line in raw.splitlines():
        if not line:
            if data:
                text, data = "\n".join(data), []
                if text == "[DONE]":
                    break
                events.append(json.loads(text))
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
    return events


def parse_sse_normalised(raw):  # every line end made "\n" first, then split on blank lines
    events = []
    for block in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line.startswith("data:")]
        if not lines:
            continue
        text = "\n".join(line[5:].removeprefix(" ") for line in lines)
        if text == "[DONE]":
            break
        events.append(json.loads(text))
    return events


def shared_prefix_blocks(cached, prompt, block_size):
    common = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        common += 1
    return min(common // block_size, (len(prompt) - 1) // block_size)


def shared_by_blocks(cached, prompt, block_size):  # block by block, as a prefix cache walks
    blocks = 0
    while (blocks + 1) * block_size <= len(prompt) - 1 and \
            cached[blocks * block_size:(blocks + 1) * block_size] == \
            prompt[blocks * block_size:(blocks + 1) * block_size]:
        blocks += 1
    return blocks


# --------------------------------------------------------------------------- slips
def sse_split_on_blank_lines(raw):  # right, except that only "\n\n" ends an event
    events = []
    for block in raw.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n")
                if line.startswith("data:")]
        if not data:
            continue
        text = "\n".join(data)
        if text == "[DONE]":
            break
        events.append(json.loads(text))
    return events


def sse_assumes_the_space(raw):
    events = []
    for block in raw.split("\n\n"):
        if block.startswith("data: [DONE]"):
            break
        if block.startswith("data:"):
            events.append(json.loads(block[6:]))
    return events


def sse_keeps_the_space(raw):
    events, data = [], []
    for line in raw.splitlines():
        if not line and data:
            text, data = "\n".join(data), []
            if text == "[DONE]":
                break
            events.append(json.loads(text))
        elif line.startswith("data:"):
            data.append(line[5:])
    return events


def sse_with_done(raw):
    events = parse_sse(raw.split("data: [DONE]")[0])
    return [*events, "[DONE]"]


def sse_last_data_line(raw):  # one data line per event: the last one wins
    events, data = [], None
    for line in raw.splitlines():
        if not line and data is not None:
            if data == "[DONE]":
                break
            events.append(json.loads(data))
            data = None
        elif line.startswith("data:"):
            data = line[5:].removeprefix(" ")
    return events


def sse_reads_on(raw):  # skips [DONE] instead of stopping there
    return [event for part in raw.split("data: [DONE]") for event in parse_sse(part + "\n\n")]


def sse_strings(raw):
    return [json.dumps(event) for event in parse_sse(raw)]


def lcp(cached, prompt):
    common = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        common += 1
    return common


def blocks_of(tokens, block_size):
    return [tokens[i:i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size)]


def same_place_blocks(cached, prompt, block_size):  # no stop at the first difference
    matches = sum(a == b for a, b in zip(blocks_of(cached, block_size),
                                         blocks_of(prompt, block_size), strict=False))
    return min(matches, (len(prompt) - 1) // block_size)


def blocks_anywhere(cached, prompt, block_size):  # a hash of each block alone
    known = {tuple(block) for block in blocks_of(cached, block_size)}
    found = sum(tuple(block) in known for block in blocks_of(prompt, block_size))
    return min(found, (len(prompt) - 1) // block_size)


def continuous_late(lengths, max_batch):
    finishing, start = [], 0
    for length in lengths:
        if len(finishing) == max_batch:
            start = heapq.heappop(finishing) + 1  # "free from the step after next"
        heapq.heappush(finishing, start + length)
    return max(finishing, default=0)


def continuous_early(lengths, max_batch):
    finishing, start = [], 0
    for length in lengths:
        if len(finishing) == max_batch:
            start = heapq.heappop(finishing) - 1  # reused in the step it finishes
        heapq.heappush(finishing, start + length)
    return max(finishing, default=0)


def ceil_total(lengths, max_batch):
    return math.ceil(sum(lengths) / max_batch)


WRONG = [
    wrong(ex.check_kv_blocks, lambda ls, b: sum(n // b for n in ls), expect=["round up"], id="kv-floor"),
    wrong(ex.check_kv_blocks, lambda ls, b: math.ceil(sum(ls) / b), expect=["per sequence"], id="kv-ceil-of-total"),
    wrong(ex.check_kv_blocks, lambda ls, b: sum(n // b + 1 for n in ls), expect=["one block too many"], id="kv-off-by-one"),
    wrong(ex.check_kv_blocks, lambda ls, b: sum(n // b + 1 for n in ls if n), expect=["fills its last block"], id="kv-multiple"),
    wrong(ex.check_kv_blocks, lambda ls, b: sum(max(1, math.ceil(n / b)) for n in ls), expect=["length 0"], id="kv-zero-length"),
    wrong(ex.check_kv_blocks, lambda ls, b: sum(n / b for n in ls), expect=["not a whole number"], id="kv-true-division"),
    wrong(ex.check_ridge_batch, ridge_without_kv, expect=["its own kv_bytes", "got 201, expected 255"], id="ridge-without-kv"),
    wrong(ex.check_ridge_batch, ridge_kv_once, expect=["not kv_bytes once"], id="ridge-kv-once"),
    wrong(ex.check_ridge_batch, ridge_never_forgotten, expect=["expected None", "never passes it"], id="ridge-never-forgotten"),
    wrong(ex.check_ridge_batch, lambda n, b, k, p, w: None if 2 * n <= p / w * k else max(1, math.floor(p / w * b * n / (2 * n - p / w * k))), expect=["round up"], id="ridge-floor"),
    wrong(ex.check_ridge_batch, lambda n, b, k, p, w: None if n <= p / w * k else max(1, math.ceil(p / w * b * n / (n - p / w * k))), expect=["2 FLOPs per parameter"], id="ridge-no-factor-2"),
    wrong(ex.check_ridge_batch, lambda n, b, k, p, w: None if 2 * n <= p / w * k else max(1, math.ceil(p / w * n / (2 * n - p / w * k))), expect=["bytes_per_param × n_params"], id="ridge-no-bytes"),
    wrong(ex.check_ridge_batch, lambda n, b, k, p, w: math.inf if 2 * n <= p / w * k else ridge_batch(n, b, k, p, w), expect=["got inf, expected None", "or None when"], id="ridge-inf-for-never"),
    wrong(ex.check_static_steps, ceil_total, expect=["*longest*"], id="static-ceil-of-total"),
    wrong(ex.check_static_steps, lambda ls, b: sum(statistics.mean(ls[i:i + b]) for i in range(0, len(ls), b)), expect=["not the average"], id="static-means"),
    wrong(ex.check_static_steps, lambda ls, b: max(ls, default=0) * math.ceil(len(ls) / b), expect=["its own longest"], id="static-global-max"),
    wrong(ex.check_static_steps, lambda ls, b: static_steps(sorted(ls), b), expect=["arrival order"], id="static-sorted"),
    wrong(ex.check_static_steps, lambda ls, b: simulate(ls, b), expect=["expected"], id="static-is-continuous"),
    wrong(ex.check_continuous_steps, ceil_total, expect=["lower bound"], id="continuous-ceil-of-total"),
    wrong(ex.check_continuous_steps, lambda ls, b: max(max(ls, default=0), ceil_total(ls, b)), expect=["lower bound"], id="continuous-max-of-bounds"),
    wrong(ex.check_continuous_steps, lambda ls, b: simulate(ls, b, refill=False), expect=["that is static batching"], id="continuous-admits-into-empty-batch"),
    wrong(ex.check_continuous_steps, continuous_late, expect=["no idle step"], id="continuous-frees-late"),
    wrong(ex.check_continuous_steps, continuous_early, expect=["not in the same one"], id="continuous-frees-early"),
    wrong(ex.check_continuous_steps, lambda ls, b: simulate(ls, b, admit_first=True), expect=["no idle step"], id="continuous-admits-before-removing"),
    wrong(ex.check_parse_sse, sse_split_on_blank_lines, expect=["CRLF", "splitlines"], id="sse-split-on-blank-lines"),
    wrong(ex.check_parse_sse, sse_assumes_the_space, expect=["without the space", "optional"], id="sse-assumes-the-space"),
    wrong(ex.check_parse_sse, sse_keeps_the_space, expect=["raised JSONDecodeError", "one space"], id="sse-keeps-the-space"),
    wrong(ex.check_parse_sse, sse_with_done, expect=["is not an event"], id="sse-includes-done"),
    wrong(ex.check_parse_sse, sse_last_data_line, expect=["several data lines", "join"], id="sse-ignores-multiline-data"),
    wrong(ex.check_parse_sse, sse_reads_on, expect=["text after [DONE]", "stop at"], id="sse-reads-on-after-done"),
    wrong(ex.check_parse_sse, sse_strings, expect=["json.loads each"], id="sse-returns-text"),
    wrong(ex.check_parse_sse, lambda raw: iter(parse_sse(raw)), expect=["expected a list"], id="sse-iterator"),
    wrong(ex.check_shared_prefix_blocks, lambda c, p, b: min(math.ceil(lcp(c, p) / b), (len(p) - 1) // b), expect=["only whole blocks"], id="prefix-partial-block"),
    wrong(ex.check_shared_prefix_blocks, lambda c, p, b: lcp(c, p) // b, expect=["at least one prompt token"], id="prefix-no-token-left"),
    wrong(ex.check_shared_prefix_blocks, lambda c, p, b: min(len(set(c) & set(p)) // b, (len(p) - 1) // b), expect=["position by position"], id="prefix-token-sets"),
    wrong(ex.check_shared_prefix_blocks, same_place_blocks, expect=["first block that differs"], id="prefix-no-stop"),
    wrong(ex.check_shared_prefix_blocks, blocks_anywhere, expect=["same place"], id="prefix-block-anywhere"),
]

RIGHT = [
    (ex.check_kv_blocks, kv_blocks), (ex.check_kv_blocks, lambda ls, b: sum(math.ceil(n / b) for n in ls)),
    (ex.check_ridge_batch, ridge_batch), (ex.check_ridge_batch, ridge_by_search),
    (ex.check_ridge_batch, lambda n, b, k, p, w: None if 2 * n * w <= p * k else max(1, math.ceil(p * b * n / (2 * n * w - p * k)))),
    (ex.check_static_steps, static_steps), (ex.check_static_steps, lambda ls, b: simulate(ls, b, refill=False)),
    (ex.check_continuous_steps, continuous_steps), (ex.check_continuous_steps, simulate),
    (ex.check_parse_sse, parse_sse), (ex.check_parse_sse, parse_sse_normalised),
    (ex.check_shared_prefix_blocks, shared_prefix_blocks), (ex.check_shared_prefix_blocks, shared_by_blocks),
]

GRADERS = [ex.check_kv_blocks, ex.check_ridge_batch, ex.check_static_steps,
           ex.check_continuous_steps, ex.check_parse_sse, ex.check_shared_prefix_blocks]


@pytest.mark.parametrize(("check", "answer"), RIGHT, ids=lambda x: getattr(x, "__name__", ""))
def test_right_answers_pass(capsys, check, answer):
    for _ in range(3):  # the random cases change at every call
        accepts(capsys, check, answer)


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_wrong_answers_are_rejected(capsys, check, args, expect):
    rejects(capsys, check, *args, expect=expect)


@pytest.mark.parametrize("check", GRADERS)
def test_function_stubs_and_errors_get_not_yet(capsys, check):
    rejects(capsys, check, stub, expect=["not written yet", "write your solution first"])
    rejects(capsys, check, broken, expect=["raised TypeError: unsupported operand"])
    rejects(capsys, check, ..., expect=["write your solution first"])
    rejects(capsys, check, lambda *args: 1 // 0, expect=["raised ZeroDivisionError"])
    rejects(capsys, check, lambda *args: None, expect=["expected a"])


def test_every_chapter_13_grader_has_two_or_more_wrong_answers():
    counts = Counter(p.values[0].__name__ for p in WRONG)
    assert set(counts) == set(ex.ch13.__all__) and min(counts.values()) >= 2


def test_counts_as_floats_and_tensors_are_fine(capsys):
    import torch

    accepts(capsys, ex.check_kv_blocks, lambda ls, b: float(kv_blocks(ls, b)))
    accepts(capsys, ex.check_static_steps, lambda ls, b: torch.tensor(static_steps(ls, b)))
    rejects(capsys, ex.check_kv_blocks, lambda ls, b: [kv_blocks(ls, b)], expect=["whole number, got list"])
    rejects(capsys, ex.check_kv_blocks, lambda ls, b: True, expect=["got bool"])


# --------------------------------------------------------------------------- the references
def test_continuous_reference_matches_a_step_by_step_simulation():
    rng = random.Random(0)
    workloads = [([], 1), ([1], 1), ([5], 3), ([1] * 9, 4)]
    for _ in range(2000):
        max_batch = rng.randint(1, 9)
        lengths = [rng.choice((1, rng.randint(1, 6), rng.randint(1, 60)))
                   for _ in range(rng.randint(0, 40))]
        workloads.append((lengths, max_batch))
    for lengths, max_batch in workloads:
        assert ch13._continuous_steps(lengths, max_batch) == simulate(lengths, max_batch)
        assert ch13._static_steps(lengths, max_batch) == simulate(lengths, max_batch,
                                                                  refill=False)


LLAMA_8B = (8e9, 2.0)  # parameters, bytes each (bf16)
KV_TOKEN = 131072.0  # Llama 3 8B: 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes


def test_ridge_reference_on_the_fixed_cases(capsys):
    a100 = (312e12, 1555e9)
    assert ch13._ridge_batch(*LLAMA_8B, 128 * KV_TOKEN, *a100) == 255  # exactly 254.10...
    assert ch13._ridge_batch(*LLAMA_8B, 0.0, *a100) == 201  # chapter 13's weights-only B*
    assert ch13._ridge_batch(*LLAMA_8B, 0.0, 312e12, 2e12) == 156  # 2 × 156 / 2 = 156 exactly
    assert ch13._ridge_batch(*LLAMA_8B, 8192 * KV_TOKEN, *a100) is None  # limit 14.9 < 200.6
    assert ch13._ridge_batch(1e9, 2.0, 1e7, 300e12, 1.5e12) is None  # limit == ridge == 200
    assert ch13._ridge_batch(1e9, 1.0, 1e6, 1e12, 2e12) == 1
    # On the ridge exactly, ceil is right and "the next whole number" is one too many.
    out = rejects(capsys, ex.check_ridge_batch,
                  lambda n, b, k, p, w: ridge_batch(n, b, k, p, w) if k else
                  math.floor(p / w * b / 2) + 1)
    assert "kv_bytes=0, peak_flops=3.12e+14, bandwidth=2e+12: got 157, expected 156" in out
    # A crash on the limit case (2N == R kv: a division by zero) is reported, not raised.
    rejects(capsys, ex.check_ridge_batch, lambda n, b, k, p, w: ridge_batch(n, b, k, p, w)
            if 2 * n != p / w * k else 1 / 0, expect=["raised ZeroDivisionError"])


def test_random_ridge_cases_are_far_from_a_rounding_boundary_and_from_the_limit(capsys):
    formulas = [
        ridge_batch, ridge_by_search,
        lambda n, b, k, p, w: None if 2 * n * w <= p * k else
        max(1, math.ceil(p * b * n / (2 * n * w - p * k))),
        lambda n, b, k, p, w: None if 2 * n <= p / w * k else
        max(1, math.ceil(b / (2 / (p / w) - k / n))),
    ]
    for seed in range(500):
        cases = ch13._random_ridge_cases(random.Random(seed))
        assert len(cases) == 6 and sum(ch13._ridge_batch(*c) is None for c in cases) == 1
        for n, b, k, p, w in cases:
            assert all(float(v).is_integer() and 0 < v < 2**53 for v in (n, k, p, w))
            x = ch13._exact_kv_batch(n, b, k, p, w)
            assert x is None or abs(x - round(x)) > x / 10**6
            for formula in formulas:
                assert formula(n, b, k, p, w) == (None if x is None else math.ceil(x))
    for _ in range(20):
        for formula in formulas:
            accepts(capsys, ex.check_ridge_batch, formula)


def test_sse_reference_follows_the_rules():
    stream = ("retry: 1000\r\n\r\n: keep-alive\n\n"
              'data: {"a":\r'
              'data:1}\r\n'
              "id: 3\n"
              "\n"
              "event: x\n\n"
              'data: {"b": 2}\n\n'
              "data: [DONE]\n\n"
              'data: {"c": 3}\n\n')
    assert ch13._parse_sse(stream) == parse_sse(stream) == [{"a": 1}, {"b": 2}]
    assert ch13._parse_sse(stream, keep_done=True) == [{"a": 1}, {"b": 2}, "[DONE]"]
    assert ch13._parse_sse(stream, stop=False) == [{"a": 1}, {"b": 2}, {"c": 3}]
    for seed in range(200):  # every stream is well formed, and the lines survive the joins
        for _label, raw, _hint in ch13._sse_cases(random.Random(seed)):
            assert ch13._parse_sse(raw) == parse_sse(raw) == parse_sse_normalised(raw)
            assert raw.endswith(("\n", "\r"))


# --------------------------------------------------------------------------- random cases
RANDOM_CASES = {  # each grader's random cases, without the fixed ones
    "check_kv_blocks": (ch13._random_kv_cases, kv_blocks),
    "check_ridge_batch": (ch13._random_ridge_cases, ridge_batch),
    "check_static_steps": (ch13._random_schedules, static_steps),
    "check_continuous_steps": (ch13._random_schedules, continuous_steps),
    "check_parse_sse": (lambda rng: [(raw,) for _label, raw, _hint in ch13._sse_cases(rng)],
                        parse_sse),
    "check_shared_prefix_blocks": (ch13._random_prefix_cases, shared_prefix_blocks),
}


def differs(slip, reference, case):
    try:
        return slip(*case) != reference(*case)
    except Exception:  # a crash is caught too
        return True


@pytest.mark.parametrize(("check", "args", "expect"), WRONG)
def test_the_random_cases_alone_catch_every_slip(check, args, expect):
    """The fixed cases catch every slip; the random ones must too, whatever the seed, so
    that a learner whose code only fits the fixed cases still gets "Not yet"."""
    make_cases, reference = RANDOM_CASES[check.__name__]
    slip = args[0]
    missed = [seed for seed in range(300)
              if not any(differs(slip, reference, case)
                         for case in make_cases(random.Random(seed)))]
    assert missed == []


def test_the_random_schedules_separate_static_from_continuous():
    """Most random queues give different answers for the two policies and the bounds."""
    cases = [case for seed in range(100) for case in ch13._random_schedules(random.Random(seed))]
    for slip in (static_steps, ceil_total, continuous_late, continuous_early,
                 lambda ls, b: max(max(ls), ceil_total(ls, b))):
        share = sum(slip(*case) != continuous_steps(*case) for case in cases) / len(cases)
        assert share > 0.5, slip
