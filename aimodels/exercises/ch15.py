"""Chapter 15 graders: the parameters of a mixture-of-experts model, the energy of a
training run, the price of a million generated tokens, and integrated gradients with
another baseline."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from aimodels import explain, trends

from ._common import NotYet, _judge_number, _number, _report, _whole_number, call, fresh_rng, grader

__all__ = ["check_cost_per_million", "check_ig_baseline", "check_moe_parameters",
           "check_training_energy"]

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


# --------------------------------------------------------------------------- IG baseline
IG_STEPS = 128  # the reference's trapezoid steps, as in the chapter
IG_CLOSE = 0.02  # attributions may differ by 2% of the largest: other step counts pass
IG_COMPLETE = 0.01  # completeness within 1% of the score change, as the chapter asks


def _attributions(answer: object, shape: tuple[int, ...]) -> torch.Tensor:
    """The learner's attributions as a float64 tensor shaped like the inputs."""
    if answer is Ellipsis or answer is None:
        raise NotYet("ig_mean has no answer yet.",
                     "compute ig_mean = explain.integrated_gradients(model, x, target, "
                     "baseline=mean_image, steps=128).")
    if type(answer).__module__ == "numpy":
        answer = torch.from_numpy(answer)
    if not isinstance(answer, torch.Tensor) or tuple(answer.shape) != shape:
        got = (f"shape {tuple(answer.shape)}" if isinstance(answer, torch.Tensor)
               else type(answer).__name__)
        raise NotYet(f"ig_mean: expected a tensor of the inputs' shape {shape}, got {got}.",
                     "integrated gradients give one attribution per pixel of every input.")
    if not answer.is_floating_point():
        raise NotYet(f"ig_mean has dtype {answer.dtype}, not a floating-point type.",
                     "attributions are real numbers: keep the tensor integrated_gradients "
                     "returns.")
    return answer.detach().to(torch.float64)


@grader
def check_ig_baseline(ig_mean: object, flipped: object, model: nn.Module, x: torch.Tensor,
                      target: torch.Tensor | int) -> bool:
    """Ch. 15, exercise 4: ``ig_mean``, the integrated gradients of ``model``'s class scores
    for the digits ``x`` (classes ``target``) with the *mean training image* of
    ``aimodels.data.digits()`` as the baseline, and ``flipped``, how many of those
    attributions have the opposite sign (one positive, the other negative) to the
    attributions with the all-zero (blank) baseline."""
    from aimodels.data import digits

    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1:3] != (1, x.shape[-1]):
        raise NotYet(f"x: expected digits of shape [n, 1, size, size], got "
                     f"{tuple(getattr(x, 'shape', ()))}.",
                     "pass the digits you explained, e.g. data['X_test'][:8].")
    got = _attributions(ig_mean, tuple(x.shape))
    mean_image = digits(size=x.shape[-1])["X_train"].mean(0, keepdim=True)

    def ig(baseline: torch.Tensor | None) -> torch.Tensor:
        return explain.integrated_gradients(model, x, target, baseline=baseline,
                                            steps=IG_STEPS).to(torch.float64)

    right, blank = ig(mean_image), ig(None)
    scale = float(right.abs().max())

    def near(candidate: torch.Tensor) -> bool:
        return float((got - candidate).abs().max()) <= IG_CLOSE * scale

    if not near(right):
        slips = [
            (blank, "these are the attributions with the blank (all-zero) baseline: pass "
                    "baseline=mean_image."),
            (ig(x.mean(0, keepdim=True)), "the baseline is the mean *training* image, "
                                          "data['X_train'].mean(0, keepdim=True), not the mean "
                                          "of the digits you explain."),
            (ig(torch.full_like(mean_image, float(mean_image.mean()))),
             "average over the images only (dim 0, keepdim=True): the baseline is an image, "
             "not one grey level for every pixel."),
            (-right, "the signs are reversed: IG goes from the baseline to the input, so "
                     "integrated_gradients(model, x, target, baseline=mean_image)."),
        ]
        for candidate, hint in slips:
            if near(candidate):
                raise NotYet("ig_mean is not the integrated gradients from the mean training "
                             "image.", hint)
        with torch.no_grad():
            change = (explain.class_scores(model, x, target)
                      - explain.class_scores(model, mean_image.expand_as(x), target))
        gap = (got.flatten(1).sum(1) - change.to(torch.float64)).abs() / change.abs()
        raise NotYet(f"ig_mean does not add up: its sums miss f(x) - f(mean image) by up to "
                     f"{float(gap.max()):.1%}.",
                     "IG multiplies the path-averaged gradient by (x - baseline); use "
                     "explain.integrated_gradients with enough steps (128).")
    value = _number("flipped", flipped)
    if 0 < value < 1:
        raise NotYet(f"flipped = {value:.3g} is a fraction.",
                     "count the attributions (an int), do not divide by their number.")
    count = _whole_number("flipped", value)
    right_count = int(((right * blank) < 0).sum())
    own_count = int(((got * blank) < 0).sum())
    if min(abs(count - right_count), abs(count - own_count)) <= 1:
        return _report(True, f"{right_count} of {right.numel()} attributions change sign "
                             "between the blank and the mean-image baseline, and both add up "
                             "to their own score change: the baseline is part of the "
                             "question an attribution answers.")
    slips = {
        int(((right * blank) <= 0).sum()): "a pixel with exactly zero attribution has no "
                                           "sign to change: count product < 0, not <= 0.",
        int((torch.sign(right) != torch.sign(blank)).sum()): "where a pixel is blank, the "
            "blank baseline gives it exactly 0, which has no sign: count only the pixels "
            "that are positive in one and negative in the other (product < 0).",
        int(((blank > 0) & (right < 0)).sum()): "count both directions: positive to "
                                                "negative and negative to positive.",
        int(((blank < 0) & (right > 0)).sum()): "count both directions: positive to "
                                                "negative and negative to positive.",
        int(((right * blank) > 0).sum()): "that counts the attributions that keep their "
                                          "sign; the question asks for those that change it.",
    }
    hint = slips.get(count, "multiply the two attribution tensors and count the negative "
                            "products: ((ig_mean * ig) < 0).sum().")
    raise NotYet(f"flipped = {count}, not the number of sign changes.", hint)
