"""Chapter 13 graders: paged KV blocks, the roofline's ridge batch with the KV cache counted,
static and continuous batching, a Server-Sent Events stream and prefix caching."""

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
RidgeCase = tuple[float, float, float, float, float]  # n_params, bytes, kv_bytes, peak, bw


def _exact_kv_batch(n_params: float, bytes_per_param: float, kv_bytes: float, peak: float,
                    bandwidth: float) -> Fraction | None:
    """The batch B, exactly, at which 2BN / (bN + B·kv) reaches P / W; None if none does.

    B (2N - R kv) >= R b N with R = P / W: a batch reaches the ridge only if 2N > R kv,
    i.e. only if the limit of the intensity as B grows, 2N / kv, lies above the ridge.
    """
    ridge = Fraction(peak) / Fraction(bandwidth)
    room = 2 * Fraction(n_params) - ridge * Fraction(kv_bytes)
    if room <= 0:
        return None
    return ridge * Fraction(bytes_per_param) * Fraction(n_params) / room


def _ridge_batch(n_params: float, bytes_per_param: float, kv_bytes: float, peak: float,
                 bandwidth: float) -> int | None:
    x = _exact_kv_batch(n_params, bytes_per_param, kv_bytes, peak, bandwidth)
    return None if x is None else max(1, math.ceil(x))


def _kv_slip(flops: int = 2, weight_bytes: bool = True, per_sequence: bool = True,
             kv: bool = True, rounding: Callable[[Fraction], int] = math.ceil,
             never: bool = True) -> Callable[..., int | None]:
    """The reference with one thing done wrong: FLOPs per parameter, the weights' bytes,
    the caches read once instead of once per sequence, the cache left out, the rounding,
    or no "never" case (then max(1, ...) of whatever the formula gives)."""
    def batch(n, b, k, p, w):
        ridge = Fraction(p) / Fraction(w)
        n, k = Fraction(n), Fraction(k) if kv else Fraction(0)
        weights = n * Fraction(b) if weight_bytes else n
        if per_sequence:  # B (flops N - R k) >= R weights
            room = flops * n - ridge * k
            if room <= 0 and never:
                return None
            return max(1, rounding(ridge * weights / room))
        return max(1, rounding(ridge * (weights + k) / (flops * n)))  # flops B N >= R (w + k)
    return batch


_FLOOR_HINT = ("round up: B is the smallest whole batch whose intensity reaches the ridge; "
               "rounding down leaves the step memory-bound.")
_NEVER_HINT = ("as B grows, the intensity 2BN / (bN + B·kv_bytes) rises towards 2N / kv_bytes "
               "and never passes it: if that limit is not above the ridge peak_flops / "
               "bandwidth, no batch is compute-bound, and the answer is None.")

_RIDGE_SLIPS: list[tuple[str, Callable[..., int | None]]] = [
    ("the KV cache is read too: every sequence reads its own kv_bytes at every step, so a "
     "batch of B reads b·N + B·kv_bytes bytes. The weights are shared by the batch; the "
     "caches are not.", _kv_slip(kv=False)),
    ("every sequence has a cache of its own: B sequences read B × kv_bytes, not kv_bytes "
     "once.", _kv_slip(per_sequence=False)),
    (_NEVER_HINT, _kv_slip(never=False)),
    (_FLOOR_HINT, _kv_slip(rounding=math.floor)),
    ("a step does 2 FLOPs per parameter and sequence (a multiply and an add): 2BN FLOPs "
     "for a batch of B.", _kv_slip(flops=1)),
    ("the weights take bytes_per_param bytes each: reading them costs "
     "bytes_per_param × n_params bytes.", _kv_slip(weight_bytes=False)),
]
_RIDGE_HINT = ("B is the smallest whole number with 2·B·n_params / (bytes_per_param·n_params "
               "+ B·kv_bytes) >= peak_flops / bandwidth, or None if no B reaches it.")


def _ridge_label(n: float, b: float, k: float, p: float, w: float) -> str:
    return (f"n_params={n:.4g}, bytes_per_param={b:g}, kv_bytes={k:.10g}, peak_flops={p:.4g}, "
            f"bandwidth={w:.4g}")


def _ridge_answer(raw: object) -> float | None | str:
    """The learner's answer: None, a finite number, or "bad" for anything else."""
    if raw is None:
        return None
    value = _real(raw)
    return "bad" if value is None else value


def _slip_gives(slip: Callable[..., int | None], case: RidgeCase, answer: object) -> bool:
    try:
        expected = slip(*case)
    except ZeroDivisionError:
        return False
    if expected is None or answer is None:
        return expected is answer
    return math.isclose(float(expected), float(answer), rel_tol=1e-9, abs_tol=1e-9)


