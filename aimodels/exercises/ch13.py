"""Chapter 13 graders: paged KV blocks, the roofline's ridge batch, static and continuous
batching, a Server-Sent Events stream and prefix caching."""

from __future__ import annotations

import heapq
import json
import math
import numbers
import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch

from ._common import STUB_HINT, NotYet, _report, _whole_number, call, fresh_rng, grader

__all__ = [
    "check_continuous_steps",
    "check_kv_blocks",
    "check_parse_sse",
    "check_ridge_batch",
    "check_shared_prefix_blocks",
    "check_static_steps",
]

Slip = tuple[str, Callable[..., float]]


# --------------------------------------------------------------------------- counts
def _real(got: object) -> float | None:
    """The learner's answer as a finite float (int, float, one-element tensor), else None."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_complex():
        got = got.item()
    if isinstance(got, numbers.Real) and not isinstance(got, bool):
        value = float(got)
        return value if math.isfinite(value) else None
    return None


def _fresh(case: tuple) -> tuple:
    """The case with its lists copied, so that the learner's code cannot change ours."""
    return tuple(list(arg) if isinstance(arg, list) else arg for arg in case)


def _short(values: Sequence[int], limit: int = 10) -> str:
    if len(values) <= limit:
        return str(list(values))
    head = ", ".join(map(str, values[: limit - 1]))
    return f"[{head}, ..., {values[-1]}] ({len(values)} items)"


def _call_on(label: str, fn: Callable[..., Any], *args: Any, hint: str) -> Any:
    """``call``, with the case named when the learner's code raises."""
    try:
        return call(fn, *args, hint=hint)
    except NotYet as crash:
        if crash.hint == STUB_HINT:
            raise
        raise NotYet(f"{label}: {crash.message}", crash.hint) from None


def _grade_counts(fn: Callable[..., Any], cases: Sequence[tuple], answer: Callable[..., int],
                  slips: Sequence[Slip], where: Callable[..., str], hint: str) -> None:
    """``NotYet`` at the first case where ``fn(*case)`` is not the whole number ``answer``.

    A slip names the mistake only if it gives the learner's answer on every case the
    learner's code answers (it is run on the remaining cases too); else ``hint``.
    """
    for index, case in enumerate(cases):
        label = where(*case)
        raw = _call_on(label, fn, *_fresh(case), hint=hint)
        value, expected = _real(raw), answer(*case)
        if value == expected:
            continue
        if value is None:
            _whole_number(label, raw)  # raises: says what arrived instead of a number
            raise NotYet(f"{label}: expected a whole number.", "return the count as an int.")
        answers = [(c, float(answer(*c))) for c in cases[:index]] + [(case, value)]
        for later in cases[index + 1:]:
            try:
                other = _real(call(fn, *_fresh(later)))
            except NotYet:
                break
            if other is None:
                break
            answers.append((later, other))
        named = next((h for h, slip in slips
                      if all(math.isclose(float(slip(*c)), a, rel_tol=1e-9, abs_tol=1e-9)
                             for c, a in answers)), None)
        if named is None and not value.is_integer():
            _whole_number(label, raw)  # raises: a count is an integer
        shown = int(value) if value.is_integer() else f"{value:.6g}"
        raise NotYet(f"{label}: got {shown}, expected {expected}.", named or hint)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- KV blocks
def _kv_blocks(lengths: Sequence[int], block_size: int) -> int:
    return sum(_ceil_div(n, block_size) for n in lengths)


