"""Calculators for the trends of chapter 15: model size, long context, energy and price.

Each function is a back-of-the-envelope model with its convention written down. The
parameter count and the energy are checked in ``tests/test_trends.py`` against figures the
model builders and papers published; the attention share and the price against their
formulas (no published figure to match):

- :func:`llm_parameters` counts the weights of a decoder-only Transformer with grouped-query
  attention, a gated (SwiGLU) feed-forward network and an optional mixture of experts, and
  gives both the *total* count (what must be stored) and the *active* count (what one token
  uses). It reproduces Llama 3 8B (8,030,261,248) and Mixtral 8x7B (46.7B total, 12.9B active).
- :func:`attention_flop_share` says how much of a training token's compute goes to attention
  at a given context length, reusing chapter 9's :math:`6N + 12LTd`.
- :func:`training_energy_kwh`, :func:`energy_from_device_hours` and :func:`co2e_tonnes` turn
  FLOPs or device-hours into kWh and tonnes of CO2-equivalent; they reproduce Patterson et
  al. (2021, Table 4) for GPT-3.
- :func:`cost_per_million_tokens` turns a measured throughput and an hourly price into the
  unit in which model APIs are sold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aimodels.scaling import transformer_training_flops_per_token

JOULES_PER_KWH = 3.6e6
SECONDS_PER_HOUR = 3600.0


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _positive(name: str, value: object) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")
    return float(value)


@dataclass(frozen=True)
class ParameterCount:
    """Weights of a decoder-only LLM, split by where they live.

    ``total`` is what must be stored; ``active`` is what one token passes through (for a
    dense model the two are equal). ``ffn_total`` and ``ffn_active`` are the feed-forward
    (expert) weights of all layers; ``router`` is the gating layer of a mixture of experts.
    """

    total: int
    active: int
    embedding: int
    output_head: int
    attention: int
    ffn_total: int
    ffn_active: int
    router: int
    norms: int


def llm_parameters(
    d_model: int,
    n_layers: int,
    d_ff: int,
    vocab_size: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    n_experts: int = 1,
    experts_per_token: int = 1,
    gated_ffn: bool = True,
    tie_embeddings: bool = False,
) -> ParameterCount:
    r"""Total and active parameters of a Llama/Mixtral-style decoder-only Transformer.

    Conventions (those of Llama 3 and Mixtral, whose configurations have no biases):

    - **no biases** anywhere;
    - **attention**: :math:`W_Q, W_O` are :math:`d \times d`; :math:`W_K, W_V` are
      :math:`d \times H_{kv} d_h` with :math:`d_h = d / H`. Grouped-query attention
      (Ainslie et al., 2023) is :math:`H_{kv} < H`; ``n_kv_heads=None`` means :math:`H_{kv} = H`;
    - **feed-forward**: gated (SwiGLU: gate, up and down projections,
      :math:`3 d\,d_{ff}`) or plain (:math:`2 d\,d_{ff}`), per expert;
    - **mixture of experts**: ``n_experts`` feed-forward blocks per layer and a router
      :math:`d \times E` without bias; a token uses ``experts_per_token`` of them and the router;
    - **norms**: two RMSNorm weight vectors per layer and one final norm, :math:`d` each;
    - **embeddings**: an input table and an output head of :math:`V \times d` each, unless
      ``tie_embeddings`` shares one. Both count as active, as model cards count them.
    """
    for name, value in (("d_model", d_model), ("n_layers", n_layers), ("d_ff", d_ff),
                        ("vocab_size", vocab_size), ("n_heads", n_heads),
                        ("n_experts", n_experts), ("experts_per_token", experts_per_token)):
        _positive_int(name, value)
    kv_heads = n_heads if n_kv_heads is None else _positive_int("n_kv_heads", n_kv_heads)
    if d_model % n_heads:
        raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model} and "
                         f"n_heads={n_heads}")
    if n_heads % kv_heads:
        raise ValueError(f"n_heads must be a multiple of n_kv_heads (each key-value head "
                         f"serves a group of query heads), got n_heads={n_heads} and "
                         f"n_kv_heads={kv_heads}")
    if experts_per_token > n_experts:
        raise ValueError(f"experts_per_token must be at most n_experts, got "
                         f"experts_per_token={experts_per_token} and n_experts={n_experts}")
    head_dim = d_model // n_heads
    attention = n_layers * (2 * d_model * d_model + 2 * d_model * kv_heads * head_dim)
    per_expert = (3 if gated_ffn else 2) * d_model * d_ff
    ffn_total = n_layers * n_experts * per_expert
    ffn_active = n_layers * experts_per_token * per_expert
    router = n_layers * d_model * n_experts if n_experts > 1 else 0
    norms = (2 * n_layers + 1) * d_model
    embedding = vocab_size * d_model
    output_head = 0 if tie_embeddings else vocab_size * d_model
    shared = embedding + output_head + attention + router + norms
    return ParameterCount(total=shared + ffn_total, active=shared + ffn_active,
                          embedding=embedding, output_head=output_head, attention=attention,
                          ffn_total=ffn_total, ffn_active=ffn_active, router=router, norms=norms)


def attention_flop_share(n_params: float, n_layers: int, context_length: int,
                         d_model: int) -> float:
    r"""Fraction of a training token's FLOPs spent on attention scores and their sum.

    From chapter 9's :math:`6N + 12LTd`
    (:func:`aimodels.scaling.transformer_training_flops_per_token`): the share is
    :math:`12LTd / (6N + 12LTd)`. It grows linearly with the context :math:`T` per token,
    so the whole sequence's attention cost grows as :math:`T^2`.
    """
    total = transformer_training_flops_per_token(n_params, n_layers, context_length, d_model)
    return 12.0 * n_layers * context_length * d_model / total


def training_energy_kwh(flops: float, flops_per_second: float, watts: float,
                        utilization: float = 1.0, pue: float = 1.0) -> float:
    r"""Facility energy, in kWh, to spend ``flops`` on devices of a given speed and power.

    :math:`E = \dfrac{C}{\text{peak} \times u} \times P \times \text{PUE}`: the device-seconds
    the work takes at the achieved rate, times the average power drawn per device (W), times
    the data centre's power usage effectiveness (facility energy / IT energy, >= 1).
    ``flops_per_second`` and ``watts`` are per device; ``utilization`` in (0, 1] is the share
    of the peak achieved (pass 1 when ``flops_per_second`` is already a measured rate).
    """
    _positive("flops", flops)
    _positive("flops_per_second", flops_per_second)
    _positive("watts", watts)
    if not (isinstance(utilization, (int, float)) and 0 < utilization <= 1):
        raise ValueError(f"utilization must be in (0, 1], got utilization={utilization!r}")
    if not (isinstance(pue, (int, float)) and pue >= 1):
        raise ValueError(f"pue must be >= 1 (facility energy / IT energy), got pue={pue!r}")
    device_seconds = flops / (flops_per_second * utilization)
    return device_seconds * watts * pue / JOULES_PER_KWH


def energy_from_device_hours(device_hours: float, watts: float, pue: float = 1.0) -> float:
    r"""Facility energy in kWh from device-hours: :math:`E = h P \,\text{PUE} / 1000`."""
    _positive("device_hours", device_hours)
    _positive("watts", watts)
    if not (isinstance(pue, (int, float)) and pue >= 1):
        raise ValueError(f"pue must be >= 1 (facility energy / IT energy), got pue={pue!r}")
    return device_hours * watts * pue / 1000.0


def co2e_tonnes(kwh: float, grams_per_kwh: float) -> float:
    r"""Tonnes of CO2-equivalent from energy and the grid's carbon intensity (g CO2e / kWh)."""
    _positive("kwh", kwh)
    if not (isinstance(grams_per_kwh, (int, float)) and grams_per_kwh >= 0):
        raise ValueError(f"grams_per_kwh must be >= 0, got grams_per_kwh={grams_per_kwh!r}")
    return kwh * grams_per_kwh / 1e6