def _grade_ridge(fn: Callable[..., Any], cases: Sequence[RidgeCase]) -> None:
    """``NotYet`` at the first case where ``fn`` is not the reference; names the slip that
    gives the learner's answers on every case it answers, if one does."""
    for index, case in enumerate(cases):
        label = _ridge_label(*case)
        raw = _call_on(label, fn, *case, hint=_RIDGE_HINT)
        got, expected = _ridge_answer(raw), _ridge_batch(*case)
        if got is not None and got != "bad" and expected is not None and got == expected:
            continue
        if got is None and expected is None:
            continue
        if got == "bad":
            if isinstance(raw, float | int) or isinstance(raw, torch.Tensor):
                raise NotYet(f"{label}: got {raw!r:.40}, expected "
                             f"{expected if expected is not None else 'None'}.",
                             "return a whole number, or None when no batch reaches the ridge.")
            _whole_number(label, raw)  # raises: says what arrived instead of a number
        answers = [(c, _ridge_batch(*c)) for c in cases[:index]] + [(case, got)]
        for later in cases[index + 1:]:
            try:
                other = _ridge_answer(call(fn, *later))
            except NotYet:
                break
            if other == "bad":
                break
            answers.append((later, other))
        named = next((h for h, slip in _RIDGE_SLIPS
                      if all(_slip_gives(slip, c, a) for c, a in answers)), None)
        if expected is None:
            raise NotYet(f"{label}: got {got:g}, expected None: no batch reaches the ridge "
                         "here.", named or _NEVER_HINT)
        if got is None:
            raise NotYet(f"{label}: got None, expected a batch of {expected}: here the "
                         "intensity does reach the ridge.", named or _RIDGE_HINT)
        if not float(got).is_integer():
            _whole_number(label, raw)  # raises: a batch is a whole number
        raise NotYet(f"{label}: got {int(got)}, expected {expected}.", named or _RIDGE_HINT)


def _far_from_whole(x: Fraction, rel: Fraction = Fraction(1, 10**6)) -> bool:
    """True when x is not within ``rel`` (relative) of a whole number: ceil is unambiguous."""
    return abs(x - round(x)) > rel * x


def _random_ridge_cases(rng: random.Random) -> list[RidgeCase]:
    """Models of 0.1 to 80 billion parameters in 0.5, 2 or 4 bytes each, caches of 64 KiB
    to 256 MiB per sequence, peaks of 20 to 2000 TFLOP/s and 0.3 to 8 TB/s: five cases
    that reach the ridge (the batch far from a rounding boundary and from the limit, so
    the usual float formulas give the exact answer) and one that never does.
    Every number is a whole number below 2**53."""
    finite: list[RidgeCase] = []
    never: list[RidgeCase] = []
    while len(finite) < 5 or not never:
        case = (rng.randint(1, 800) * 1e8, rng.choice((0.5, 2.0, 4.0)),
                rng.randint(1, 4096) * 65536.0, rng.randint(20, 2000) * 1e12,
                rng.randint(30, 800) * 1e10)
        n, _, kv, peak, bandwidth = case
        margin = (2 * Fraction(n) - Fraction(peak) / Fraction(bandwidth) * Fraction(kv)) / (2 * n)
        x = _exact_kv_batch(*case)
        if x is None and margin < Fraction(-1, 20) and not never:
            never.append(case)
        elif x is not None and margin > Fraction(1, 20) and x > 1 and _far_from_whole(x) \
                and len(finite) < 5:
            finite.append(case)
    cases = finite
    cases.insert(rng.randrange(1, 6), never[0])  # not first: a None there says little
    return cases


# Llama 3 8B in bf16 (8e9 parameters; 131,072 bytes of keys and values per token).
_LLAMA = (8e9, 2.0)
_KV_TOKEN = 131072.0


@grader
def check_ridge_batch(fn: Callable[[float, float, float, float, float], int | None]) -> bool:
    """Ch. 13, exercise 2: ``fn(n_params, bytes_per_param, kv_bytes, peak_flops, bandwidth)``
    is the smallest batch B >= 1 at which a decoding step is compute-bound once the KV
    cache is counted: its intensity 2·B·n_params / (bytes_per_param·n_params +
    B·kv_bytes) reaches the ridge point peak_flops / bandwidth; None if no batch does
    (when 2·n_params / kv_bytes is not above the ridge).

    Checked on Llama-3-8B-like numbers on A100-like and H100-like peaks (one exactly on
    the ridge without a cache, one exactly at the limit), and on random ones.
    """
    cases: list[RidgeCase] = [
        (*_LLAMA, 128 * _KV_TOKEN, 312e12, 1555e9),  # 128 tokens a sequence: 255
        (*_LLAMA, 0.0, 312e12, 2e12),  # no cache: exactly on the ridge at 156
        (*_LLAMA, 8192 * _KV_TOKEN, 312e12, 1555e9),  # 8,192 tokens: never
        (70e9, 1.0, 512 * 327680.0, 989e12, 3.35e12),  # 70B in 8 bits, 512 tokens: 229
        (1e9, 2.0, 1e7, 300e12, 1.5e12),  # the limit 2N / kv is exactly the ridge: never
        (3.4e6, 4.0, 128 * 8192.0, 97e9, 35e9),  # a small fp32 GPT on a CPU core: 10
        (1e9, 1.0, 1e6, 1e12, 2e12),  # a ridge below 1 FLOP/byte: batch 1 will do
    ]
    cases += _random_ridge_cases(fresh_rng())
    _grade_ridge(fn, cases)
    short, long = (_ridge_batch(*_LLAMA, t * _KV_TOKEN, 312e12, 1555e9) for t in (128, 8192))
    bare = _ridge_batch(*_LLAMA, 0.0, 312e12, 1555e9)
    limit = 2 * _LLAMA[0] / (8192 * _KV_TOKEN)
    return _report(True, f"for Llama 3 8B in bf16 on an A100 40GB (312 TFLOP/s, 1,555 GB/s) "
                         f"the weights alone reach the ridge at a batch of {bare}; with 128 "
                         f"tokens of KV cache a sequence it takes {short}, and at 8,192 tokens "
                         f"{long if long is not None else 'no batch'} does: the intensity "
                         f"cannot pass 2N / kv = {limit:.1f} FLOP/byte, so long-context "
                         "decoding stays memory-bound whatever the batch.")


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