_KV_SLIPS: list[Slip] = [
    ("round up: a partly filled block is still a whole block, so a sequence needs "
     "ceil(length / block_size) blocks.", lambda ls, b: sum(n // b for n in ls)),
    ("round up per sequence, not the total: sequences never share a block, so each "
     "one's partly filled last block counts.", lambda ls, b: _ceil_div(sum(ls), b)),
    ("length // block_size + 1 is one block too many when the length is a multiple of "
     "block_size (or 0): use ceil(length / block_size), i.e. -(-length // block_size).",
     lambda ls, b: sum(n // b + 1 for n in ls)),
    ("a length that is a multiple of block_size fills its last block exactly, with no "
     "extra block: use ceil(length / block_size).",
     lambda ls, b: sum(n // b + 1 if n else 0 for n in ls)),
    ("a sequence of length 0 holds no tokens and needs no block.",
     lambda ls, b: sum(max(1, _ceil_div(n, b)) for n in ls)),
]


def _random_kv_cases(rng: random.Random) -> list[tuple[list[int], int]]:
    """Blocks of 2 to 64 tokens; lengths with zeros and exact multiples among them."""
    cases = []
    for _ in range(6):
        block_size = rng.choice((2, 4, 8, 16, 32, 64, rng.randint(3, 48)))
        lengths = [rng.choice((0, block_size * rng.randint(1, 8))) if rng.random() < 0.3
                   else rng.randint(1, 500) for _ in range(rng.randint(3, 12))]
        cases.append((lengths, block_size))
    lengths = rng.choice(cases)[0]
    lengths.insert(rng.randint(0, len(lengths)), 0)  # at least one empty sequence
    return cases


@grader
def check_kv_blocks(fn: Callable[[list[int], int], int]) -> bool:
    """Ch. 13, exercise 1: ``fn(lengths, block_size)`` is the number of KV-cache blocks a
    paged cache needs for sequences of these lengths: ceil(length / block_size) each.

    Checked on fixed cases (empty sequences, exact multiples, one-token blocks) and on
    random ones that change at every call.
    """
    cases = [([5, 16, 33, 0], 16), ([1], 16), ([16], 16), ([0], 8), ([3, 3, 3], 4),
             ([7, 9], 1), ([100], 128), ([64, 64, 65], 32), ([], 16)]
    cases += _random_kv_cases(fresh_rng())
    _grade_counts(fn, cases, _kv_blocks, _KV_SLIPS,
                  lambda ls, b: f"lengths={_short(ls)}, block_size={b}",
                  "each sequence needs ceil(length / block_size) blocks; add them up.")
    lengths, block_size, max_len = [37, 512, 129, 1000, 3, 2048, 250, 77], 16, 2048
    blocks, tokens = _kv_blocks(lengths, block_size), sum(lengths)
    return _report(True, f"all {len(cases)} cases right. In a paged cache, {len(lengths)} "
                         f"sequences with {tokens} tokens in all fill {blocks} blocks of "
                         f"{block_size} ({1 - tokens / (blocks * block_size):.1%} of the slots "
                         "empty); "
                         f"reserving {max_len} slots per sequence would leave "
                         f"{1 - tokens / (len(lengths) * max_len):.0%} empty.")


# --------------------------------------------------------------------------- roofline
def _exact_batch(peak: float, bandwidth: float, bytes_per_param: float) -> Fraction:
    """peak × bytes_per_param / (2 × bandwidth), exactly: the batch at the ridge point."""
    return Fraction(peak) * Fraction(bytes_per_param) / (2 * Fraction(bandwidth))


def _ridge_batch(peak: float, bandwidth: float, bytes_per_param: float) -> int:
    return max(1, math.ceil(_exact_batch(peak, bandwidth, bytes_per_param)))


def _ridge_slip(rule: Callable[[Fraction, float], float]) -> Callable[..., float]:
    return lambda p, w, b: rule(_exact_batch(p, w, b), b)


_RIDGE_POINT_HINT = ("peak_flops / bandwidth is the ridge point in FLOP/byte, not a batch "
                     "size: find the smallest B whose intensity 2B / bytes_per_param reaches it.")
_FLOOR_HINT = ("round up: B is the smallest whole batch with 2B / bytes_per_param >= "
               "peak_flops / bandwidth; rounding down leaves the step memory-bound.")

_RIDGE_SLIPS: list[Slip] = [
    ("a step does 2 FLOPs per parameter and sequence (a multiply and an add): the "
     "intensity is 2B / bytes_per_param, so B = ridge × bytes_per_param / 2, rounded up.",
     _ridge_slip(lambda x, b: max(1, math.ceil(2 * x)))),
    ("the intensity is FLOPs per *byte*: the 2B FLOPs per parameter are divided by the "
     "bytes_per_param bytes each parameter takes.",
     _ridge_slip(lambda x, b: max(1, math.ceil(x / Fraction(b))))),
    (_FLOOR_HINT, _ridge_slip(lambda x, b: max(1, math.floor(x)))),
    (_FLOOR_HINT, _ridge_slip(lambda x, b: math.floor(x))),
    ("the step is compute-bound once its intensity *reaches* the ridge (>=, not >): at "
     "exactly the ridge, B = ridge × bytes_per_param / 2 is enough.",
     _ridge_slip(lambda x, b: math.floor(x) + 1)),
    (_RIDGE_POINT_HINT, _ridge_slip(lambda x, b: float(2 * x / Fraction(b)))),
    (_RIDGE_POINT_HINT, _ridge_slip(lambda x, b: math.ceil(2 * x / Fraction(b)))),
]


def _far_from_whole(x: Fraction, rel: Fraction = Fraction(1, 10**9)) -> bool:
    """True when x is not within ``rel`` (relative) of a whole number: ceil is unambiguous."""
    return abs(x - round(x)) > rel * x


def _random_ridge_cases(rng: random.Random) -> list[tuple[float, float, float]]:
    """Peaks of 20 to 2000 TFLOP/s, 0.3 to 8 TB/s, 0.5 to 4 bytes a parameter, none near a
    rounding boundary; then one case exactly on the ridge, where only ceil is right. Every
    float is a whole number of FLOP/s or bytes/s below 2**53, so the usual float formulas
    give the exact answer."""
    cases: list[tuple[float, float, float]] = []
    while len(cases) < 5:
        peak, bandwidth = rng.randint(20, 2000) * 1e12, rng.randint(30, 800) * 1e10
        bytes_per_param = rng.choice((0.5, 1.0, 2.0, 4.0))
        x = _exact_batch(peak, bandwidth, bytes_per_param)
        if x > 1 and _far_from_whole(x):
            cases.append((peak, bandwidth, bytes_per_param))
    batch, bandwidth_units = rng.randint(20, 400), rng.randint(30, 500)
    bytes_per_param = rng.choice((0.5, 4.0))  # where the ridge is not the batch
    peak = Fraction(2 * batch * bandwidth_units * 10**10) / Fraction(bytes_per_param)
    cases.insert(rng.randrange(6), (float(peak), bandwidth_units * 1e10, bytes_per_param))
    return cases


@grader
def check_ridge_batch(fn: Callable[[float, float, float], int]) -> bool:
    """Ch. 13, exercise 2: ``fn(peak_flops, bandwidth, bytes_per_param)`` is the smallest
    batch B >= 1 at which a decoding step is compute-bound: its intensity 2B /
    bytes_per_param FLOP/byte reaches the ridge point peak_flops / bandwidth.

    Checked on A100- and H100-like numbers (one exactly on the ridge) and on random ones.
    """
    cases = [(312e12, 2.0e12, 2.0), (312e12, 2.0e12, 1.0), (312e12, 2.0e12, 4.0),
             (989e12, 3.35e12, 2.0), (989e12, 3.35e12, 0.5), (1e12, 2e12, 1.0),
             (2e12, 1e12, 1.0)]
    cases += _random_ridge_cases(fresh_rng())
    _grade_counts(fn, cases, _ridge_batch, _RIDGE_SLIPS,
                  lambda p, w, b: f"peak_flops={p:.4g}, bandwidth={w:.4g}, bytes_per_param={b:g}",
                  "B is the smallest whole number with 2B / bytes_per_param >= "
                  "peak_flops / bandwidth.")
    a100 = _ridge_batch(312e12, 1555e9, 2.0)
    return _report(True, f"on an A100 40GB (312 TFLOP/s bf16, 1,555 GB/s) a decoding step with "
                         f"bf16 weights is memory-bound below a batch of {a100}: until then, "
                         "more sequences in a batch cost almost no extra time, which is why "
                         "servers batch.")


# --------------------------------------------------------------------------- batching
def _static_steps(lengths: Sequence[int], max_batch: int) -> int:
    """Static batching: consecutive batches of max_batch, each as long as its longest."""
    return sum(max(lengths[i:i + max_batch]) for i in range(0, len(lengths), max_batch))


def _continuous_steps(lengths: Sequence[int], max_batch: int, late: int = 0) -> int:
    """Continuous batching: a slot freed at the end of step t is refilled at step t + 1.

    ``late`` moves the refill by that many steps (the off-by-one slips).
    """
    finishing: list[int] = []  # the step at whose end each running sequence finishes
    start = 0  # steps done before the next request joins
    for length in lengths:
        if len(finishing) == max_batch:
            start = heapq.heappop(finishing) + late
        heapq.heappush(finishing, start + length)
    return max(finishing, default=0)


_STATIC_SLIPS: list[Slip] = [
    ("a static batch runs until its *longest* request has finished, and the slots of the "
     "requests done earlier stay idle: the steps are not total / max_batch.",
     lambda ls, b: _ceil_div(sum(ls), b)),
    ("a static batch takes as many steps as its longest request, max(batch), not the "
     "average length.",
     lambda ls, b: sum(sum(ls[i:i + b]) / len(ls[i:i + b]) for i in range(0, len(ls), b))),
    ("each batch waits for its own longest request, not for the longest of all.",
     lambda ls, b: max(ls, default=0) * _ceil_div(len(ls), b)),
    ("take the requests in arrival order: sorting them by length would shorten the batches, "
     "but a server does not know how long a request will be.",
     lambda ls, b: _static_steps(sorted(ls), b)),
    ("take the requests in arrival order: sorting them by length would shorten the batches, "
     "but a server does not know how long a request will be.",
     lambda ls, b: _static_steps(sorted(ls, reverse=True), b)),
]

_LOWER_BOUND_HINT = ("that is only a lower bound: it assumes every slot is busy in every step, "
                     "but near the end fewer requests than slots are left. Simulate the steps.")

_CONTINUOUS_SLIPS: list[Slip] = [
    (_LOWER_BOUND_HINT, lambda ls, b: _ceil_div(sum(ls), b)),
    (_LOWER_BOUND_HINT, lambda ls, b: max(max(ls, default=0), _ceil_div(sum(ls), b))),
    ("that is static batching: in continuous batching a finished request's slot is "
     "refilled at the next step, without waiting for the rest of its batch.", _static_steps),
    ("a slot freed at the end of step t is refilled at the start of step t + 1: there is "
     "no idle step in between.", lambda ls, b: _continuous_steps(ls, b, late=1)),
    ("a request makes its last token in its last step, so its slot is free only from the "
     "next step on, not in the same one.", lambda ls, b: _continuous_steps(ls, b, late=-1)),
]


def _random_schedules(rng: random.Random) -> list[tuple[list[int], int]]:
    """Queues of 3 to 48 requests, 2 to 8 slots; uniform and long-tailed lengths."""
    cases = []
    for tail in (False, False, False, True, True):
        max_batch = rng.randint(2, 8)
        n = rng.randint(max_batch + 1, 6 * max_batch)
        lengths = [min(300, max(1, round(rng.lognormvariate(2.5, 1.0)))) if tail
                   else rng.randint(1, 40) for _ in range(n)]
        cases.append((lengths, max_batch))
    return cases


def _schedule_cases(rng: random.Random) -> list[tuple[list[int], int]]:
    fixed = [([5, 1, 1, 1], 2), ([2, 2, 2], 2), ([1, 1, 1, 1], 1), ([3], 4),
             ([4, 1, 1, 1, 1, 1], 3), ([7, 2, 9, 1, 1], 8), ([3, 1, 2, 2, 6, 1, 1], 2)]
    return fixed + _random_schedules(rng) + [([], 3)]


def _sample_workload() -> tuple[list[int], int]:
    """64 long-tailed requests (the same at every call) and 8 slots."""
    rng = random.Random(13)
    return [min(512, max(1, round(rng.lognormvariate(3.5, 1.0)))) for _ in range(64)], 8


def _schedule_label(lengths: Sequence[int], max_batch: int) -> str:
    return f"lengths={_short(lengths)}, max_batch={max_batch}"


@grader
def check_static_steps(fn: Callable[[list[int], int], int]) -> bool:
    """Ch. 13, exercise 3: ``fn(lengths, max_batch)`` is the number of decoding steps of
    static (request-level) batching: the requests, in order, in batches of max_batch,
    each batch running until its longest request has finished.

    Checked on fixed queues (one slot, fewer requests than slots, no requests) and random
    ones, uniform and long-tailed, that change at every call.
    """
    cases = _schedule_cases(fresh_rng())
    _grade_counts(fn, cases, _static_steps, _STATIC_SLIPS, _schedule_label,
                  "take the requests in order, max_batch at a time; each batch takes "
                  "max(batch) steps. Add them up.")
    lengths, max_batch = _sample_workload()
    return _report(True, f"{len(lengths)} requests of {min(lengths)} to {max(lengths)} tokens "
                         f"in batches of {max_batch} take {_static_steps(lengths, max_batch)} "
                         f"steps; busy slots alone would need "
                         f"{_ceil_div(sum(lengths), max_batch)}: the rest is waiting for the "
                         "longest request of each batch.")


@grader
def check_continuous_steps(fn: Callable[[list[int], int], int]) -> bool:
    """Ch. 13, exercise 4: ``fn(lengths, max_batch)`` is the number of decoding steps of
    continuous (iteration-level) batching: free slots are filled from the queue, in order,
    at the start of every step; a request leaves at the end of the step that makes its
    last token.

    Checked on the same kinds of queues as the static exercise.
    """
    cases = _schedule_cases(fresh_rng())
    _grade_counts(fn, cases, _continuous_steps, _CONTINUOUS_SLIPS, _schedule_label,
                  "simulate: at each step fill the free slots in order, every running request "
                  "makes one token, then the finished ones leave.")
    lengths, max_batch = _sample_workload()
    static, continuous = _static_steps(lengths, max_batch), _continuous_steps(lengths, max_batch)
    return _report(True, f"{len(lengths)} requests of {min(lengths)} to {max(lengths)} tokens "
                         f"on {max_batch} slots take {continuous} steps with continuous "
                         f"batching, {static} with static batching ({static / continuous:.1f}x "
                         f"as many); no schedule needs fewer than "
                         f"{_ceil_div(sum(lengths), max_batch)}.")


# --------------------------------------------------------------------------- SSE
_LINE_END = re.compile(r"\r\n|\r|\n")


def _parse_sse(raw: str, *, stop: bool = True, keep_done: bool = False) -> list[Any]:
    """The JSON data of the events of ``raw``, up to ``data: [DONE]``.

    ``stop=False`` and ``keep_done=True`` are the slips: reading on after [DONE], and
    returning it as an event.
    """
    events: list[Any] = []
    data: list[str] = []
    for line in _LINE_END.split(raw)[:-1]:  # the text after the last line end is no line
        if not line:  # a blank line dispatches the event, if it has data
            text, lines, data = "\n".join(data), len(data), []
            if lines and text == "[DONE]":
                if keep_done:
                    events.append(text)
                if stop:
                    break
            elif lines:
                events.append(json.loads(text))
        elif not line.startswith(":"):  # a line that starts with ":" is a comment
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
    return events


_WORDS = (" the", " cat", " sat", " on", " mat", ".", ":", " data:", " 42", "\n", " é", "{",
          '"', ",", " [", "]")


def _completion(rng: random.Random) -> list[dict]:
    """The chunks of one streamed completion: pieces of text, then perhaps the usage."""
    head = {"id": f"cmpl-{rng.randrange(16**12):012x}", "object": "text_completion",
            "created": rng.randint(1_700_000_000, 1_800_000_000), "model": "tiny-gpt"}
    n = rng.randint(2, 5)
    chunks = [{**head, "choices": [{
        "text": "".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))), "index": 0,
        "logprobs": None, "finish_reason": "length" if i == n - 1 else None}]}
        for i in range(n)]
    if rng.random() < 0.5:
        prompt = rng.randint(1, 50)
        chunks.append({**head, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}})
    return chunks


def _event(rng: random.Random, chunk: dict, *, space: bool = True, split: bool = False,
           before: Sequence[str] = (), after: Sequence[str] = ()) -> list[str]:
    """The lines of one event (blank line included); ``split`` spreads the JSON over two
    or three data lines, cut where JSON allows a line break (after a comma)."""
    text = json.dumps(chunk)
    parts = [text]
    if split:  # ', "' never occurs inside a JSON string, where " is escaped
        commas = [m.start() + 1 for m in re.finditer(', "', text)]
        cuts = sorted(rng.sample(commas, min(len(commas), rng.randint(1, 2))))
        parts = [text[a:b].lstrip() for a, b in zip([0, *cuts], [*cuts, len(text)],
                                                    strict=True)]
    prefix = "data: " if space else "data:"
    return [*before, *(prefix + part for part in parts), *after, ""]


def _stream(lines: Sequence[str], end: str | None = None, rng: random.Random | None = None) -> str:
    """Each line followed by ``end``, or by a random line end (never a lone "\\r" then a
    "\\n" that would make one "\\r\\n" of the two)."""
    if end is not None:
        return "".join(line + end for line in lines)
    assert rng is not None
    out, last = [], "\n"
    for line in lines:
        ends = ("\r\n", "\r") if last == "\r" and not line else ("\n", "\r\n", "\r")
        last = rng.choice(ends)
        out.append(line + last)
    return "".join(out)


_SSE_PLAIN = ("each event is a 'data: <JSON>' line and a blank line: remove 'data:' and one "
              "space, json.loads the rest, and stop at 'data: [DONE]' (not included).")
_SSE_AFTER = ("stop at 'data: [DONE]': it ends the completion, and whatever follows is not "
              "part of it.")
_SSE_LINE_ENDS = ("lines end with '\\n', '\\r\\n' or '\\r': split on all three "
                  "(str.splitlines() does), so '\\r\\n\\r\\n' ends an event too.")


def _sse_cases(rng: random.Random) -> list[tuple[str, str, str]]:
    """(label, stream, hint): one rule at a time, then all of them at once."""
    done = ["data: [DONE]", ""]

    def events(**kwargs: Any) -> list[str]:
        return [line for chunk in _completion(rng) for line in _event(rng, chunk, **kwargs)]

    no_space = [line for i, chunk in enumerate(_completion(rng))
                for line in _event(rng, chunk, space=bool(i % 2))]
    comments = [": keep-alive", ""] + events(before=[": ping"]) + [": keep-alive", ""]
    fields = ["retry: 3000", ""] + [
        line for i, chunk in enumerate(_completion(rng))
        for line in _event(rng, chunk, before=["event: completion"], after=[f"id: {i}"])]
    split = [line for i, chunk in enumerate(_completion(rng))
             for line in _event(rng, chunk, split=i == 0 or rng.random() < 0.5)]
    mixed = [": keep-alive", "", "retry: 1000", ""] + [
        line for i, chunk in enumerate(_completion(rng))
        for line in _event(rng, chunk, space=rng.random() < 0.5, split=rng.random() < 0.5,
                           before=rng.choice(([], [": ping"], ["event: completion"])),
                           after=[f"id: {i}"])]
    return [
        ("a plain stream", _stream(events() + done, "\n"), _SSE_PLAIN),
        ('"data:" without the space', _stream(no_space + ["data:[DONE]", ""], "\n"),
         "the space after 'data:' is optional: remove one leading space only when there is "
         "one ('data:{...}' is valid too)."),
        ("comment and keep-alive lines", _stream(comments + done, "\n"),
         "a line that starts with ':' is a comment (servers send ': keep-alive' to hold the "
         "connection open): skip it; a blank line after only comments dispatches nothing."),
        ("event:, id: and retry: fields", _stream(fields + done, "\n"),
         "ignore the fields other than data (event:, id:, retry:); an event without a data "
         "line is not dispatched."),
        ("JSON split over several data lines", _stream(split + done, "\n"),
         "an event can have several data lines: join their values with '\\n', then "
         "json.loads the whole."),
        ("text after [DONE]", _stream(events() + done + events() + [": bye", ""], "\n"),
         _SSE_AFTER),
        ("CRLF line ends", _stream([": keep-alive", ""] + events() + done, "\r\n"),
         _SSE_LINE_ENDS),
        ("CR line ends", _stream(events() + done, "\r"), _SSE_LINE_ENDS),
        ("an empty completion", _stream(done, "\n"),
         "a completion with no text is just 'data: [DONE]': return an empty list."),
        ("all the rules at once, mixed line ends", _stream(mixed + done + events(), rng=rng),
         "line ends of any kind, comments, other fields, several data lines per event, and "
         "the end at [DONE]: apply each rule line by line."),
    ]


def _clip(obj: object, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strings_of(got: list, expected: list) -> bool:
    """True when ``got`` holds the events' data as JSON text instead of parsed objects."""
    if len(got) != len(expected) or not all(isinstance(g, str) for g in got):
        return False
    try:
        return [json.loads(g) for g in got] == expected
    except ValueError:
        return False


@grader
def check_parse_sse(fn: Callable[[str], list[dict]]) -> bool:
    """Ch. 13, exercise 5: ``fn(raw)`` parses the Server-Sent Events of an OpenAI-style
    streamed completion and returns the JSON objects of its events, in order, up to
    ``data: [DONE]`` (not included).

    Checked on random streams that use one rule at a time (no space after "data:",
    comments, other fields, multi-line data, text after [DONE], CRLF and CR line ends)
    and then all of them at once.
    """
    cases = _sse_cases(fresh_rng())
    for label, raw, hint in cases:
        expected = _parse_sse(raw)
        got = _call_on(label, fn, raw, hint=hint)
        if isinstance(got, tuple):
            got = list(got)
        if not isinstance(got, list):
            raise NotYet(f"{label}: expected a list, got {type(got).__name__}.",
                         "return a list of the events' JSON objects (dicts), in order.")
        if got == expected:
            continue
        if got in (_parse_sse(raw, keep_done=True), _parse_sse(raw, stop=False, keep_done=True)):
            hint = ("'[DONE]' marks the end of the stream and is not an event: stop there "
                    "without adding it.")
        elif got == _parse_sse(raw, stop=False):
            hint = _SSE_AFTER
        elif _strings_of(got, expected):
            hint = "json.loads each event's data: return the objects (dicts), not the text."
        if len(got) != len(expected):
            raise NotYet(f"{label}: got {len(got)} events, expected {len(expected)}.", hint)
        i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
        if type(got[i]) is not type(expected[i]):
            raise NotYet(f"{label}: event {i} is a {type(got[i]).__name__}, expected a "
                         f"{type(expected[i]).__name__}.", hint)
        raise NotYet(f"{label}: event {i} is {_clip(got[i])}, expected {_clip(expected[i])}.",
                     hint)
    return _report(True, f"your parser reads all {len(cases)} streams. Each event reaches the "
                         "client as soon as the server flushes it, so a streaming client shows "
                         "the first token after the time to first token, not after the whole "
                         "completion.")


# --------------------------------------------------------------------------- prefix cache
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _shared_blocks(cached: Sequence[int], prompt: Sequence[int], block_size: int) -> int:
    return min(_common_prefix(cached, prompt) // block_size, (len(prompt) - 1) // block_size)


def _blocks_of(tokens: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The whole blocks of ``tokens``."""
    return [tuple(tokens[i:i + block_size])
            for i in range(0, len(tokens) - block_size + 1, block_size)]


def _same_place(cached: Sequence[int], prompt: Sequence[int], block_size: int) -> int:
    """The slip that counts every whole block equal to the cached one at the same place."""
    return sum(a == b for a, b in zip(_blocks_of(cached, block_size),
                                      _blocks_of(prompt, block_size), strict=False))


def _anywhere(cached: Sequence[int], prompt: Sequence[int], block_size: int) -> int:
    """The slip that counts the prompt's blocks found anywhere among the cached blocks."""
    known = set(_blocks_of(cached, block_size))
    return sum(block in known for block in _blocks_of(prompt, block_size))


def _capped(count: Callable[[Sequence[int], Sequence[int], int], int]) -> Callable[..., int]:
    return lambda c, p, b: min(count(c, p, b), (len(p) - 1) // b)


def _common_ceil(c: Sequence[int], p: Sequence[int], b: int) -> int:
    return _ceil_div(_common_prefix(c, p), b)


def _common_set(c: Sequence[int], p: Sequence[int], b: int) -> int:
    return len(set(c) & set(p)) // b


_PARTIAL_HINT = ("only whole blocks are shared: a block that matches only in part is "
                 "computed again, so round the common prefix down (// block_size).")
_SET_HINT = ("compare the lists position by position from the start and stop at the first "
             "difference: a token's keys and values depend on every token before it, so only "
             "a common prefix can be reused.")
_SAME_PLACE_HINT = ("stop at the first block that differs: a later block with the same tokens "
                    "has other keys and values, because they depend on every earlier token.")
_ANYWHERE_HINT = ("a block can be reused only at the same place after the same prefix: its "
                  "keys and values depend on every earlier token (prefix caches hash the "
                  "whole prefix, not one block).")

_PREFIX_SLIPS: list[Slip] = [
    (_PARTIAL_HINT, _capped(_common_ceil)),
    (_PARTIAL_HINT, _common_ceil),
    ("at least one prompt token must still go through the model (its logits give the first "
     "new token): share at most (len(prompt) - 1) // block_size blocks.",
     lambda c, p, b: _common_prefix(c, p) // b),
    (_SET_HINT, _capped(_common_set)),
    (_SET_HINT, _common_set),
    (_SAME_PLACE_HINT, _capped(_same_place)),
    (_SAME_PLACE_HINT, _same_place),
    (_ANYWHERE_HINT, _capped(_anywhere)),
    (_ANYWHERE_HINT, _anywhere),
]


def _random_prefix_cases(rng: random.Random) -> list[tuple[list[int], list[int], int]]:
    """One case of each kind, with token ids below 50,000 (and one with only 3 ids)."""

    def tokens(n: int) -> list[int]:
        return [rng.randrange(50_000) for _ in range(n)]

    def other(token: int) -> int:
        return (token + rng.randrange(1, 50_000)) % 50_000

    cases = []
    # the prompt is the cached sequence cut after a whole number of blocks
    bs, m = rng.choice((2, 4, 8, 16)), rng.randint(1, 4)
    cached = tokens(m * bs + rng.randint(0, 2 * bs))
    cases.append((cached, cached[:m * bs], bs))
    # the common prefix ends inside a block, and a long new part follows
    bs = rng.choice((2, 4, 8, 16))
    cached = tokens(rng.randint(2 * bs, 6 * bs))
    k = rng.choice([k for k in range(1, len(cached)) if k % bs])
    cases.append((cached, cached[:k] + [other(cached[k])] + tokens(rng.randint(2 * bs, 3 * bs)),
                  bs))
    # one early token differs, and the later blocks are equal again
    bs = rng.choice((2, 4, 8))
    cached = tokens(rng.randint(4 * bs, 8 * bs))
    prompt = cached + tokens(rng.randint(1, bs))
    p = rng.randrange(2 * bs)
    prompt[p] = other(prompt[p])
    cases.append((cached, prompt, bs))
    # the prompt continues the whole cached sequence
    bs = rng.choice((2, 4, 8, 16))
    cached = tokens(rng.randint(1, 6 * bs))
    cases.append((cached, cached + tokens(rng.randint(1, 2 * bs)), bs))
    # two unrelated lists of three token ids: common tokens everywhere, short prefixes
    bs = rng.choice((1, 2, 3))
    cases.append(([rng.randrange(3) for _ in range(rng.randint(0, 12))],
                  [rng.randrange(3) for _ in range(rng.randint(1, 12))], bs))
    return cases


@grader
def check_shared_prefix_blocks(fn: Callable[[list[int], list[int], int], int]) -> bool:
    """Ch. 13, exercise 6: ``fn(cached, prompt, block_size)`` is the number of whole KV
    blocks of ``prompt`` a prefix cache can reuse from the cached sequence: the whole
    blocks of the longest common prefix, at most (len(prompt) - 1) // block_size.

    Checked on fixed cases (equal sequences, an empty cache, one-token blocks, equal
    tokens after a difference) and random ones that change at every call.
    """
    cases = [([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0], 4),
             (list(range(1, 9)), list(range(1, 9)), 4), ([4, 3, 2, 1], [1, 2, 3, 4, 5], 2),
             ([1, 2, 9, 9, 5, 6], [1, 2, 3, 4, 5, 6, 7], 2), ([5, 6, 1, 2], [1, 2, 5, 6, 7], 2),
             ([], [1, 2, 3], 2), ([7], [7], 1), ([1, 2, 3], [1, 2, 3, 4], 1),
             ([1, 2, 3], [1, 2, 3], 1), (list(range(20)), list(range(10)), 4),
             ([1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)]
    cases += _random_prefix_cases(fresh_rng())
    _grade_counts(fn, cases, _shared_blocks, _PREFIX_SLIPS,
                  lambda c, p, b: f"cached={_short(c)}, prompt={_short(p)}, block_size={b}",
                  "count the whole blocks of the longest common prefix, and keep at least one "
                  "prompt token to compute: min(lcp // block_size, (len(prompt) - 1) // "
                  "block_size).")
    system, question, bs = list(range(1000)), list(range(5000, 5040)), 16
    shared = _shared_blocks(system + [9999], system + question, bs)
    return _report(True, f"with blocks of {bs}, a {len(system)}-token system prompt shared by "
                         f"every request saves {shared} blocks ({shared * bs} tokens) of "
                         f"prefill; only its last {len(system) - shared * bs} tokens and the "
                         "question are computed again.")
