"""Tests for aimodels.trends: parameter counts, attention share, energy, CO2 and price.

The parameter count and the energy are checked against published figures (cited in the
tests) and the parameter count, where a library builds the model, against the parameters of
that model built by transformers. The attention share and the price have no published figure
to match; they are checked against their formulas.
"""

from __future__ import annotations

import math

import pytest

from aimodels import scaling, trends

# Llama 3 8B config.json (meta-llama/Meta-Llama-3-8B on the Hugging Face hub): hidden 4096,
# 32 layers, intermediate 14336, vocabulary 128256, 32 heads, 8 key-value heads, untied.
LLAMA3_8B = dict(d_model=4096, n_layers=32, d_ff=14336, vocab_size=128256, n_heads=32,
                 n_kv_heads=8)
# Mixtral 8x7B (Jiang et al., 2024, Table 1; mistralai/Mixtral-8x7B-v0.1 config.json): as
# Mistral 7B with 8 experts per layer, 2 per token, vocabulary 32000.
MIXTRAL = dict(d_model=4096, n_layers=32, d_ff=14336, vocab_size=32000, n_heads=32,
               n_kv_heads=8, n_experts=8, experts_per_token=2)


def test_llama3_8b_matches_the_published_count():
    count = trends.llm_parameters(**LLAMA3_8B)
    # The hub's safetensors metadata: 8,030,261,248 parameters ("8.03B" on the model page).
    assert count.total == 8_030_261_248
    assert round(count.total / 1e9, 2) == 8.03
    assert count.active == count.total  # dense: every token uses every weight
    assert count.router == 0


def test_mixtral_matches_the_published_total_and_active_counts():
    count = trends.llm_parameters(**MIXTRAL)
    # Mistral AI's announcement: "46.7B total parameters but only uses 12.9B parameters per
    # token"; the hub's safetensors metadata gives 46,702,792,704 in all.
    assert count.total == 46_702_792_704
    assert round(count.total / 1e9, 1) == 46.7
    assert round(count.active / 1e9, 1) == 12.9
    assert count.total - count.active == 6 * 3 * 4096 * 14336 * 32  # six idle experts
    assert count.router == 32 * 4096 * 8


def test_parts_add_up():
    c = trends.llm_parameters(**MIXTRAL)
    shared = c.embedding + c.output_head + c.attention + c.router + c.norms
    assert c.total == shared + c.ffn_total and c.active == shared + c.ffn_active


def test_grouped_query_attention_shrinks_only_keys_and_values():
    full = trends.llm_parameters(**{**LLAMA3_8B, "n_kv_heads": 32})
    gqa = trends.llm_parameters(**LLAMA3_8B)
    assert full.attention == 32 * 4 * 4096 * 4096
    assert full.attention - gqa.attention == 32 * 2 * 4096 * (4096 - 8 * 128)


def test_tied_plain_ffn_counts():
    c = trends.llm_parameters(64, 2, 256, 100, 4, gated_ffn=False, tie_embeddings=True)
    assert c.output_head == 0
    assert c.total == 100 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 256) + (2 * 2 + 1) * 64


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_llama_count_equals_transformers_model(kv_heads):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads,
                                      vocab_size=50, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    expected = sum(p.numel() for p in model.parameters())
    got = trends.llm_parameters(64, 2, 96, 50, 4, kv_heads)
    assert got.total == got.active == expected


def test_mixtral_count_equals_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=50,
                                        num_local_experts=4, num_experts_per_tok=2,
                                        tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    got = trends.llm_parameters(64, 2, 96, 50, 4, 2, n_experts=4, experts_per_token=2)
    assert got.total == total
    assert got.active == total - 2 * (2 * 3 * 64 * 96)  # two idle experts in each layer


@pytest.mark.parametrize("kwargs, message", [
    (dict(LLAMA3_8B, n_heads=30), "divisible by n_heads"),
    (dict(LLAMA3_8B, n_kv_heads=5), "multiple of n_kv_heads"),
    (dict(MIXTRAL, experts_per_token=9), "at most n_experts"),
    (dict(LLAMA3_8B, d_ff=0), "d_ff must be a positive int"),
])
def test_llm_parameters_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        trends.llm_parameters(**kwargs)


def test_attention_share_reuses_chapter_9_flops():
    n, layers, d = 8.03e9, 32, 4096
    for context in (2048, 8192, 131072):
        share = trends.attention_flop_share(n, layers, context, d)
        total = scaling.transformer_training_flops_per_token(n, layers, context, d)
        assert math.isclose(share, 12 * layers * context * d / total)
    shares = [trends.attention_flop_share(n, layers, t, d) for t in (1024, 8192, 65536)]
    assert shares == sorted(shares) and shares[-1] > 0.5 > shares[0]


# Patterson et al. (2021), "Carbon Emissions and Large Neural Network Training", Table 4,
# GPT-3: 10,000 V100s for 14.8 days; 330 W measured average system power per processor;
# 24.6 TFLOP/s measured per processor; 3.14e23 FLOPs; PUE 1.10; 429 g CO2e/kWh;
# 1,287 MWh and 552 tCO2e.
def test_gpt3_energy_from_flops_matches_patterson_table_4():
    kwh = trends.training_energy_kwh(3.14e23, 24.6e12, 330, utilization=1.0, pue=1.10)
    assert math.isclose(kwh / 1e3, 1287, rel_tol=0.01)


def test_gpt3_energy_from_device_hours_matches_patterson_table_4():
    kwh = trends.energy_from_device_hours(10_000 * 14.8 * 24, 330, pue=1.10)
    assert math.isclose(kwh / 1e3, 1287, rel_tol=0.01)
    assert math.isclose(trends.co2e_tonnes(kwh, 429), 552, rel_tol=0.01)
    assert math.isclose(trends.co2e_tonnes(1287e3, 429), 552, rel_tol=0.001)


def test_utilization_and_pue_scale_energy():
    base = trends.training_energy_kwh(1e21, 1e14, 500)
    assert math.isclose(base, 1e21 / 1e14 * 500 / 3.6e6)
    assert math.isclose(trends.training_energy_kwh(1e21, 1e14, 500, utilization=0.4), base / 0.4)
    assert math.isclose(trends.training_energy_kwh(1e21, 1e14, 500, pue=1.5), 1.5 * base)


@pytest.mark.parametrize("call, message", [
    (lambda: trends.training_energy_kwh(1e21, 1e14, 500, utilization=40), "utilization"),
    (lambda: trends.training_energy_kwh(1e21, 1e14, 500, pue=0.9), "pue must be >= 1"),
    (lambda: trends.energy_from_device_hours(-1, 300), "device_hours"),
    (lambda: trends.co2e_tonnes(100, -5), "grams_per_kwh"),
    (lambda: trends.cost_per_million_tokens(0, 1.0), "tokens_per_second"),
])
def test_energy_and_cost_reject_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cost_per_million_tokens():
    # 1,000 tokens/s for an hour is 3.6M tokens; at $3.60/h that is $1 per million.
    assert math.isclose(trends.cost_per_million_tokens(1000, 3.60), 1.0)
    assert math.isclose(trends.cost_per_million_tokens(2000, 3.60), 0.5)
