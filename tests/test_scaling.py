"""The Chapter 1 calculators, checked against published figures and against PyTorch."""

import math

import pytest
import torch
from torch import nn

from aimodels import scaling
from aimodels.cnn import LeNet5


def test_gpt3_training_flops_match_published_figure():
    # Brown et al. (2020), Table D.1: 3.14e23 FLOPs for GPT-3 175B on 300B tokens.
    flops = scaling.training_flops(175e9, 300e9)
    assert flops == pytest.approx(3.14e23, rel=0.01)


def test_bert_base_from_its_configuration():
    n = scaling.transformer_parameters(
        n_layers=12, d_model=768, vocab_size=30522, d_ff=3072, max_positions=512,
        n_token_types=2, embedding_norm=True, pooler=True,
    )
    assert n == pytest.approx(109_482_240, rel=0.01)
    assert n == 109_482_240  # the formula is exact, not just close


def test_gpt2_small_from_its_configuration():
    n = scaling.transformer_parameters(12, 768, 50257, max_positions=1024, final_norm=True)
    assert n == 124_439_808


@pytest.mark.parametrize("n_layers,d,heads,d_ff,vocab", [(2, 64, 4, 256, 1000), (3, 48, 6, 100, 77)])
def test_formula_equals_a_pytorch_model_built_from_the_same_configuration(
    n_layers, d, heads, d_ff, vocab
):
    model = scaling.TransformerShaped(n_layers, d, vocab, heads, d_ff, max_positions=128)
    expected = scaling.count_parameters(model)
    got = scaling.transformer_parameters(
        n_layers, d, vocab, d_ff=d_ff, max_positions=128, n_token_types=2,
        embedding_norm=True, pooler=True,
    )
    assert got == expected


def test_transformer_shaped_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by n_heads, got 10 and 3"):
        scaling.TransformerShaped(1, 10, 5, 3, 20, 8)


def test_untied_output_and_no_bias_options():
    base = scaling.transformer_parameters(1, 8, 10)
    assert scaling.transformer_parameters(1, 8, 10, tied_output=False) == base + 10 * 8
    # bias=False removes 4d (attention) + d_ff + d (feed-forward) biases per layer.
    assert scaling.transformer_parameters(1, 8, 10, bias=False) == base - (4 * 8 + 32 + 8)


def test_lenet5_has_61706_parameters():
    assert scaling.count_parameters(LeNet5()) == 61_706


def test_resnet50_has_25557032_parameters():
    import torchvision  # a core dependency: a missing install must fail here, not skip

    assert scaling.count_parameters(torchvision.models.resnet50(weights=None)) == 25_557_032


def test_count_parameters_trainable_only_and_shared_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert scaling.count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    assert scaling.count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    tied = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert scaling.count_parameters(tied) == 25
    with pytest.raises(TypeError, match="torch.nn.Module"):
        scaling.count_parameters([1, 2, 3])


@pytest.mark.parametrize(
    "dtype,expected",
    [("float32", 4), ("fp16", 2), ("bf16", 2), (torch.bfloat16, 2), (torch.float64, 8),
     ("int8", 1), ("int4", 0.5)],
)
def test_bytes_per_element(dtype, expected):
    assert scaling.bytes_per_element(dtype) == expected


def test_weights_memory():
    assert scaling.weights_memory_bytes(175e9, "fp16") == 350e9
    assert scaling.weights_memory_bytes(7e9, "int4") == 3.5e9
    assert scaling.weights_memory_bytes(3, "int4") == 2  # half bytes round up
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        scaling.weights_memory_bytes(10, "fp12")
    with pytest.raises(ValueError, match="n_params=-1"):
        scaling.weights_memory_bytes(-1)


def test_training_memory_is_16_bytes_per_parameter_for_mixed_precision_adam():
    parts = scaling.training_bytes_per_param("adam", "mixed")
    assert parts == {"weights": 2, "gradients": 2, "master weights": 4, "optimizer states": 8}
    assert scaling.training_memory_bytes(1e9) == 16e9
    assert scaling.training_memory_bytes(1e9, "sgd", "fp32") == 8e9
    assert scaling.training_memory_bytes(1e9, "momentum", "fp32") == 12e9
    with pytest.raises(ValueError, match="optimizer must be one of"):
        scaling.training_memory_bytes(1, "lion")
    with pytest.raises(ValueError, match="precision must be 'mixed' or 'fp32', got 'int8'"):
        scaling.training_memory_bytes(1, "adam", "int8")


def test_flops_and_time():
    assert scaling.inference_flops_per_token(7e9) == 14e9
    assert scaling.training_flops(1e9, 1e9, activation_recomputation=True) == 8e18
    # Narayanan et al. (2021), Sec. 5.1: GPT-3 on 1024 A100s at 140 TFLOP/s each with
    # activation recomputation takes about 34 days.
    flops = scaling.training_flops(175e9, 300e9, activation_recomputation=True)
    assert scaling.training_days(flops, 1024 * 140e12, 1.0) == pytest.approx(34, rel=0.01)
    assert scaling.training_days(86_400.0, 2.0, 0.5) == pytest.approx(1.0)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"utilization={bad}"):
            scaling.training_days(1e20, 1e15, bad)


def test_chinchilla():
    assert scaling.chinchilla_optimal_tokens(70e9) == pytest.approx(1.4e12)
    n = scaling.chinchilla_optimal_params(6 * 70e9 * 1.4e12)
    assert n == pytest.approx(70e9)
    assert scaling.chinchilla_optimal_tokens(n) * n * 6 == pytest.approx(6 * 70e9 * 1.4e12)


def test_measured_flops_of_a_linear_stack_are_2n_forward_and_about_6n_training():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 64))
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    tokens = 32
    x = torch.randn(tokens, 64)
    assert scaling.measure_flops(model, x) == 2 * weights * tokens
    total = scaling.measure_flops(model, x, backward=True)
    # The first layer needs no gradient with respect to its input, so slightly under 6N.
    assert 5 * weights * tokens < total <= 6 * weights * tokens


def test_landmark_table_is_complete_and_cited():
    rows = scaling.landmark_models()
    assert len(rows) >= 10
    bib = (__import__("pathlib").Path(__file__).parents[1] / "book" / "references.bib").read_text()
    for row in rows:
        assert row.parameters > 0 and 1990 <= row.year <= 2030
        assert row.source.strip(), row.model
        assert "@" in bib and f"{{{row.citation}," in bib, f"{row.citation} is not in references.bib"
        if row.training_tokens is not None:
            assert row.training_tokens > row.parameters
    years = [r.year for r in rows]
    assert years == sorted(years)
    gpt3 = next(r for r in rows if r.model == "GPT-3")
    assert math.isclose(scaling.training_flops(gpt3.parameters, gpt3.training_tokens), 3.15e23)
