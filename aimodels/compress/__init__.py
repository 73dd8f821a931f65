"""Compression (Chapter 11): pruning, quantisation and distillation, each from scratch.

========== ==============================================================
module     holds
========== ==============================================================
prune      magnitude pruning (global or per layer) and structured pruning
quant      quantisation from scratch: int8 and int4, per tensor, channel or group
distill    the knowledge-distillation loss and a training loop
export     the maintained libraries: torch.ao, ONNX export, ONNX Runtime int8
========== ==============================================================

The most used names are importable from here, e.g.
``from aimodels.compress import magnitude_prune, quantize, distillation_loss``.
``export`` needs the ``compress`` extra (onnx, onnxruntime, onnxscript) and is imported
on its own: ``from aimodels.compress import export``.
"""

from aimodels.compress.distill import distill, distillation_loss, train_hard
from aimodels.compress.prune import (
    apply_masks,
    count_nonzero_params,
    magnitude_prune,
    prune_conv_channels,
    prune_linear_neurons,
    shrink_gpt_mlp,
    shrink_lenet,
    shrink_mlp,
    sparsity,
)
from aimodels.compress.quant import (
    QATLinear,
    QuantizedLinear,
    convert_qat,
    dequantize,
    dequantize_groupwise,
    fake_quantize,
    fake_quantize_groupwise,
    int8_matmul,
    matmul_error_bound,
    quant_range,
    quantize,
    quantize_gpt_weights_,
    quantize_groupwise,
    quantize_linears,
    saved_size_bytes,
    state_dict_bytes,
)

__all__ = [
    "QATLinear",
    "QuantizedLinear",
    "apply_masks",
    "convert_qat",
    "count_nonzero_params",
    "dequantize",
    "dequantize_groupwise",
    "distill",
    "distillation_loss",
    "fake_quantize",
    "fake_quantize_groupwise",
    "int8_matmul",
    "magnitude_prune",
    "matmul_error_bound",
    "prune_conv_channels",
    "prune_linear_neurons",
    "quant_range",
    "quantize",
    "quantize_gpt_weights_",
    "quantize_groupwise",
    "quantize_linears",
    "saved_size_bytes",
    "shrink_gpt_mlp",
    "shrink_lenet",
    "shrink_mlp",
    "sparsity",
    "state_dict_bytes",
    "train_hard",
]
