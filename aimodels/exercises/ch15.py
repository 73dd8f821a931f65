"""Chapter 15 graders: the parameters of a mixture-of-experts model, the energy of a
training run, and the price of a million generated tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from aimodels import trends

from ._common import NotYet, _judge_number, _number, _report, call, fresh_rng, grader

__all__ = ["check_cost_per_million", "check_moe_parameters", "check_training_energy"]

# --------------------------------------------------------------------------- MoE parameters
# Exercise 1's model: d = 2048, 24 layers, SwiGLU experts of width 5632, vocabulary 50,000,
# 16 query heads and 4 key-value heads, 16 experts of which 2 per token, untied embeddings.
MOE_CONFIG = dict(d_model=2048, n_layers=24, d_ff=5632, vocab_size=50_000, n_heads=16,
                  n_kv_heads=4, n_experts=16, experts_per_token=2)


def _moe_slips() -> dict[str, tuple[float, float]]:
    """(total, active) that a learner gets with one slip, keyed by the hint for it."""
    c = MOE_CONFIG
    d, L, f, V = c["d_model"], c["n_layers"], c["d_ff"], c["vocab_size"]
    right = trends.llm_parameters(**c)
    expert = 3 * d * f
    full_kv = trends.llm_parameters(**{**c, "n_kv_heads": c["n_heads"]})
    plain = trends.llm_parameters(**{**c, "gated_ffn": False})
    tied = trends.llm_parameters(**{**c, "tie_embeddings": True})
    return {
        "with grouped-query attention W_K and W_V are d x (H_kv d_head) = 2048 x 512, not "
        "2048 x 2048: only 4 key-value heads.": (full_kv.total, full_kv.active),
        "a SwiGLU expert has three matrices (gate, up, down): 3 d d_ff, not 2 d d_ff.":
            (plain.total, plain.active),
        "the embeddings are untied: the input table and the output head are V x d each.":
            (tied.total, tied.active),
        "the router (a d x E matrix in every layer) is stored and used by every token.":
            (right.total - right.router, right.active - right.router),
        "the router runs for every token to choose its experts: count it in the active "
        "parameters too.": (right.total, right.active - right.router),
        "each layer has two RMSNorm weight vectors of size d, and there is a final norm.":
            (right.total - right.norms, right.active - right.norms),
        "a token uses experts_per_token = 2 experts per layer, not one.":
            (right.total, right.active - L * expert),
        "active parameters count only the experts a token uses (2 of 16), plus everything "
        "shared.": (right.total, right.total),
        "the total stores all 16 experts of every layer; the active count uses 2.":
            (right.active, right.active),
        "count V x d for the embedding table (and again for the output head), not V alone.":
            (right.total - 2 * V * d + 2 * V, right.active - 2 * V * d + 2 * V),
    }


LOW_PRECISION = ("float16", "bfloat16", "float32")


def _pair(answer: object) -> tuple[float, float, bool]:
    """``(total, active, low_precision)``: a tuple, a list, or a 1-D array or tensor of two.

    ``low_precision`` says that the numbers arrived in a float format too narrow to hold
    counts of billions exactly (float32 keeps 24 bits: steps of 1,024 near 1.4e10).
    """
    if answer is Ellipsis or answer is None:
        raise NotYet("moe_answer has no answer yet.",
                     "replace ... with two numbers: moe_answer = (total, active).")
    low_precision = False
    if isinstance(answer, torch.Tensor) or type(answer).__module__ == "numpy":
        shape = tuple(getattr(answer, "shape", ()))
        if shape != (2,):
            raise NotYet(f"expected a pair (total, active), got an array of shape {shape}.",
                         "answer with two numbers: moe_answer = (total, active).")
        low_precision = str(answer.dtype).removeprefix("torch.") in LOW_PRECISION
        answer = answer.tolist()
    if isinstance(answer, (str, bytes)) or not isinstance(answer, Sequence) or len(answer) != 2:
        raise NotYet(f"expected a pair (total, active), got {answer!r:.60}.",
                     "answer with two numbers: moe_answer = (total, active).")
    return _number("total", answer[0]), _number("active", answer[1]), low_precision


@grader
def check_moe_parameters(answer: object) -> bool:
    """Ch. 15, exercise 1: ``(total, active)`` parameters of the mixture-of-experts model
    ``MOE_CONFIG``: d = 2048, 24 layers, SwiGLU experts of width 5632, vocabulary 50,000,
    16 query heads and 4 key-value heads, 16 experts of which 2 per token, untied
    embeddings, no biases, two RMSNorms per layer and a final one, a bias-free router."""
    total, active, low_precision = _pair(answer)
    right = trends.llm_parameters(**MOE_CONFIG)

    def same(a: float, b: float) -> bool:  # parameter counts are integers: exact match
        return math.isclose(a, b, rel_tol=0.0, abs_tol=0.5)

    if same(total, right.total) and same(active, right.active):
        return _report(True, f"{right.total / 1e9:.2f}B stored, {right.active / 1e9:.2f}B used "
                             f"per token: the model stores {right.total / right.active:.1f}x "
                             "what each token computes with.")
    if low_precision:
        raise NotYet(f"(total, active) = ({total:,.0f}, {active:,.0f}) arrived as float32 or "
                     "narrower, which rounds counts of billions to steps of about 1,000.",
                     "count with Python ints or dtype=torch.int64 (np.int64), then check the "
                     "sum part by part.")
    for hint, (slip_total, slip_active) in _moe_slips().items():
        if same(total, slip_total) and same(active, slip_active):
            raise NotYet(f"(total, active) = ({total:,.0f}, {active:,.0f}).", hint)
    wrong = "total" if not same(total, right.total) else "active"
    got, expected = (total, right.total) if wrong == "total" else (active, right.active)
    raise NotYet(f"the {wrong} count {got:,.0f} is off by {got - expected:+,.0f}.",
                 "add up per layer: attention (W_Q, W_K, W_V, W_O), experts (3 d d_ff each), "
                 "router (d x E), two norms; then the embeddings, output head and final norm.")


# --------------------------------------------------------------------------- training energy
# Exercise 2: a dense 70B model on 2T tokens (6ND FLOPs), on GPUs with a dense bf16 peak of
# 989 TFLOP/s at 40% utilisation, drawing 700 W each, in a data centre with PUE 1.1.
ENERGY_CASE = dict(n_params=70e9, n_tokens=2e12, peak=989e12, utilization=0.4, watts=700.0,
                   pue=1.1)


@grader
def check_training_energy(answer: object) -> bool:
    """Ch. 15, exercise 2: the facility energy, in MWh, of training a dense 70B-parameter
    model on 2T tokens (6ND FLOPs) on GPUs with a 989 TFLOP/s peak used at 40%, drawing
    700 W each, in a data centre with a PUE of 1.1."""
    c = ENERGY_CASE
    flops = 6 * c["n_params"] * c["n_tokens"]

    def mwh(flops: float, utilization: float = c["utilization"], pue: float = c["pue"],
            peak: float = c["peak"]) -> float:
        return trends.training_energy_kwh(flops, peak, c["watts"], utilization, pue) / 1e3

    right = mwh(flops)
    return _report(True, _judge_number("energy in MWh", answer, right, {
        mwh(flops, pue=1.0): "the PUE multiplies the IT energy: cooling and power conversion "
                             "come on top (x 1.1).",
        right / c["pue"] ** 2: "multiply by the PUE, do not divide: the facility uses more "
                               "energy than the GPUs.",
        mwh(flops, utilization=1.0): "at 40% utilisation the run takes 1/0.4 = 2.5 times "
                                     "longer than at peak, drawing power all the while.",
        mwh(2 * c["n_params"] * c["n_tokens"]): "training costs 6ND FLOPs (forward 2ND, "
                                                "backward 4ND), not 2ND.",
        right * 1e3: "that is kWh; the question asks for MWh (divide by 1,000).",
        right * 1e6: "that is Wh (or W x h without /1000): the question asks for MWh.",
        right * 3.6e9: "that is joules (watt-seconds): divide by 3.6e9 to get MWh.",
        mwh(flops, peak=1979e12): "989 TFLOP/s is the dense bf16 peak; the datasheet's "
                                  "1,979 assumes 2:4 sparsity, which dense training does "
                                  "not use.",
        mwh(flops) * 0.4 ** 2: "divide the achieved work by peak x utilisation: utilisation "
                               "makes the run longer, not shorter.",
    }, rel=0.01))


# --------------------------------------------------------------------------- price per token
def _slip(hint: str, fn: Callable[[float, float], float]) -> tuple[str, Callable]:
    return hint, fn


@grader
def check_cost_per_million(fn: Callable[[float, float], float]) -> bool:
    """Ch. 15, exercise 3: ``fn(tokens_per_second, price_per_hour)`` is the price, in the
    currency of ``price_per_hour``, of one million tokens generated at that throughput on
    hardware rented by the hour and kept busy."""
    rng = fresh_rng()
    cases = [(2278.7, 0.05), (1000.0, 3.6), (50.0, 98.32), (1.0, 1.0),
             (rng.uniform(10, 1e5), rng.uniform(0.01, 100))]
    slips = [
        _slip("an hour has 3,600 seconds: tokens per hour = 3600 x tokens/s.",
              lambda t, p: p / t * 1e6),
        _slip("that is the price of one token: multiply by one million.",
              lambda t, p: p / (3600 * t)),
        _slip("that is the price of a thousand tokens: a million is 1e6.",
              lambda t, p: p / (3600 * t) * 1e3),
        _slip("price per million = price per hour / (tokens per hour) x 1e6; you inverted it.",
              lambda t, p: 3600 * t / p / 1e6),
        _slip("a minute has 60 seconds but an hour has 3,600.", lambda t, p: p / (60 * t) * 1e6),
        _slip("the arguments come in the order fn(tokens_per_second, price_per_hour); yours "
              "are swapped.", lambda t, p: t / (3600 * p) * 1e6),
    ]
    hint = "cost = price per hour / (3600 x tokens per second) x 1,000,000."
    for t, p in cases:
        got = _number(f"fn({t:.6g}, {p:.6g})", call(fn, t, p, hint=hint))
        right = trends.cost_per_million_tokens(t, p)
        if math.isclose(got, right, rel_tol=1e-6):
            continue
        matches = [h for h, slip in slips if math.isclose(got, slip(t, p), rel_tol=1e-6)]
        raise NotYet(f"fn({t:.6g}, {p:.6g}) = {got:.6g}, expected {right:.6g}.",
                     (matches or [hint])[0])
    return _report(True, "price per million tokens = hourly price / tokens per hour x 1e6: "
                         "double the throughput, halve the price.")