def cost_per_million_tokens(tokens_per_second: float, price_per_hour: float) -> float:
    r"""Price of one million tokens served at a steady throughput on hardware rented by the hour.

    :math:`\text{cost} = \dfrac{\text{price per hour}}{3600 \times \text{tokens/s}} \times 10^6`.
    It assumes the hardware is kept busy; idle time raises the real figure.
    """
    _positive("tokens_per_second", tokens_per_second)
    _positive("price_per_hour", price_per_hour)
    return price_per_hour / (SECONDS_PER_HOUR * tokens_per_second) * 1e6


# --------------------------------------------------------------------------- a cited price
#: Google Cloud Run's list price, in USD, for one vCPU allocated all the time (CPU "always
#: allocated", billed per instance) in its Tier 1 regions, such as us-central1 (Iowa), as
#: the pricing page lists it: 0.000018 per vCPU-second. That is 25% below the 0.000024 it
#: charges when CPU is allocated only during requests, the cut announced on 13 September
#: 2021. Memory, requests and network traffic are billed on top. Chapters 14 and 15 use it
#: as the hourly price of a busy vCPU (``CLOUD_RUN_USD_PER_VCPU_HOUR``, 0.0648).
CLOUD_RUN_USD_PER_VCPU_SECOND = 0.000018
CLOUD_RUN_USD_PER_VCPU_HOUR = CLOUD_RUN_USD_PER_VCPU_SECOND * SECONDS_PER_HOUR
