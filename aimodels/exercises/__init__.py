"""Graders for the chapters' exercises: each ``check_*`` prints feedback with a hint.

Every checker returns ``True`` for a correct answer and ``False`` otherwise, and prints
one line that says which: "Correct: ..." or "Not yet: ... Hint: ...". A wrong answer that
matches a common slip gets a hint that names the slip. A stub (a body that raises
``NotImplementedError``, or an answer left as ``...``), an exception inside the learner's
code, and a call to the library function an exercise asks the learner to write all get
"Not yet" too, never a traceback. One module per chapter: ``ch01`` ... ``ch15``.
"""

from __future__ import annotations

from . import (
    ch01,
    ch02,
    ch03,
    ch04,
    ch05,
    ch06,
    ch07,
    ch08,
    ch09,
    ch10,
    ch11,
    ch12,
    ch13,
    ch14,
    ch15,
)
from .ch01 import check_mlp_parameters, check_training_days, check_weights_gb
from .ch02 import (
    check_adagrad,
    check_adam_first_step,
    check_clipped_gradient,
    check_max_stable_lr,
    check_warmup_cosine_lr,
)
from .ch03 import (
    check_ce_grad,
    check_double_softmax_floor,
    check_he_std,
    check_inverted_dropout,
    check_numerical_grad,
    check_two_layer_grads,
)
from .ch04 import (
    check_batchnorm_eval,
    check_conv2d,
    check_conv_output_size,
    check_receptive_field,
    check_separable_parameters,
)
from .ch05 import check_copy_task, check_rnn_forward, check_rnn_parameters, check_vanishing_steps
from .ch06 import check_embedding_matmul, check_extrapolation, check_pe_norm, check_sinusoidal
from .ch07 import check_attention, check_causal_mask, check_mha_parameters, check_post_ln
from .ch08 import (
    check_bpe_merge,
    check_chinese_number,
    check_clipped_precision,
    check_full_range,
    check_pad_batch,
)
from .ch09 import check_distinct_n, check_kv_cache_gb, check_perplexity, check_top_p_filter
from .ch10 import (
    check_bubble_fraction,
    check_column_shard,
    check_ring_bytes,
    check_ring_time,
    check_zero_memory,
)
from .ch11 import (
    check_kd_loss,
    check_per_channel_quantize,
    check_pruned_size,
    check_scale_zero_point,
)
from .ch12 import (
    check_batch_throughput,
    check_littles_law,
    check_nearest_rank,
    check_psi,
    check_v2_request,
)
from .ch13 import (
    check_continuous_steps,
    check_kv_blocks,
    check_parse_sse,
    check_ridge_batch,
    check_shared_prefix_blocks,
    check_static_steps,
)
from .ch14 import check_cloud_latency, check_crossover_flops, check_int8_size, check_shape_accepts
from .ch15 import (
    check_cost_per_million,
    check_ig_baseline,
    check_moe_parameters,
    check_training_energy,
)

CHAPTERS = {
    1: ch01, 2: ch02, 3: ch03, 4: ch04, 5: ch05, 6: ch06, 7: ch07, 8: ch08, 9: ch09,
    10: ch10, 11: ch11, 12: ch12, 13: ch13, 14: ch14, 15: ch15,
}

__all__ = [
    "check_adagrad", "check_adam_first_step", "check_attention", "check_batch_throughput",
    "check_batchnorm_eval", "check_bpe_merge", "check_bubble_fraction", "check_causal_mask",
    "check_ce_grad", "check_chinese_number", "check_clipped_gradient",
    "check_clipped_precision", "check_cloud_latency", "check_column_shard",
    "check_continuous_steps", "check_conv2d", "check_conv_output_size", "check_copy_task",
    "check_cost_per_million", "check_crossover_flops", "check_distinct_n",
    "check_double_softmax_floor", "check_embedding_matmul", "check_extrapolation",
    "check_full_range", "check_he_std", "check_ig_baseline", "check_int8_size",
    "check_inverted_dropout", "check_kd_loss", "check_kv_blocks", "check_kv_cache_gb",
    "check_littles_law", "check_max_stable_lr", "check_mha_parameters", "check_mlp_parameters",
    "check_moe_parameters", "check_nearest_rank", "check_numerical_grad", "check_pad_batch",
    "check_parse_sse", "check_pe_norm", "check_per_channel_quantize", "check_perplexity",
    "check_post_ln", "check_pruned_size", "check_psi", "check_receptive_field",
    "check_ridge_batch", "check_ring_bytes", "check_ring_time", "check_rnn_forward",
    "check_rnn_parameters", "check_scale_zero_point", "check_separable_parameters",
    "check_shape_accepts", "check_shared_prefix_blocks", "check_sinusoidal",
    "check_static_steps", "check_top_p_filter", "check_training_days", "check_training_energy",
    "check_two_layer_grads", "check_v2_request", "check_vanishing_steps",
    "check_warmup_cosine_lr", "check_weights_gb", "check_zero_memory",
]
